"""Codebook collapse warnings: relative to what a window's vectors could reach, per grid,
at the start of a collapse and every REPEAT_EVERY windows, and its end said once."""

import torch
from accelerate import Accelerator

from tokenizer.config import load_config
from tokenizer.training.collapse import REPEAT_EVERY, CollapseWatch, find_collapse
from tokenizer.training.log import TrainLog
from tokenizer.training.task import StepOutput


def _counts(*hits: int, size: int) -> torch.Tensor:
    counts = torch.zeros(size)
    counts[: len(hits)] = torch.tensor(hits, dtype=torch.float32)
    return counts  # (K,)


def test_few_codes_taking_every_vector_is_a_collapse():
    collapse = find_collapse("top", _counts(900, 100, size=512), threshold=0.1)
    assert collapse is not None
    assert (collapse.grid, collapse.used, collapse.reach, collapse.vectors) == ("top", 2, 512, 1000)


def test_the_bar_is_relative_to_the_vectors_a_window_had():
    # 60 vectors over K=1024 can use at most 60 codes: 30 of them is healthy, 5 is not.
    assert find_collapse("tokens", _counts(*[2] * 30, size=1024), threshold=0.1) is None
    assert find_collapse("tokens", _counts(*[12] * 5, size=1024), threshold=0.1) is not None
    # Exactly at the bar is not under it; 0 turns the check off; an empty window says nothing.
    assert find_collapse("tokens", _counts(*[1] * 6, size=60), threshold=0.1) is None
    assert find_collapse("tokens", _counts(60, size=1024), threshold=0.0) is None
    assert find_collapse("tokens", torch.zeros(1024), threshold=0.1) is None


def test_a_long_collapse_warns_at_its_start_every_few_windows_and_says_its_end():
    watch = CollapseWatch(threshold=0.1, window_steps=50)
    dead = {"top": _counts(1000, size=512), "bottom": _counts(*[4] * 512, size=512)}
    said = [watch.check(50 * (i + 1), dead) for i in range(REPEAT_EVERY + 1)]
    warned = [i for i, (warnings, _) in enumerate(said) if warnings]
    assert warned == [0, REPEAT_EVERY]  # not on every log line
    assert all(len(w) == 1 and "'top'" in w[0] for w, _ in said if w)  # bottom is healthy
    assert watch.collapsed() == ["top"]
    warnings, recoveries = watch.check(10_000, {"top": _counts(*[2] * 512, size=512)})
    assert warnings == [] and recoveries == [
        "step 10000: codebook of grid 'top' no longer collapsed"
    ]
    assert watch.collapsed() == [] and watch.check(10_050, dead)[0]  # a new collapse warns again


def test_train_log_warns_naming_the_grid(tmp_path, caplog):
    cfg = load_config(overrides=[f"run.dir={tmp_path}", "logging.tensorboard=false",
                                 "logging.every=50", "train.max_steps=100"])  # fmt: skip
    log = TrainLog(cfg, Accelerator(cpu=True))
    for _ in range(2):
        log.window.add(StepOutput(scalars={"loss": torch.tensor(1.0)}, per_image={},
                                  code_counts={"bottom": _counts(64, 64, size=512)},
                                  num_samples=2))  # fmt: skip
    with caplog.at_level("INFO", logger="tokenizer.training.loop"):
        log.metrics(50, {})
    log.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert warnings[0].startswith("step 50: codebook collapse on grid 'bottom': 2 of 512 codes")
    assert "256 vectors of the last 50 steps" in warnings[0]
    assert "logging.collapse_usage=0.1" in warnings[0]
