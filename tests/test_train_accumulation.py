"""Gradient accumulation through the real training loop (in-process): a training step is
grad_accum_steps micro-batches, and everything counted in steps (the codebook usage
window, restart windows, the learning-rate schedule, the data record) counts
optimiser steps, not forwards."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from training_helpers import make_shards, write_config

import tokenizer.training.loop as train_module
import tokenizer.training.tasks.tokenizer as tokenizer_task
from tokenizer.config import load_config
from tokenizer.training.optim import warmup_cosine

pytestmark = pytest.mark.slow

ACCUM, STEPS, EVERY = 2, 4, 2


def test_accumulated_steps_count_optimiser_steps(tmp_path: Path, monkeypatch) -> None:
    shards = make_shards(tmp_path / "shards")
    run_dir = tmp_path / "run"
    cfg = load_config(
        write_config(
            tmp_path,
            shards,
            run_dir,
            f"train.grad_accum_steps={ACCUM}",
            f"train.max_steps={STEPS}",
            f"logging.every={EVERY}",
            "logging.log_keys=true",
            "logging.num_images=0",
            "data.eval_shards=null",
            "checkpoint.every=0",
            "quantizer.init=data",
        )
    )
    # Record the codes of every training forward as the model computes them.
    forwards: list[torch.Tensor] = []
    build_model = tokenizer_task.build_model

    def recording_build_model(config):
        model = build_model(config)

        def hook(module, args, out) -> None:
            if module.training:
                forwards.append(out.indices.detach().clone())

        model.quantizer.register_forward_hook(hook)
        return model

    monkeypatch.setattr(tokenizer_task, "build_model", recording_build_model)
    result = train_module.train(cfg)

    # 4 optimiser steps of 2 micro-batches of 8 images: 8 forwards, 16 images a step.
    assert len(forwards) == STEPS * ACCUM
    assert all(f.shape[0] == cfg.train.batch_size for f in forwards)
    keys = [line.split("\t") for line in (run_dir / "keys" / "rank0.tsv").read_text().split("\n")]
    per_step = Counter(int(step) for step, *_ in keys if step)
    assert per_step == {s: ACCUM * cfg.train.batch_size for s in range(1, STEPS + 1)}

    q = result.model.quantizer
    assert q.forwards_per_step == ACCUM
    stats = q.codebook_stats(EVERY)
    assert (stats.step, stats.forwards) == (STEPS, STEPS * ACCUM)

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = {row["step"]: row for row in rows}
    assert sorted(logged) == list(range(EVERY, STEPS + 1, EVERY))
    factor = warmup_cosine(cfg.train.warmup_steps, cfg.train.max_steps, cfg.train.min_lr_ratio)
    gaps = []
    for step, row in logged.items():
        # The schedule stepped once per optimiser step.
        assert row["lr"] == pytest.approx(cfg.train.lr * factor(step))
        # Usage over the last EVERY optimiser steps: the codes of their EVERY * ACCUM
        # micro-batches, counted by hand.
        window = forwards[(step - EVERY) * ACCUM : step * ACCUM]
        by_hand = (
            torch.cat([f.flatten() for f in window]).unique().numel() / cfg.quantizer.codebook_size
        )
        assert row["codebook/window_usage"] == pytest.approx(by_hand), step
        # The trainer's own per-window count of this rank's codes agrees.
        assert row["codebook/usage"] == pytest.approx(by_hand), step
        last_forwards = torch.cat([f.flatten() for f in window[-EVERY:]]).unique().numel()
        gaps.append(by_hand - last_forwards / cfg.quantizer.codebook_size)
    # The check has teeth: counting EVERY forwards instead would see fewer codes.
    assert max(gaps) > 0
