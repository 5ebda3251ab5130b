"""Nearest-neighbour search over a codebook: one interface, several backends.

Every backend takes queries (N, d) and a codebook (K, d) and returns, per query, the
index of the nearest code and its squared L2 distance, both computed in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

# A (rows, K) distance tile of about this many floats (256 MB in fp32) bounds the
# search's memory whatever N and K are.
_TILE_FLOATS = 64 * 1024 * 1024


@dataclass
class SearchResult:
    indices: Tensor  # (N,) int64
    distances: Tensor  # (N,) float32 squared L2 distance to the chosen code


class NearestNeighbourSearch(Protocol):
    def __call__(self, queries: Tensor, codebook: Tensor) -> SearchResult: ...


class TorchSearch:
    """Exact search in plain torch, chunked over query rows.

    Only one (chunk_rows, K) tile of distances exists at a time, never the full (N, K)
    matrix, so a 256k-code codebook fits next to a large batch.
    """

    def __init__(self, chunk_size: int = 0) -> None:
        if chunk_size < 0:
            raise ValueError(f"chunk_size must be >= 0 (0 = auto), got {chunk_size}")
        self.chunk_size = chunk_size

    def rows_per_chunk(self, codebook_size: int) -> int:
        if self.chunk_size > 0:
            return self.chunk_size
        return max(1, _TILE_FLOATS // max(1, codebook_size))

    @torch.no_grad()
    def __call__(self, queries: Tensor, codebook: Tensor) -> SearchResult:
        if queries.ndim != 2 or codebook.ndim != 2 or queries.shape[1] != codebook.shape[1]:
            raise ValueError(
                f"expected queries (N, d) and codebook (K, d), got {tuple(queries.shape)} "
                f"and {tuple(codebook.shape)}"
            )
        # bf16 distances would pick the wrong code for close pairs: the codebook buffers
        # are fp32 and the search stays fp32 whatever autocast the caller runs under.
        with torch.autocast(device_type=queries.device.type, enabled=False):
            x = queries.float()  # (N, d)
            e = codebook.float()  # (K, d)
            n, k = x.shape[0], e.shape[0]
            e_sq = e.pow(2).sum(dim=1)  # (K,)
            e_t = e.t()  # (d, K)
            indices = torch.empty(n, dtype=torch.int64, device=x.device)  # (N,)
            distances = torch.empty(n, dtype=torch.float32, device=x.device)  # (N,)
            rows = self.rows_per_chunk(k)
            for start in range(0, n, rows):
                chunk = x[start : start + rows]  # (r, d)
                # ||e||^2 - 2 x.e: ||x||^2 is constant per row, so it does not change the
                # argmin and is added to the chosen distance only, saving an (r, K) add.
                tile = torch.addmm(e_sq.unsqueeze(0), chunk, e_t, beta=1.0, alpha=-2.0)  # (r, K)
                best, arg = tile.min(dim=1)  # (r,), (r,)
                x_sq = chunk.pow(2).sum(dim=1)  # (r,)
                # The expansion can cancel to a tiny negative number; a distance is >= 0.
                distances[start : start + rows] = (best + x_sq).clamp_min_(0.0)
                indices[start : start + rows] = arg
        return SearchResult(indices=indices, distances=distances)


_BACKENDS = ("torch",)


def build_search(name: str, chunk_size: int = 0) -> NearestNeighbourSearch:
    """The search backend a config names (`quantizer.search`)."""
    if name == "torch":
        return TorchSearch(chunk_size=chunk_size)
    raise ValueError(f"unknown search backend {name!r}; choices: {', '.join(_BACKENDS)}")
