"""The release format: a directory of config.json + model.safetensors, no pickle, and the
fingerprint that says which codes a release gives.

config.json holds {"format": "vq-tokenizer", "format_version": 1, "model": {...},
"quantizer": {...}, "data": {...}, "codebook_size", "downsample_factor",
"weights_sha256"}. `weights_sha256` (weights_fingerprint of the file's tensors) was added
within version 1: readers of version 1 ignore keys they do not know, and a release
written before it (without the key) is read as before, unchecked.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tokenizer.atomic import atomic_path, write_json
from tokenizer.fingerprint import weights_fingerprint

RELEASE_CONFIG = "config.json"
RELEASE_WEIGHTS = "model.safetensors"
RELEASE_FORMAT = "vq-tokenizer"
RELEASE_VERSION = 1  # what write_release writes
READABLE_VERSIONS = (1,)  # what read_release reads

# Config values that steer training only, or how the nearest code is searched for, never
# which code an image gets from given weights; every other value of the release config
# (model architecture, codebook_size, code_dim, lookup_dim, l2_normalize, ema, data
# preprocessing, and any key added later) is part of the fingerprint. Listing what is
# left out, rather than what is put in, means a new key is covered until someone shows
# it cannot change the codes; tests/test_release.py checks every key listed here against
# real codes.
# - beta, ema_decay, ema_epsilon, init, kmeans_iters, restart_*: losses and codebook
#   updates, which never run at inference (the codebook they produced is in the weights).
# - search, search_chunk, ivf_*: a Tokenizer always searches exactly (tokenizer/api.py
#   turns faiss-ivf into exact faiss), and the exact backends and chunk sizes all return
#   the nearest code; they can only disagree where two codes are equally near within
#   fp32 rounding, which no index could rely on anyway.
INFERENCE_NEUTRAL_KEYS = frozenset(
    {
        "quantizer.beta",
        "quantizer.ema_decay",
        "quantizer.ema_epsilon",
        "quantizer.init",
        "quantizer.kmeans_iters",
        "quantizer.restart_threshold",
        "quantizer.restart_unused_steps",
        "quantizer.search",
        "quantizer.search_chunk",
        "quantizer.ivf_nlist",
        "quantizer.ivf_nprobe",
        "quantizer.ivf_rebuild_every",
        "quantizer.ivf_recall_samples",
    }
)

# Keys of config.json that describe the file, not the tokenizer: not fingerprinted.
_FILE_KEYS = ("format", "format_version", "weights_sha256")


@dataclass
class Release:
    config: dict[str, Any]  # the config.json body
    weights: dict[str, torch.Tensor]
    weights_sha256: str  # weights_fingerprint(weights), checked against config.json


def code_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a release config that decides the codes: all of it but the file's own
    keys and INFERENCE_NEUTRAL_KEYS."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if key in _FILE_KEYS:
            continue
        if isinstance(value, Mapping):
            out[key] = {
                k: v for k, v in value.items() if f"{key}.{k}" not in INFERENCE_NEUTRAL_KEYS
            }
        else:
            out[key] = value
    return out


def release_fingerprint(config: Mapping[str, Any], weights_sha256: str) -> str:
    """sha256 of everything that decides the codes: code_config(config) and the weights
    (their digest, weights_fingerprint: a cast to another dtype changes it)."""
    digest = hashlib.sha256(b"vq-tokenizer fingerprint 2\n")
    digest.update(json.dumps(code_config(config), sort_keys=True).encode())
    digest.update(f"\n{weights_sha256}".encode())
    return digest.hexdigest()


def write_release(
    directory: str | Path,
    config: Mapping[str, Any],
    state: Mapping[str, torch.Tensor],
    release_format: str = RELEASE_FORMAT,
) -> Path:
    """Write config.json + model.safetensors (each to a temporary name, then renamed,
    weights first) with the permissions the user's umask gives new files. A prior's
    release is the same files under its own `release_format`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    body = {
        **config,
        "format": release_format,
        "format_version": RELEASE_VERSION,
        "weights_sha256": weights_fingerprint(tensors),
    }
    with atomic_path(directory / RELEASE_WEIGHTS) as tmp:
        save_file(tensors, str(tmp))
    write_json(directory / RELEASE_CONFIG, body)
    return directory


def read_release(directory: str | Path, release_format: str = RELEASE_FORMAT) -> Release:
    """Config and weights of a release directory of `release_format`; safetensors + JSON,
    nothing unpickled. A file that is not what it should be is refused with its name."""
    directory = Path(directory)
    what = "tokenizer" if release_format == RELEASE_FORMAT else release_format
    for name in (RELEASE_CONFIG, RELEASE_WEIGHTS):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory}: not a {what} release (missing {name})")
    config = _read_config(directory / RELEASE_CONFIG, release_format)
    weights_path = directory / RELEASE_WEIGHTS
    try:
        weights = load_file(str(weights_path))
    except SafetensorError as err:
        raise ValueError(
            f"{weights_path}: not a readable safetensors file ({err}); truncated or corrupt?"
        ) from None
    digest = weights_fingerprint(weights)
    recorded = config.get("weights_sha256")
    if recorded is not None and recorded != digest:
        raise ValueError(
            f"{weights_path}: its tensors hash to {digest[:12]}..., but "
            f"{RELEASE_CONFIG} records {str(recorded)[:12]}...: the file is corrupt or "
            "comes from another release"
        )
    return Release(config=config, weights=weights, weights_sha256=digest)


def check_weights_match(
    expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], source: str
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


def _read_config(path: Path, release_format: str) -> dict[str, Any]:
    try:
        config = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    if config.get("format") != release_format:
        raise ValueError(f"{path}: format is {config.get('format')!r}, expected {release_format!r}")
    version = config.get("format_version")
    # bool is an int in Python: `true` must not pass for version 1.
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        readable = ", ".join(str(v) for v in READABLE_VERSIONS)
        newer = isinstance(version, int) and version > max(READABLE_VERSIONS)
        hint = ": written by a newer vq-tokenizer, upgrade to read it" if newer else ""
        raise ValueError(
            f"{path}: format_version {version!r} is not one this code reads "
            f"(it reads format_version {readable}){hint}"
        )
    return config
