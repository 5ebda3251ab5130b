"""A trained prior read back for sampling (tools/sample_prior.py): from its run directory
(config.yaml, prior.json and a checkpoint) or from a prior release, which
`export_prior_release` writes from a run."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tokenizer.config import Config, PriorConfig, load_config
from tokenizer.prior_release import is_release, read_prior_release, write_prior_release
from tokenizer.priors.grids import GridPriors, GridShape, build_grid_priors
from tokenizer.release import check_weights_match
from tokenizer.training.checkpoint import (
    checkpoint_step,
    latest_checkpoint,
    load_checkpoint_weights,
)
from tokenizer.training.tasks.prior import PRIOR, PRIOR_JSON


@dataclass
class PriorRun:
    model: GridPriors  # in eval mode
    tokenizer_sha256: str  # the fingerprint of the tokenizer whose codes it learnt
    checkpoint: Path  # the checkpoint folder, or the release directory it came from
    prior: PriorConfig  # the architecture it was built from


@dataclass
class PriorExport:
    directory: Path
    checkpoint: Path
    step: int
    tokenizer_sha256: str


def load_prior_run(
    path: str | Path, checkpoint: str | Path | None = None, device: str | torch.device = "cpu"
) -> PriorRun:
    """The prior of a prior release, or of a `train.task: prior` run directory from its
    newest checkpoint (or `checkpoint`)."""
    path = Path(path)
    if is_release(path):
        if checkpoint is not None:
            raise ValueError(f"{path} is a prior release: it has no checkpoints to choose from")
        release = read_prior_release(path)
        model = build_grid_priors(release.prior, release.grids)
        check_weights_match(model.state_dict(), release.weights, str(path))
        model.load_state_dict(release.weights)
        return PriorRun(model.to(device).eval(), release.tokenizer_sha256, path, release.prior)
    grids, sha, cfg = _run_record(path)
    found = Path(checkpoint) if checkpoint else latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"{path}: no checkpoint yet")
    model = build_grid_priors(cfg.prior, grids)
    model.load_state_dict(load_checkpoint_weights(found, PRIOR))
    return PriorRun(model.to(device).eval(), sha, found, cfg.prior)


def export_prior_release(
    run_dir: str | Path, output: str | Path, checkpoint: str | Path | None = None
) -> PriorExport:
    """A release of a prior run's checkpoint (default: the newest)."""
    run_dir = Path(run_dir)
    run = load_prior_run(run_dir, checkpoint)
    grids = list(run.model.grids.values())
    state = run.model.state_dict()
    write_prior_release(output, run.prior, grids, run.tokenizer_sha256, state)
    step = checkpoint_step(run.checkpoint)
    return PriorExport(Path(output), run.checkpoint, step, run.tokenizer_sha256)


def _run_record(run_dir: Path) -> tuple[list[GridShape], str, Config]:
    """A prior run's grids, tokenizer fingerprint and config."""
    record_file = run_dir / PRIOR_JSON
    if not record_file.is_file():
        raise FileNotFoundError(
            f"{run_dir}: no {PRIOR_JSON}; neither the run directory of a prior "
            "(launch/train_prior.py writes one) nor a prior release (tools/export_prior.py)"
        )
    record = json.loads(record_file.read_text())
    cfg = load_config(run_dir / "config.yaml")
    grids = [GridShape(g["name"], g["codebook_size"], tuple(g["shape"])) for g in record["grids"]]
    return grids, record["tokenizer_sha256"], cfg
