"""Checkpoint crash safety and lineage, with a real (single-process) Accelerator: a kill at
any point of a save leaves a complete, loadable checkpoint, and pruning never deletes
another branch's checkpoints."""

import json
import logging
import os
import shutil

import pytest
import torch
from accelerate import Accelerator

import tokenizer.training.checkpoint as checkpoint_module
from tokenizer.training.checkpoint import (
    checkpoint_parts,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint_weights,
    load_training_state,
    read_checkpoint_info,
    resolve_resume,
    save_training_state,
)


class Killed(BaseException):
    """The process dying at this point: nothing after it runs, nothing catches it."""


@pytest.fixture(scope="module")
def engine():
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model


def _save(engine, run_dir, step, keep_last=2, parent=None, value=None):
    """Save at `step` with every weight set to `value` (default: the step)."""
    accelerator, model = engine
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(step if value is None else value))
    return save_training_state(
        accelerator,
        {"tokenizer": model},
        run_dir,
        step,
        {"rank": 0, "step": step},
        keep_last,
        parent=parent,
    )


def _loaded_value(engine, path) -> float:
    accelerator, model = engine
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(-1.0)
    state = load_training_state(accelerator, path, ["tokenizer"], [])
    values = {float(v) for p in model.parameters() for v in p.detach().flatten()}
    assert len(values) == 1, values
    assert state.data_state["step"] == state.step
    return values.pop()


def _names(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_saves_prune_to_keep_last_and_load_back(engine, tmp_path):
    parent = None
    for step in (1, 2, 3):
        parent = _save(engine, tmp_path, step, keep_last=2, parent=parent)
    assert _names(tmp_path) == ["step_00000002", "step_00000003"]
    info = read_checkpoint_info(latest_checkpoint(tmp_path))
    assert (info.step, info.generation, info.lineage) == (3, 3, (1, 2))
    assert _loaded_value(engine, resolve_resume("auto", tmp_path)) == 3.0


def _replace_failing(target_name: str, source_suffix: str):
    """An os.replace that kills the process on the rename of a checkpoint folder."""
    real = os.replace

    def replace(src, dst):
        src, dst = str(src), str(dst)
        if os.path.basename(dst) == target_name and src.endswith(source_suffix):
            raise Killed(f"killed renaming {src} -> {dst}")
        return real(src, dst)

    return replace


def _rmtree_failing_on_old():
    """An rmtree that kills the process as it deletes an existing `.old` copy."""
    real = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if str(path).endswith(".old") and os.path.isdir(path):
            raise Killed(f"killed deleting {path}")
        return real(path, *args, **kwargs)

    return rmtree


def _save_state_killed_midway(accelerator):
    real = accelerator.save_state

    def save_state(output_dir, **kwargs):
        real(output_dir, **kwargs)  # the files are there, trainer.json never will be
        raise Killed("killed after save_state")

    return save_state


# Where the re-save of step 5 dies, and which weights the surviving checkpoint holds:
# the first save's (5.0) until the new copy is renamed into place, then the new (7.0).
KILL_POINTS = {
    "writing": 5.0,
    "moving the old copy aside": 5.0,
    "between the two renames": 5.0,
    "deleting the old copy": 7.0,
}


@pytest.mark.parametrize("where", KILL_POINTS)
def test_a_kill_while_re_saving_a_step_leaves_a_complete_checkpoint(
    engine, tmp_path, monkeypatch, where
):
    # keep_last=1 and a resume at the end, which re-saves the step it resumed from.
    first = _save(engine, tmp_path, 5, keep_last=1)
    with monkeypatch.context() as patch:
        if where == "writing":
            patch.setattr(engine[0], "save_state", _save_state_killed_midway(engine[0]))
        elif where == "moving the old copy aside":
            patch.setattr(os, "replace", _replace_failing("step_00000005.old", "step_00000005"))
        elif where == "between the two renames":
            patch.setattr(os, "replace", _replace_failing("step_00000005", ".tmp"))
        else:
            patch.setattr(checkpoint_module.shutil, "rmtree", _rmtree_failing_on_old())
        with pytest.raises(Killed):
            _save(engine, tmp_path, 5, keep_last=1, parent=first, value=7.0)
    found = list_checkpoints(tmp_path)
    assert len(found) == 1 and read_checkpoint_info(found[0]).step == 5
    resumed = resolve_resume("auto", tmp_path)
    assert resumed == found[0]
    assert _loaded_value(engine, resumed) == KILL_POINTS[where]
    if where == "between the two renames":
        assert resumed.name == "step_00000005.old"  # the previous copy counts as step 5
    # The next save, resumed from what survived, cleans up: one step_5, no leftovers.
    _save(engine, tmp_path, 5, keep_last=1, parent=resumed, value=9.0)
    assert _names(tmp_path) == ["step_00000005"]
    assert _loaded_value(engine, latest_checkpoint(tmp_path)) == 9.0


def test_explicit_resume_from_an_older_checkpoint_keeps_the_newer_branch(engine, tmp_path, caplog):
    parent = None
    for step in (10, 20, 30, 40):  # branch A
        parent = _save(engine, tmp_path, step, keep_last=3, parent=parent)
    assert _names(tmp_path) == ["step_00000020", "step_00000030", "step_00000040"]
    older = resolve_resume(str(tmp_path / "checkpoints" / "step_00000020"), tmp_path)

    # Branch B resumes from step 20, with keep_last=1: it prunes its own ancestor only.
    with caplog.at_level(logging.WARNING, logger="tokenizer.training.checkpoint"):
        b25 = _save(engine, tmp_path, 25, keep_last=1, parent=older, value=25.5)
    assert _names(tmp_path) == ["step_00000025", "step_00000030", "step_00000040"]
    assert "step_00000030, step_00000040" in caplog.text and "another branch" in caplog.text
    # resume=auto continues the branch written last, not the highest step.
    assert resolve_resume("auto", tmp_path) == b25

    # B reaches a step A saved: A's folder is kept aside, out of resume's sight.
    b30 = _save(engine, tmp_path, 30, keep_last=1, parent=b25, value=30.5)
    assert _names(tmp_path) == ["step_00000030", "step_00000030.branch-g3", "step_00000040"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000040", "step_00000030"]
    assert _loaded_value(engine, resolve_resume("auto", tmp_path)) == 30.5
    assert _loaded_value(engine, tmp_path / "checkpoints" / "step_00000030.branch-g3") == 30.0
    assert _loaded_value(engine, tmp_path / "checkpoints" / "step_00000040") == 40.0
    assert read_checkpoint_info(b30).lineage == (1, 2, 5)  # A: steps 10, 20; B: step 25


def test_an_interrupted_save_is_not_a_checkpoint(engine, tmp_path):
    _save(engine, tmp_path, 3)
    tmp = tmp_path / "checkpoints" / "step_00000004.tmp"
    shutil.copytree(tmp_path / "checkpoints" / "step_00000003", tmp)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003"]
    with pytest.raises(FileNotFoundError, match="interrupted save"):
        resolve_resume(str(tmp), tmp_path)
    _save(engine, tmp_path, 5)
    assert _names(tmp_path) == ["step_00000003", "step_00000005"]  # the leftover is gone


def test_search_state_per_grid_and_the_old_single_grid_name(engine, tmp_path):
    accelerator, model = engine
    state = {"centroids": torch.arange(6.0).reshape(3, 2)}
    path = save_training_state(accelerator, {"tokenizer": model}, tmp_path, 1, {"step": 1}, 2,
                               search_states={"top": state, "bottom": {}})  # fmt: skip
    assert sorted(p.name for p in path.glob("search_*")) == ["search_top_rank0.safetensors"]
    loaded = load_training_state(accelerator, path, ["tokenizer"], ["top", "bottom"])
    assert loaded.search_states.keys() == {"top"}
    torch.testing.assert_close(loaded.search_states["top"]["centroids"], state["centroids"])
    # A checkpoint written before grids had names: one file for the one grid.
    path = save_training_state(accelerator, {"tokenizer": model}, tmp_path, 2, {"step": 2}, 2,
                               search_states={"tokens": state})  # fmt: skip
    os.replace(path / "search_tokens_rank0.safetensors", path / "search_rank0.safetensors")
    loaded = load_training_state(accelerator, path, ["tokenizer"], ["tokens"])
    torch.testing.assert_close(loaded.search_states["tokens"]["centroids"], state["centroids"])


def test_parts_are_named_and_old_checkpoints_hold_the_tokenizer(engine, tmp_path):
    accelerator, model = engine
    path = _save(engine, tmp_path, 1)
    assert checkpoint_parts(path) == ["tokenizer"]
    meta = json.loads((path / "trainer.json").read_text())
    del meta["parts"]  # as written before parts had names
    (path / "trainer.json").write_text(json.dumps(meta))
    assert checkpoint_parts(path) == ["tokenizer"]
    with pytest.raises(ValueError, match=r"holds parts \['tokenizer'\].*\['tokenizer', 'critic'\]"):
        load_training_state(accelerator, path, ["tokenizer", "critic"], [])
    with pytest.raises(KeyError, match="no part 'critic'"):
        load_checkpoint_weights(path, "critic")
