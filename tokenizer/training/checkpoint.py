"""Training state, for resume (the release format is in release.py).

A training checkpoint is a folder `run_dir/checkpoints/step_XXXXXXXX/` holding
Accelerate's state (every part's module and optimiser, per-rank RNG, registered objects
such as the LR schedules), `trainer.json` (step, generation, lineage, and the names of the
task's parts in the order they were prepared), one `data_rank{r}.json` per rank (that
rank's stream position), for each code grid whose search backend has state (faiss-ivf)
one `search_<grid>_rank{r}.safetensors` per rank, and each part's whole weights in fp32:
`model.safetensors` for the first part, `model_<i>.safetensors` for part i > 0
(Accelerate's names; written by us from DeepSpeed's fp32 master weights under DeepSpeed).
Checkpoints written before parts had names hold one part, `tokenizer`, and one
`search_rank{r}.safetensors` for their one grid.

Crash safety. A checkpoint is written as `step_N.tmp`, fsynced (files and folders), then
renamed into place; a `step_N` that already exists (a resume at the end re-saves its step)
is first renamed `step_N.old` and deleted only once the new one is in place, and the
parent folder is fsynced after the renames. A kill at any point leaves a complete copy of
every checkpoint: `step_N`, or `step_N.old` when the kill fell between the two renames
(then `step_N.old` counts as the checkpoint of step N). A `.tmp` never counts.

Lineage. Every checkpoint gets a `generation`, one more than any generation in the run
directory, and records the generations it descends from (`lineage`): those of the
checkpoint the run resumed from and of the checkpoints it wrote before. `resume=auto`
takes the checkpoint written last (the highest generation), so after an explicit resume
from an older checkpoint it continues that branch. `keep_last` deletes only older
checkpoints of the current lineage: another branch's checkpoints are never deleted (a
warning names the newer ones), and when the new branch reaches a step another branch
already saved, the other branch's folder is kept as `step_N.branch-gG` (G: its
generation), out of resume's sight. Checkpoints written before generations existed have
none and are never pruned.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file

from tokenizer.atomic import fsync_path, write_json
from tokenizer.training.engine import deepspeed_fp32_weights

logger = logging.getLogger("tokenizer.training.checkpoint")

CHECKPOINT_DIR = "checkpoints"
TRAINER_FILE = "trainer.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_OLD_DIR = re.compile(r"^step_(\d{8})\.old$")  # the previous copy, mid-replacement
_TMP_DIR = re.compile(r"^step_(\d{8})\.tmp$")  # a save in progress or interrupted

# Whole weights of the first part, in the release's file format.
WEIGHTS_FILE = "model.safetensors"
# The part of checkpoints that did not name their parts.
DEFAULT_PARTS = ("tokenizer",)


def part_weights_file(index: int) -> str:
    """Accelerate's file name for the weights of the index-th prepared model."""
    return WEIGHTS_FILE if index == 0 else WEIGHTS_FILE.replace(".", f"_{index}.")


def _weight_files(parts: list[str], local: set[str] | frozenset[str]) -> dict[str, str]:
    """Part name -> the file of its whole weights: Accelerate's numbering of the prepared
    models for engine parts, `<name>.safetensors` for local ones."""
    engine = [p for p in parts if p not in local]
    return {p: _extra_file(p) if p in local else part_weights_file(engine.index(p)) for p in parts}


def _extra_file(name: str) -> str:
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name.startswith(("model", "search_")):
        raise ValueError(f"extra checkpoint weights need a plain name of their own, got {name!r}")
    return f"{name}.safetensors"


def load_extra_weights(path: Path, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """The extra weights of `names` that a checkpoint holds (absent names are left out)."""
    found = {n: path / _extra_file(n) for n in names}
    return {n: load_file(str(f)) for n, f in found.items() if f.is_file()}


def _search_file(grid: str, rank: int) -> str:
    return f"search_{grid}_rank{rank}.safetensors"


@dataclass
class ResumedState:
    step: int
    data_state: dict[str, Any] | None  # this rank's stream position, None if absent
    # grid name -> this rank's search backend state; grids without one are absent
    search_states: dict[str, dict[str, torch.Tensor]]


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int
    generation: int  # write order within the run directory; -1: written before generations
    lineage: tuple[int, ...]  # generations this checkpoint descends from, oldest first


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def read_checkpoint_info(path: Path) -> CheckpointInfo:
    meta = json.loads((path / TRAINER_FILE).read_text())
    return CheckpointInfo(
        path=path,
        step=int(meta["step"]),
        generation=int(meta.get("generation", -1)),
        lineage=tuple(int(g) for g in meta.get("lineage", ())),
    )


def checkpoint_infos(run_dir: str | Path) -> list[CheckpointInfo]:
    """Complete checkpoints, in the order they were written (generation, then step)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found: dict[int, Path] = {}
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name) or _OLD_DIR.match(path.name)
        if match is None or not (path / TRAINER_FILE).is_file():
            continue
        step = int(match.group(1))
        # step_N wins over step_N.old: the .old is then a leftover being deleted.
        if step not in found or _STEP_DIR.match(path.name):
            found[step] = path
    infos = []
    for path in found.values():
        try:
            infos.append(read_checkpoint_info(path))
        except FileNotFoundError:
            continue  # removed since the listing (keep_last rotation): not there any more
    return sorted(infos, key=lambda info: (info.generation, info.step))


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest (first written) first."""
    return [info.path for info in checkpoint_infos(run_dir)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint written last (not necessarily the highest step: see the lineage)."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_resume(resume: str | None, run_dir: str | Path) -> Path | None:
    """`auto` -> latest checkpoint of run_dir (None when there is none); a path -> that path."""
    if resume is None or resume in ("", "none", "None"):
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if _TMP_DIR.match(path.name):
        raise FileNotFoundError(f"resume={resume}: an interrupted save (.tmp), not a checkpoint")
    if not (path / TRAINER_FILE).is_file():
        raise FileNotFoundError(f"resume={resume}: not a complete checkpoint (no {TRAINER_FILE})")
    return path


def save_training_state(
    accelerator,
    parts: dict[str, torch.nn.Module],
    run_dir: str | Path,
    step: int,
    data_state: dict[str, Any],
    keep_last: int,
    search_states: dict[str, dict[str, torch.Tensor]] | None = None,
    parent: Path | None = None,
    extra_weights: dict[str, dict[str, torch.Tensor]] | None = None,
    local: set[str] | frozenset[str] = frozenset(),
) -> Path:
    """Every rank calls this at the same step; returns the final checkpoint path.

    parts: part name -> module (prepared, for engine parts), in the task's order; local:
    the names of the parts kept out of the engine (their state is in Accelerate's custom
    objects; their weights are also written as `<name>.safetensors`); search_states:
    grid name -> this rank's search backend state; parent: the checkpoint this state
    descends from (the one resumed from, or the run's previous checkpoint); None for a
    fresh run; extra_weights: name -> tensors the same on every rank (a weight EMA),
    written once as `<name>.safetensors`.
    """
    root = checkpoint_root(run_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    meta: dict[str, Any] = {}
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(root)
        tmp.mkdir()
        meta = _new_meta(root, step, accelerator.num_processes, parent)
        meta["parts"] = list(parts)
        meta["weights"] = _weight_files(list(parts), local)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # DeepSpeed writes its own sharded format, with 16-bit module weights under
        # bf16: also keep the whole fp32 master weights (every rank takes part in the
        # gather) so a release can be exported from any checkpoint without DeepSpeed.
        engines = [module for name, module in parts.items() if name not in local]
        for index, engine in enumerate(engines):
            weights = deepspeed_fp32_weights(accelerator, engine)
            if weights is not None:
                save_file(weights, str(tmp / part_weights_file(index)))
    rank = accelerator.process_index
    write_json(tmp / f"data_rank{rank}.json", data_state)
    for grid, state in (search_states or {}).items():
        if state:
            save_file(state, str(tmp / _search_file(grid, rank)))
    if accelerator.is_main_process:
        for name in local:
            state = {k: v.detach().cpu().contiguous() for k, v in parts[name].state_dict().items()}
            save_file(state, str(tmp / _extra_file(name)))
        for name, tensors in (extra_weights or {}).items():
            save_file(tensors, str(tmp / _extra_file(name)))
        write_json(tmp / TRAINER_FILE, meta)
    accelerator.wait_for_everyone()
    if accelerator.is_local_main_process:
        _fsync_tree(tmp)  # once per node: what this node's ranks wrote is on disk
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _put_in_place(tmp, final, set(meta["lineage"]), parent)
        _prune(root, read_checkpoint_info(final), keep_last)
    accelerator.wait_for_everyone()
    return final


def _new_meta(root: Path, step: int, world_size: int, parent: Path | None) -> dict[str, Any]:
    infos = checkpoint_infos(root.parent)
    lineage: tuple[int, ...] = ()
    if parent is not None and parent.resolve().parent == root.resolve():
        # A checkpoint of another run directory has generations of its own: no lineage.
        info = read_checkpoint_info(parent)
        lineage = info.lineage + ((info.generation,) if info.generation >= 0 else ())
    # Above every generation still named anywhere, so no lineage mistakes a new one for
    # an ancestor.
    named = [g for info in infos for g in (info.generation, *info.lineage)]
    generation = max([*named, *lineage, 0]) + 1
    return {
        "step": step,
        "world_size": world_size,
        "generation": generation,
        "lineage": list(lineage),
        "parent": None if parent is None else parent.name,
    }


def _put_in_place(tmp: Path, final: Path, lineage: set[int], parent: Path | None) -> None:
    """Rename the complete, fsynced tmp to final; a kill at any point leaves a complete
    checkpoint of this step (final, or final.old) or no change at all."""
    old = final.with_name(final.name + ".old")
    current = final if (final / TRAINER_FILE).is_file() else None
    if current is None and (old / TRAINER_FILE).is_file():
        current = old  # a copy left by a save killed between the two renames
    if current is not None and not _same_lineage(current, lineage, parent):
        info = read_checkpoint_info(current)
        kept = final.with_name(f"{final.name}.branch-g{info.generation}")
        shutil.rmtree(kept, ignore_errors=True)
        os.replace(current, kept)
        logger.warning(
            "%s belonged to another branch (generation %d, not in this run's lineage): "
            "kept as %s", final, info.generation, kept.name,
        )  # fmt: skip
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)  # final is complete: any .old is a leftover
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_path(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _same_lineage(path: Path, lineage: set[int], parent: Path | None) -> bool:
    if parent is not None and path.resolve() == parent.resolve():
        return True
    return read_checkpoint_info(path).generation in lineage


def _prune(root: Path, newest: CheckpointInfo, keep_last: int) -> None:
    """Keep the newest keep_last checkpoints of newest's lineage (newest included)."""
    infos = checkpoint_infos(root.parent)
    ancestors = set(newest.lineage)
    mine = sorted((i for i in infos if i.generation in ancestors), key=lambda i: i.step)
    if keep_last > 0:
        for info in mine[: max(0, len(mine) - (keep_last - 1))]:
            shutil.rmtree(info.path, ignore_errors=True)
    others = [
        i.path.name
        for i in infos
        if i.step > newest.step and i.generation not in ancestors and i.path != newest.path
    ]
    if others:
        logger.warning(
            "kept %s: saved at later steps by another branch of this run (not in the "
            "lineage of %s); resume=auto continues this branch", ", ".join(others),
            newest.path.name,
        )  # fmt: skip


def _remove_leftovers(root: Path) -> None:
    """Interrupted saves (.tmp) and .old copies whose replacement is in place."""
    for path in root.iterdir():
        if _TMP_DIR.match(path.name):
            shutil.rmtree(path, ignore_errors=True)
        elif _OLD_DIR.match(path.name) and (root / path.name[: -len(".old")]).is_dir():
            shutil.rmtree(path, ignore_errors=True)


def checkpoint_step(path: Path) -> int:
    """The training step a complete checkpoint was saved at."""
    return read_checkpoint_info(path).step


def checkpoint_parts(path: Path) -> list[str]:
    """The names of a checkpoint's parts, in the order they were prepared."""
    meta = json.loads((path / TRAINER_FILE).read_text())
    return list(meta.get("parts", DEFAULT_PARTS))


def load_training_state(
    accelerator, path: Path, parts: list[str], grids: list[str]
) -> ResumedState:
    """Restore what save_training_state wrote into the prepared objects; `parts` and
    `grids`: the names the resuming task has, which must be the checkpoint's."""
    saved = checkpoint_parts(path)
    if saved != list(parts):
        raise ValueError(
            f"{path} holds parts {saved}, this run's task has {list(parts)}: resume a "
            "checkpoint of the same train.task (a release is exported from its tokenizer)"
        )
    accelerator.load_state(str(path))
    rank = accelerator.process_index
    data_file = path / f"data_rank{rank}.json"
    data_state = json.loads(data_file.read_text()) if data_file.is_file() else None
    search_states = {}
    for grid in grids:
        search_file = path / _search_file(grid, rank)
        if not search_file.is_file() and len(grids) == 1:
            search_file = path / f"search_rank{rank}.safetensors"  # before grids had names
        if search_file.is_file():
            search_states[grid] = load_file(str(search_file))
    return ResumedState(
        step=checkpoint_step(path), data_state=data_state, search_states=search_states
    )


def load_checkpoint_weights(path: Path, part: str = "tokenizer") -> dict[str, torch.Tensor]:
    """One part's weights from a training checkpoint, with any DDP `module.` prefix removed."""
    names = checkpoint_parts(path)
    if part not in names:
        raise KeyError(f"{path}: no part {part!r} in this checkpoint (parts: {names})")
    meta = json.loads((path / TRAINER_FILE).read_text())
    files = meta.get("weights") or {p: part_weights_file(i) for i, p in enumerate(names)}
    weights_file = path / files[part]
    if not weights_file.is_file():
        raise FileNotFoundError(f"{path}: no {weights_file.name} ({part}) in this checkpoint")
    weights = load_file(str(weights_file))
    return {k.removeprefix("module."): v for k, v in weights.items()}


def _fsync_tree(directory: Path) -> None:
    """fsync every file and folder under directory, the folders after their contents."""
    for folder, _, files in os.walk(directory, topdown=False):
        for name in files:
            fsync_path(os.path.join(folder, name))
        fsync_path(folder)
