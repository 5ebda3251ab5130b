"""A prior's release: config.json + model.safetensors, the tokenizer release's files
(tokenizer/release.py) under their own format name, so that a prior trained here can be
sampled without its run directory or its training config.

config.json holds {"format": "vq-tokenizer-prior", "format_version": 1, "prior": {the
architecture keys of PriorConfig}, "grids": [{"name", "codebook_size", "shape"}, ...],
"tokenizer_sha256", "weights_sha256"}. `tokenizer_sha256` is the fingerprint of the
tokenizer whose codes the prior learnt: only that tokenizer decodes its samples.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from tokenizer.config import PriorConfig
from tokenizer.priors.grids import GridShape
from tokenizer.release import RELEASE_CONFIG, read_release, write_release

PRIOR_FORMAT = "vq-tokenizer-prior"
# PriorConfig keys that steer training only: a release leaves them out.
TRAINING_ONLY_KEYS = frozenset({"tokenizer", "unigram_samples"})


@dataclass
class PriorRelease:
    prior: PriorConfig  # the architecture (training-only keys at their defaults)
    grids: list[GridShape]  # coarsest first
    tokenizer_sha256: str
    weights: dict[str, torch.Tensor]


def is_release(directory: str | Path) -> bool:
    """A release directory (a run directory has config.yaml, never config.json)."""
    return (Path(directory) / RELEASE_CONFIG).is_file()


def write_prior_release(
    directory: str | Path,
    prior: PriorConfig,
    grids: list[GridShape],
    tokenizer_sha256: str,
    state: dict[str, torch.Tensor],
) -> Path:
    config = {
        "prior": {k: v for k, v in asdict(prior).items() if k not in TRAINING_ONLY_KEYS},
        "grids": [
            {"name": g.name, "codebook_size": g.codebook_size, "shape": list(g.shape)}
            for g in grids
        ],
        "tokenizer_sha256": tokenizer_sha256,
    }
    return write_release(directory, config, state, release_format=PRIOR_FORMAT)


def read_prior_release(directory: str | Path) -> PriorRelease:
    """A prior release; a config.json that lacks a key or has one this code does not
    know is refused with its name."""
    release = read_release(directory, release_format=PRIOR_FORMAT)
    path = Path(directory) / RELEASE_CONFIG
    config = release.config
    for key in ("prior", "grids", "tokenizer_sha256"):
        if key not in config:
            raise ValueError(f"{path}: no {key!r}")
    known = {f.name for f in fields(PriorConfig)} - TRAINING_ONLY_KEYS
    unknown = sorted(set(config["prior"]) - known)
    if unknown:
        raise ValueError(f"{path}: prior.{unknown[0]} is not a prior architecture key")
    return PriorRelease(
        prior=PriorConfig(**config["prior"]),
        grids=[_grid(g, path) for g in config["grids"]],
        tokenizer_sha256=str(config["tokenizer_sha256"]),
        weights=release.weights,
    )


def _grid(entry: Any, path: Path) -> GridShape:
    try:
        return GridShape(str(entry["name"]), int(entry["codebook_size"]), tuple(entry["shape"]))
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"{path}: grid {entry!r} needs a name, a codebook_size and a shape"
        ) from None
