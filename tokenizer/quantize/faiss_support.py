"""faiss, optional: importing it with a hint of what to install, what the installed
build can do, and the process-wide state it keeps.

Nothing here imports faiss at module level: `import tokenizer` must work without it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

_FAISS_HINT = (
    "pip install faiss-cpu (or faiss-gpu-cu12 for CUDA; from a checkout of this project: "
    "pip install '.[faiss]' or '.[faiss-gpu]')"
)


def import_faiss(user: str) -> ModuleType:
    """The faiss module, or an ImportError naming `user` (e.g. "search backend 'faiss'")
    and what to install."""
    try:
        import faiss
    except ImportError as err:
        raise ImportError(f"{user} needs faiss, which is not installed: {_FAISS_HINT}") from err
    return faiss


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def faiss_has_gpu(faiss: ModuleType) -> bool:
    # faiss-cpu lacks StandardGpuResources; a GPU build on a machine without GPUs has it
    # but reports zero devices.
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


_gpu_resources: Any = None


def shared_gpu_resources(faiss: ModuleType) -> Any:
    """One StandardGpuResources per process: each holds its own scratch memory and streams."""
    global _gpu_resources
    if _gpu_resources is None:
        # Patches faiss so that its GPU calls take torch CUDA tensors in place and run on
        # torch's current stream; imported only here because it needs a GPU build to matter.
        import faiss.contrib.torch_utils  # noqa: F401

        _gpu_resources = faiss.StandardGpuResources()
    return _gpu_resources


# faiss sends a query batch through its BLAS path, which for k = 1 and small d is a fused
# SIMD distance+argmin kernel, only when N * d >= faiss.cvar.distance_compute_blas_threshold
# (128000 in faiss 1.15, so N >= 16000 at d = 8); smaller batches take a per-query loop.
# Measured on 2 cores at K = 16384: for d <= 32 the BLAS path is 2-20x faster at every
# N from 256 to 8192; from d = 64 the loop wins for small N, so larger d keeps faiss's rule.
_BLAS_ALWAYS_MAX_DIM = 32


@contextmanager
def faiss_blas_path(faiss: ModuleType, dim: int) -> Iterator[None]:
    """Within the block, faiss's CPU search takes the BLAS (fused for k = 1) path at any N.

    The threshold is a process-wide C global; it is restored on exit, and it only picks
    between two exact algorithms, so a concurrent faiss caller is never given wrong results.
    """
    cvar = getattr(faiss, "cvar", None)
    if dim > _BLAS_ALWAYS_MAX_DIM or not hasattr(cvar, "distance_compute_blas_threshold"):
        yield
        return
    saved = cvar.distance_compute_blas_threshold
    cvar.distance_compute_blas_threshold = 0
    try:
        yield
    finally:
        cvar.distance_compute_blas_threshold = saved
