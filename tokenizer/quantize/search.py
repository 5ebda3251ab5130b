"""Nearest-neighbour search over a codebook: the interface and the exact backends.

Every backend takes queries (N, d) and a codebook (K, d) and returns, per query, the
index of the nearest code and its squared L2 distance, both computed in fp32.

- TorchSearch ("torch"): exact, chunked matmul; runs wherever torch runs.
- FaissSearch ("faiss"): exact brute force in faiss, on CPU or (with a GPU build of
  faiss) on CUDA.

The approximate backend is in ivf.py; backends.py builds the one a config names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from tokenizer.quantize.faiss_support import (
    faiss_blas_path,
    faiss_has_gpu,
    import_faiss,
    shared_gpu_resources,
)

# A (rows, K) distance tile of about this many floats bounds the torch search's memory
# whatever N and K are. On CPU a 16 MB tile, written and read back while still in cache,
# measured 2-3x faster than a 256 MB one (N=16384, K from 512 to 262144, d from 8 to
# 256, 2 cores: 336 -> 123 ms at K=16384, d=8); a GPU wants big tiles to stay busy.
_TILE_FLOATS = {"cpu": 4 * 1024 * 1024, "cuda": 64 * 1024 * 1024}


@dataclass
class SearchResult:
    indices: Tensor  # (N,) int64
    distances: Tensor  # (N,) float32 squared L2 distance to the chosen code


class NearestNeighbourSearch(Protocol):
    def __call__(self, queries: Tensor, codebook: Tensor) -> SearchResult: ...

    def diagnostics(self) -> dict[str, float]:
        """Scalars worth logging (e.g. approximate search recall); {} for exact backends."""
        ...

    def training_step(self) -> None:
        """Told once per training forward (the codebook moves); evaluation does not count."""
        ...

    def state_dict(self) -> dict[str, Tensor]:
        """What a resumed run needs to search as the uninterrupted one would; {} if nothing."""
        ...

    def load_state_dict(self, state: dict[str, Tensor]) -> None: ...


class _Stateless:
    """Exact backends: nothing to log, nothing that changes with training, nothing to save."""

    def diagnostics(self) -> dict[str, float]:
        return {}

    def training_step(self) -> None:
        pass

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        # A run may resume with another backend (e.g. exact after faiss-ivf): the codes
        # it finds do not depend on a previous backend's state.
        pass


def check_inputs(queries: Tensor, codebook: Tensor) -> None:
    if queries.ndim != 2 or codebook.ndim != 2 or queries.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"expected queries (N, d) and codebook (K, d), got {tuple(queries.shape)} "
            f"and {tuple(codebook.shape)}"
        )
    if codebook.shape[0] == 0:
        raise ValueError("the codebook is empty")
    if queries.device != codebook.device:
        raise ValueError(
            f"queries on {queries.device} but codebook on {codebook.device}: search keeps "
            "both where they are, so they must share a device"
        )


def as_fp32(t: Tensor) -> Tensor:
    # A no-op (same storage) for the usual fp32 contiguous input: faiss reads it in place.
    return t.detach().to(torch.float32).contiguous()


def squared_distances(x: Tensor, codebook: Tensor, indices: Tensor) -> Tensor:
    """Direct ||x - e_i||^2 for one chosen code per row: (N, d), (K, d), (N,) -> (N,)."""
    return (x - codebook[indices]).pow(2).sum(dim=1)


class TorchSearch(_Stateless):
    """Exact search in plain torch, chunked over query rows.

    Only one (chunk_rows, K) tile of distances exists at a time, never the full (N, K)
    matrix, so a 256k-code codebook fits next to a large batch: 16 MB on CPU, 256 MB on
    a GPU unless `chunk_size` gives the rows.
    """

    def __init__(self, chunk_size: int = 0) -> None:
        if chunk_size < 0:
            raise ValueError(f"chunk_size must be >= 0 (0 = auto), got {chunk_size}")
        self.chunk_size = chunk_size

    def rows_per_chunk(self, codebook_size: int, device: torch.device | str = "cpu") -> int:
        if self.chunk_size > 0:
            return self.chunk_size
        tile = _TILE_FLOATS.get(torch.device(device).type, _TILE_FLOATS["cuda"])
        return max(1, tile // max(1, codebook_size))

    @torch.no_grad()
    def __call__(self, queries: Tensor, codebook: Tensor) -> SearchResult:
        check_inputs(queries, codebook)
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
            rows = self.rows_per_chunk(k, x.device)
            # One tile reused by every chunk: a fresh tensor per chunk costs a round of
            # page faults on CPU (measured 1.15-1.5x slower on 2 cores with 256 MB tiles).
            buffer = torch.empty(min(rows, n), k, device=x.device)  # (rows, K)
            for start in range(0, n, rows):
                chunk = x[start : start + rows]  # (r, d)
                # ||e||^2 - 2 x.e: ||x||^2 is constant per row, so it does not change the
                # argmin and is added to the chosen distance only, saving an (r, K) add.
                tile = torch.addmm(
                    e_sq.unsqueeze(0), chunk, e_t, beta=1.0, alpha=-2.0, out=buffer[: len(chunk)]
                )  # (r, K)
                best, arg = tile.min(dim=1)  # (r,), (r,)
                x_sq = chunk.pow(2).sum(dim=1)  # (r,)
                # The expansion can cancel to a tiny negative number; a distance is >= 0.
                distances[start : start + rows] = (best + x_sq).clamp_min_(0.0)
                indices[start : start + rows] = arg
        return SearchResult(indices=indices, distances=distances)


class FaissSearch(_Stateless):
    """Exact brute-force search in faiss.

    CPU tensors: `faiss.knn` on numpy views of the tensors (no copy of fp32 contiguous
    inputs), on all of faiss's OpenMP threads (OMP_NUM_THREADS caps them). No index is
    kept: the codebook changes every training step, and a reused IndexFlatL2 refilled
    with reset() + add() measured no faster than faiss.knn (it copies the codebook).
    For k = 1 faiss keeps a running minimum per query (a fused SIMD kernel for small d)
    instead of writing distance tiles to memory and reading them back: that is where it
    beats torch's matmul-then-min on CPU.

    CUDA tensors: faiss's GPU brute force (`knn_gpu`) reads the torch tensors in place on
    torch's current stream, when the installed faiss has GPU support. Without it, the
    search falls back to TorchSearch on the GPU: exact and still on the device, but slower;
    copying every batch and the codebook through the host would cost more than it saves.
    """

    def __init__(self, chunk_size: int = 0) -> None:
        self._faiss = import_faiss("search backend 'faiss'")
        self._torch = TorchSearch(chunk_size)

    @torch.no_grad()
    def __call__(self, queries: Tensor, codebook: Tensor) -> SearchResult:
        check_inputs(queries, codebook)
        x, e = as_fp32(queries), as_fp32(codebook)  # (N, d), (K, d)
        if x.is_cuda:
            if not faiss_has_gpu(self._faiss):
                return self._torch(x, e)
            res = shared_gpu_resources(self._faiss)
            # torch_utils binds faiss to the *current* device's stream: make it the tensors'.
            with torch.cuda.device(x.device):
                dist, idx = self._faiss.knn_gpu(res, x, e, 1, device=x.device.index)  # (N, 1)
        else:
            with faiss_blas_path(self._faiss, x.shape[1]):
                dist_np, idx_np = self._faiss.knn(x.numpy(), e.numpy(), 1)  # (N, 1), (N, 1)
            dist, idx = torch.from_numpy(dist_np), torch.from_numpy(idx_np)
        # faiss expands ||x||^2 - 2 x.e + ||e||^2 too, which can cancel below zero.
        return SearchResult(indices=idx.view(-1), distances=dist.view(-1).clamp_min_(0.0))
