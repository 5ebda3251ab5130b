"""The release format: a directory of config.json + model.safetensors, no pickle."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

RELEASE_CONFIG = "config.json"
RELEASE_WEIGHTS = "model.safetensors"
RELEASE_FORMAT = "vq-tokenizer"
RELEASE_VERSION = 1


def write_release(
    directory: str | Path, config: dict[str, Any], state: dict[str, torch.Tensor]
) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, str(directory / RELEASE_WEIGHTS))
    body = {"format": RELEASE_FORMAT, "format_version": RELEASE_VERSION, **config}
    _write_json(directory / RELEASE_CONFIG, body)
    return directory


def read_release(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, weights) of a release directory; safetensors + JSON, nothing unpickled."""
    directory = Path(directory)
    for name in (RELEASE_CONFIG, RELEASE_WEIGHTS):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory}: not a tokenizer release (missing {name})")
    config = json.loads((directory / RELEASE_CONFIG).read_text())
    if config.get("format") != RELEASE_FORMAT:
        raise ValueError(
            f"{directory / RELEASE_CONFIG}: format is {config.get('format')!r}, "
            f"expected {RELEASE_FORMAT!r}"
        )
    return config, load_file(str(directory / RELEASE_WEIGHTS))


def check_weights_match(
    expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], source: str
) -> None:
    """Refuse weights that do not fit the model built from the config, naming the tensor."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        raise ValueError(
            f"{source}: tensor '{missing[0]}' is missing from the weights "
            f"({len(missing)} missing in all) - config and weights disagree"
        )
    if unexpected:
        raise ValueError(
            f"{source}: tensor '{unexpected[0]}' is not part of the model "
            f"built from the config ({len(unexpected)} unexpected in all)"
        )
    for name, tensor in expected.items():
        if tuple(found[name].shape) != tuple(tensor.shape):
            raise ValueError(
                f"{source}: tensor '{name}' has shape {tuple(found[name].shape)}, "
                f"the config gives {tuple(tensor.shape)}"
            )


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)
