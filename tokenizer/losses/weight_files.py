"""Reading a loss network's weights from a file that users bring: a PyTorch state dict
(.pth / .pt, read with `weights_only=True`) or a .safetensors. Nothing else is unpickled.

Errors name the file and, for a wrong layout, the missing, unexpected or mismatched keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file


class WeightsFileError(ValueError):
    """A weights file is missing, unreadable, or does not hold the keys a network needs."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The file's tensors by key, on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(f"{path}: no such file")
    try:
        if path.suffix == ".safetensors":
            loaded = load_file(str(path), device="cpu")
        else:
            # weights_only: tensors and plain containers only; any other pickled object
            # is refused, so a file from elsewhere cannot run code here.
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    # Reading can fail in many ways (truncated zip, a pickle weights_only refuses, a bad
    # safetensors header); all of them mean the same to the user: this file is unusable.
    except Exception as err:
        raise WeightsFileError(
            f"{path}: not a readable state dict ({type(err).__name__}: {err})"
        ) from None
    if not isinstance(loaded, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise WeightsFileError(
            f"{path}: holds a {type(loaded).__name__}, not a state dict of named tensors"
        )
    return dict(loaded)


def _listed(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def select_weights(
    found: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Size],
    source: str,
    prefix: str,
    what: str,
) -> dict[str, torch.Tensor]:
    """The `expected` keys of `found`, each checked for its shape, as float32.

    Keys outside `prefix` are ignored (torchvision's file also holds the classifier);
    keys inside it that the network lacks are errors, since they mean another layout
    (vgg16_bn's running statistics, say).
    """
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k.startswith(prefix) and k not in expected]
    mismatched = [
        f"{k} {tuple(found[k].shape)} (expected {tuple(shape)})"
        for k, shape in expected.items()
        if k in found and found[k].shape != shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listed(unexpected)}")
    if mismatched:
        problems.append(f"mismatched shapes: {_listed(mismatched)}")
    if problems:
        raise WeightsFileError(f"{source}: not the {what}; " + "; ".join(problems))
    return {k: found[k].float() for k in expected}
