"""Approximate nearest-neighbour search for very large codebooks: faiss IVF over the codes,
re-clustered as training moves them, with its state in checkpoints."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from tokenizer.quantize.faiss_support import (
    faiss_blas_path,
    faiss_has_gpu,
    import_faiss,
    shared_gpu_resources,
)
from tokenizer.quantize.search import (
    FaissSearch,
    SearchResult,
    as_fp32,
    check_inputs,
    squared_distances,
)


class FaissIVFSearch:
    """Approximate search for very large codebooks: a faiss IndexIVFFlat over the codes.

    The codes are split into `nlist` cells by k-means on the codebook itself (0: about
    4 sqrt(K) cells); a query compares itself with the codes of its `nprobe` nearest cells
    only. The k-means runs again at the first search after every `rebuild_every` training
    steps (0: never; evaluation forwards do not count) as the codebook moves, and whenever
    K, d or the device changes. Between rebuilds every code stays in its cell but the index
    is refilled with the current vectors on each call (on CPU a plain copy: the cell
    assignment is cached), so the only staleness is in the cells.

    At each rebuild, recall@1 against exact search is measured on `recall_samples`
    random queries of that call; `diagnostics()` reports it with the rebuild count.
    Returned distances are recomputed directly from the current codebook.

    `state_dict()` holds the cells (centroids and each code's cell), the steps since the
    last rebuild and the recall sampler, so a resumed run probes the same cells as the
    uninterrupted one instead of clustering a later codebook. (A GPU index is clustered
    afresh on resume: its cells are not saved.)

    CUDA tensors use faiss's GpuIndexIVFFlat when faiss has GPU support; otherwise the
    search is exact on the GPU (see FaissSearch), and no recall is reported.
    """

    def __init__(
        self,
        nlist: int = 0,
        nprobe: int = 8,
        rebuild_every: int = 100,
        recall_samples: int = 1024,
        chunk_size: int = 0,
        seed: int = 0,
    ) -> None:
        for name, value, least in [
            ("ivf_nlist", nlist, 0),
            ("ivf_nprobe", nprobe, 1),
            ("ivf_rebuild_every", rebuild_every, 0),
            ("ivf_recall_samples", recall_samples, 0),
        ]:
            if value < least:
                raise ValueError(f"{name} must be >= {least}, got {value}")
        self._faiss = import_faiss("search backend 'faiss-ivf'")
        self.nlist = nlist
        self.nprobe = nprobe
        self.rebuild_every = rebuild_every
        self.recall_samples = recall_samples
        self._exact = FaissSearch(chunk_size)
        self._generator = torch.Generator().manual_seed(seed)
        self._index: Any = None
        self._built_for: tuple[int, int, torch.device] | None = None
        self._cells: Any = None  # (K,) int64 numpy: each code's cell, CPU index only
        self._steps_since_build = 0
        self._rebuilds = 0
        self._recall: float | None = None
        self._restored: dict[str, Tensor] | None = None  # cells from a checkpoint, unused yet

    def lists_for(self, codebook_size: int) -> int:
        nlist = self.nlist or round(4 * math.sqrt(codebook_size))
        return max(1, min(nlist, codebook_size))  # k-means needs a code per cell

    def diagnostics(self) -> dict[str, float]:
        out = {"search/rebuilds": float(self._rebuilds)}
        if self._recall is not None:
            out["search/recall"] = self._recall
        return out

    def training_step(self) -> None:
        self._steps_since_build += 1

    def state_dict(self) -> dict[str, Tensor]:
        state = {
            "steps_since_build": torch.tensor(self._steps_since_build),
            "rebuilds": torch.tensor(self._rebuilds),
            "recall": torch.tensor(math.nan if self._recall is None else self._recall),
            "generator": self._generator.get_state(),
        }
        if self._restored is not None:  # saved again before the first search
            state.update({k: self._restored[k] for k in ("centroids", "cells")})
        elif self._cells is not None:  # a CPU index (a GPU one reassigns cells itself)
            quantizer = self._index.quantizer
            centroids = quantizer.reconstruct_n(0, quantizer.ntotal)  # (nlist, d)
            state["centroids"] = torch.from_numpy(centroids.copy())
            state["cells"] = torch.from_numpy(self._cells.copy())  # (K,)
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if not state:  # written by an exact backend: cluster afresh
            return
        self._steps_since_build = int(state["steps_since_build"])
        self._rebuilds = int(state["rebuilds"])
        recall = float(state["recall"])
        self._recall = None if math.isnan(recall) else recall
        self._generator.set_state(state["generator"])
        self._index, self._built_for, self._cells = None, None, None
        self._restored = state if "centroids" in state else None

    @torch.no_grad()
    def __call__(self, queries: Tensor, codebook: Tensor) -> SearchResult:
        check_inputs(queries, codebook)
        x, e = as_fp32(queries), as_fp32(codebook)  # (N, d), (K, d)
        if x.is_cuda and not faiss_has_gpu(self._faiss):
            return self._exact(x, e)
        key = (e.shape[0], e.shape[1], e.device)
        with (
            torch.autocast(device_type=x.device.type, enabled=False),
            faiss_blas_path(self._faiss, x.shape[1]),  # k-means and probing too
        ):
            rebuilt = False
            if self._restored is not None:
                self._restore(e)
            if (
                self._index is None
                or key != self._built_for
                or (self.rebuild_every > 0 and self._steps_since_build >= self.rebuild_every)
            ):
                self._build(e)
                self._steps_since_build = 0
                self._rebuilds += 1
                rebuilt = True
            else:
                self._refill(e)
            self._built_for = key
            indices = self._search(x)  # (N,)
            # Probed cells can all be empty (k-means may leave a cell without codes).
            missing = indices < 0  # (N,)
            if bool(missing.any()):
                indices[missing] = self._exact(x[missing], e).indices
            distances = squared_distances(x, e, indices)  # (N,)
            if rebuilt and self.recall_samples > 0 and x.shape[0] > 0:
                self._recall = self._measure_recall(x, e, distances)
        return SearchResult(indices=indices, distances=distances)

    def _new_index(self, d: int, nlist: int, device: torch.device) -> Any:
        faiss = self._faiss
        if device.type == "cuda":
            config = faiss.GpuIndexIVFFlatConfig()
            config.device = device.index
            res = shared_gpu_resources(faiss)
            index = faiss.GpuIndexIVFFlat(res, d, nlist, faiss.METRIC_L2, config)
        else:
            index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist, faiss.METRIC_L2)
        index.nprobe = self.nprobe
        return index

    def _build(self, e: Tensor) -> None:
        k, d = e.shape
        index = self._new_index(d, self.lists_for(k), e.device)
        # The k-means clusters the codebook itself: a cell may hold a single code (faiss
        # warns under 39), and 64 codes per cell are a fine sample for placing the
        # centroids (4x faster than faiss's 256 at K = 1M, d = 8).
        index.cp.min_points_per_centroid = 1
        index.cp.max_points_per_centroid = 64
        self._index = index
        if e.is_cuda:
            with torch.cuda.device(e.device):
                index.train(e)
        else:
            e_np = e.numpy()  # (K, d)
            index.train(e_np)
            self._cells = index.quantizer.assign(e_np, 1).reshape(-1)  # (K,)
        self._refill(e)

    def _restore(self, e: Tensor) -> None:
        """Rebuild the checkpointed CPU index (same centroids, same cells) without k-means."""
        state, self._restored = self._restored, None
        centroids = state["centroids"].float().contiguous()  # (nlist, d)
        cells = state["cells"].to(torch.int64)  # (K,)
        if e.is_cuda or centroids.shape[1] != e.shape[1] or len(cells) != len(e):
            return  # another device or codebook shape: the caller clusters afresh
        index = self._new_index(e.shape[1], centroids.shape[0], e.device)
        index.quantizer.add(centroids.numpy())
        index.is_trained = True
        self._index, self._cells = index, cells.numpy().copy()
        self._built_for = (e.shape[0], e.shape[1], e.device)
        self._refill(e)

    def _refill(self, e: Tensor) -> None:
        faiss, index = self._faiss, self._index
        index.reset()
        if e.is_cuda:
            # The GPU index has no add-with-given-cells; it reassigns on the GPU instead.
            with torch.cuda.device(e.device):
                index.add(e)
        else:
            e_np = e.numpy()  # (K, d)
            index.add_core(e_np.shape[0], faiss.swig_ptr(e_np), None, faiss.swig_ptr(self._cells))

    def _search(self, x: Tensor) -> Tensor:
        if x.is_cuda:
            with torch.cuda.device(x.device):
                _, idx = self._index.search(x, 1)  # (N, 1)
            return idx.view(-1)
        _, idx_np = self._index.search(x.numpy(), 1)  # (N, 1)
        return torch.from_numpy(idx_np).view(-1)

    def _measure_recall(self, x: Tensor, e: Tensor, distances: Tensor) -> float:
        # x (N, d), e (K, d), distances (N,) of the approximate codes.
        pick = torch.randperm(x.shape[0], generator=self._generator)[: self.recall_samples]
        pick = pick.to(x.device)  # (S,)
        sample = x[pick]  # (S, d)
        exact = squared_distances(sample, e, self._exact(sample, e).indices)  # (S,)
        # A hit: the approximate code is as close as the exact one (so ties count).
        return (distances[pick] <= exact).float().mean().item()
