"""Run directory (config.yaml + checkpoints) -> release directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizer.api import Tokenizer
from tokenizer.config import load_config
from tokenizer.training.checkpoint import (
    checkpoint_step,
    latest_checkpoint,
    load_checkpoint_weights,
)


@dataclass
class ExportResult:
    directory: Path
    checkpoint: Path
    step: int
    fingerprint: str  # Tokenizer.fingerprint of the release: what index manifests record


def export_release(run_dir: Path, output: Path, checkpoint: Path | None = None) -> ExportResult:
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{run_dir}: no config.yaml - is this a run directory?")
    checkpoint = checkpoint or latest_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint under checkpoints/")
    cfg = load_config(config_file)
    # search="torch": exporting never encodes, so it needs no faiss whatever the run used.
    weights = load_checkpoint_weights(checkpoint)
    tok = Tokenizer.from_config(cfg, weights, str(checkpoint), search="torch")
    tok.save_pretrained(output)
    return ExportResult(
        directory=output,
        checkpoint=checkpoint,
        step=checkpoint_step(checkpoint),
        fingerprint=tok.fingerprint,
    )
