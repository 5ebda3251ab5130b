"""One hash of a set of named tensors: the release's `weights_sha256` and the number
ranks compare to find a codebook that drifted apart.

Only torch and hashlib: the release loader uses it and must not pull in a training
engine or torch.distributed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch


def weights_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 (hex) over the sorted tensor names, dtypes, shapes and bytes: the same
    weights give the same digest on any device, whatever file they came from."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        header = f"{name}|{str(tensor.dtype).removeprefix('torch.')}|{tuple(tensor.shape)}\n"
        digest.update(header.encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def fingerprint_int63(state: Mapping[str, torch.Tensor]) -> int:
    """weights_fingerprint as a non-negative 63-bit int: it fits an int64 tensor, so
    ranks can all-gather it."""
    return int(weights_fingerprint(state)[:16], 16) >> 1
