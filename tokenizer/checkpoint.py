"""Training state, for resume (the release format is in release.py).

A training checkpoint is a folder `run_dir/checkpoints/step_XXXXXXXX/`, written under a
`.tmp` name and renamed once every rank has finished writing, so a killed run never
leaves a checkpoint that looks complete but is not. It holds Accelerate's state (model,
optimiser, per-rank RNG, registered objects such as the LR scheduler), `trainer.json`
(the step), one `data_rank{r}.json` per rank (that rank's stream position) and, for a
search backend with state (faiss-ivf), one `search_rank{r}.safetensors` per rank.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file

CHECKPOINT_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d{8})$")

# Whole weights beside DeepSpeed's sharded state, in the release's file format.
WEIGHTS_FILE = "model.safetensors"


@dataclass
class ResumedState:
    step: int
    data_state: dict[str, Any] | None  # this rank's stream position, None if absent
    search_state: dict[str, torch.Tensor]  # this rank's search backend state, {} if absent


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (a `.tmp` folder is an interrupted save)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_resume(resume: str | None, run_dir: str | Path) -> Path | None:
    """`auto` -> newest checkpoint of run_dir (None when there is none); a path -> that path."""
    if resume is None or resume in ("", "none", "None"):
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if not (path / "trainer.json").is_file():
        raise FileNotFoundError(f"resume={resume}: not a complete checkpoint (no trainer.json)")
    return path


def save_training_state(
    accelerator,
    model,
    run_dir: str | Path,
    step: int,
    data_state: dict[str, Any],
    keep_last: int,
    search_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Every rank calls this at the same step; returns the final checkpoint path."""
    root = checkpoint_root(run_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # DeepSpeed writes its own sharded format; also keep whole weights (gathered
        # across ranks under ZeRO-3, which every rank must join) so a release can be
        # exported from any checkpoint without DeepSpeed.
        weights = accelerator.get_state_dict(model)
        if accelerator.is_main_process:
            tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
            save_file(tensors, str(tmp / WEIGHTS_FILE))
    rank = accelerator.process_index
    _write_json(tmp / f"data_rank{rank}.json", data_state)
    if search_state:
        save_file(search_state, str(tmp / f"search_rank{rank}.safetensors"))
    if accelerator.is_main_process:
        _write_json(tmp / "trainer.json", {"step": step, "world_size": accelerator.num_processes})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def checkpoint_step(path: Path) -> int:
    """The training step a complete checkpoint was saved at."""
    return int(json.loads((path / "trainer.json").read_text())["step"])


def load_training_state(accelerator, path: Path) -> ResumedState:
    accelerator.load_state(str(path))
    data_file = path / f"data_rank{accelerator.process_index}.json"
    data_state = json.loads(data_file.read_text()) if data_file.is_file() else None
    search_file = path / f"search_rank{accelerator.process_index}.safetensors"
    search_state = load_file(str(search_file)) if search_file.is_file() else {}
    return ResumedState(
        step=checkpoint_step(path), data_state=data_state, search_state=search_state
    )


def load_checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    """Model weights of a training checkpoint, with any DDP `module.` prefix removed."""
    weights_file = path / WEIGHTS_FILE
    if not weights_file.is_file():
        raise FileNotFoundError(f"{path}: no {WEIGHTS_FILE} in this checkpoint")
    weights = load_file(str(weights_file))
    return {k.removeprefix("module."): v for k, v in weights.items()}


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)
