"""A trained prior read back from its run directory (config.yaml, prior.json and a
checkpoint), for sampling: tools/sample_prior.py."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tokenizer.config import load_config
from tokenizer.priors.grids import GridPriors, GridShape, build_grid_priors
from tokenizer.training.checkpoint import latest_checkpoint, load_checkpoint_weights
from tokenizer.training.tasks.prior import PRIOR, PRIOR_JSON


@dataclass
class PriorRun:
    model: GridPriors  # in eval mode
    tokenizer_sha256: str  # the fingerprint of the tokenizer whose codes it learnt
    checkpoint: Path


def load_prior_run(
    run_dir: str | Path, checkpoint: str | Path | None = None, device: str | torch.device = "cpu"
) -> PriorRun:
    """The prior of a `train.task: prior` run, from its newest checkpoint (or `checkpoint`)."""
    run_dir = Path(run_dir)
    record_file = run_dir / PRIOR_JSON
    if not record_file.is_file():
        raise FileNotFoundError(
            f"{run_dir}: no {PRIOR_JSON}; not the run directory of a prior "
            "(launch/train_prior.py writes one)"
        )
    record = json.loads(record_file.read_text())
    cfg = load_config(run_dir / "config.yaml")
    grids = [GridShape(g["name"], g["codebook_size"], tuple(g["shape"])) for g in record["grids"]]
    path = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir)
    if path is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint yet")
    model = build_grid_priors(cfg.prior, grids)
    model.load_state_dict(load_checkpoint_weights(path, PRIOR))
    return PriorRun(model.to(device).eval(), record["tokenizer_sha256"], path)
