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
    load_extra_weights,
)
from tokenizer.training.weight_ema import ema_name


@dataclass
class ExportResult:
    directory: Path
    checkpoint: Path
    step: int
    fingerprint: str  # Tokenizer.fingerprint of the release: what index manifests record
    weights: str  # "ema" (the weight EMA, when train.ema_decay > 0) or "raw"


def export_release(
    run_dir: Path, output: Path, checkpoint: Path | None = None, raw: bool = False
) -> ExportResult:
    """A release of the checkpoint's tokenizer: its weight EMA when the run kept one
    (train.ema_decay > 0), unless `raw`; the last step's weights otherwise."""
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{run_dir}: no config.yaml - is this a run directory?")
    checkpoint = checkpoint or latest_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint under checkpoints/")
    cfg = load_config(config_file)
    if cfg.train.task != "tokenizer":
        raise ValueError(
            f"{run_dir} trained train.task={cfg.train.task!r}, not a tokenizer: nothing to "
            "release (a prior is sampled from its run directory: tools/sample_prior.py)"
        )
    # search="torch": exporting never encodes, so it needs no faiss whatever the run used.
    use_ema = cfg.train.ema_decay > 0 and not raw
    if use_ema:
        found = load_extra_weights(checkpoint, [ema_name("tokenizer")])
        if not found:
            raise FileNotFoundError(
                f"{checkpoint}: train.ema_decay is {cfg.train.ema_decay} but the checkpoint "
                f"holds no {ema_name('tokenizer')}.safetensors; export the raw weights (--raw)"
            )
        weights = found[ema_name("tokenizer")]
    else:
        weights = load_checkpoint_weights(checkpoint)
    tok = Tokenizer.from_config(cfg, weights, str(checkpoint), search="torch")
    tok.save_pretrained(output)
    return ExportResult(
        directory=output,
        checkpoint=checkpoint,
        step=checkpoint_step(checkpoint),
        fingerprint=tok.fingerprint,
        weights="ema" if use_ema else "raw",
    )
