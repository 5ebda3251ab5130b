"""k-means over candidate vectors, for initialising a codebook: faiss when it is there,
else Lloyd's algorithm on the nearest-code search.

Kept out of codebook.py, whose update math needs no search backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokenizer.quantize.codebook import (
    code_counts,
    code_sums,
    distinct_rows,
    l2_normalize_rows,
    sample_rows,
)
from tokenizer.quantize.faiss_support import faiss_available, faiss_has_gpu, import_faiss
from tokenizer.quantize.search import TorchSearch


def kmeans(
    x: Tensor,
    k: int,
    iters: int,
    seed: int,
    spherical: bool = False,
    backend: str = "auto",
) -> Tensor:
    """k-means centroids (K, d) fp32 of x (N, d), on x's device, deterministic for a seed.

    backend "faiss" (GPU when faiss has it and x is on CUDA), "torch" (chunked Lloyd's
    on x's device), or "auto": faiss when importable, except for CUDA tensors and a
    CPU-only faiss build, where Lloyd's on the GPU is far faster than faiss on the CPU.
    `spherical` keeps the centroids unit-norm.
    """
    generator = torch.Generator().manual_seed(seed)
    x = x.detach().float()
    if x.shape[0] < k or torch.unique(x, dim=0).shape[0] < k:
        # Fewer distinct vectors than codes (repeats: flat image regions encode alike):
        # k-means cannot split them into K clusters. Every distinct vector becomes a
        # centroid and the missing ones are jittered copies, so no two codes coincide.
        return distinct_rows(x, k, generator, spherical)
    if backend == "auto":
        usable = faiss_available() and (not x.is_cuda or faiss_has_gpu(import_faiss("k-means")))
        backend = "faiss" if usable else "torch"
    if backend == "faiss":
        return _faiss_kmeans(x, k, iters, seed, spherical)
    if backend == "torch":
        return _torch_kmeans(x, k, iters, generator, spherical)
    raise ValueError(f"unknown k-means backend {backend!r}; choices: auto, faiss, torch")


def _faiss_kmeans(x: Tensor, k: int, iters: int, seed: int, spherical: bool) -> Tensor:
    faiss = import_faiss("k-means backend 'faiss'")
    # gpu=1: one GPU (the current device's), not every GPU of the node, which gpu=True
    # would take from the other ranks' processes.
    use_gpu = 1 if x.is_cuda and faiss_has_gpu(faiss) else False
    clustering = faiss.Kmeans(
        x.shape[1],
        k,
        niter=iters,
        seed=seed,
        spherical=spherical,
        gpu=use_gpu,
        verbose=False,
        # faiss prints a warning under 39 points per centroid and subsamples above 256;
        # the caller decides how many points to give.
        min_points_per_centroid=1,
        max_points_per_centroid=1 << 30,
    )
    clustering.train(x.cpu().numpy())
    return torch.from_numpy(clustering.centroids).to(x.device)  # (K, d)


def _torch_kmeans(
    x: Tensor, k: int, iters: int, generator: torch.Generator, spherical: bool
) -> Tensor:
    """Lloyd's algorithm: the fallback when faiss is not installed."""
    if spherical:
        x = l2_normalize_rows(x)
    search = TorchSearch()  # chunked: never an (N, K) distance matrix
    centroids = sample_rows(x, k, generator).clone()  # (K, d)
    for _ in range(iters):
        assign = search(x, centroids).indices  # (N,)
        counts = code_counts(assign, k)  # (K,)
        means = code_sums(x, assign, k) / counts.clamp_min(1.0).unsqueeze(1)  # (K, d)
        # An empty cluster restarts at a random point instead of staying where nothing is.
        empty = counts == 0  # (K,)
        means[empty] = sample_rows(x, int(empty.sum()), generator)
        centroids = l2_normalize_rows(means) if spherical else means
    return centroids
