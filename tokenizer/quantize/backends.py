"""The search backend a config names (`quantizer.search`).

- "torch": exact, chunked matmul (search.py).
- "faiss": exact brute force in faiss, CPU or CUDA (search.py).
- "faiss-ivf": approximate, an inverted-file index over the codebook, for huge K (ivf.py).
- "auto": "faiss" when faiss is importable, else "torch".
"""

from __future__ import annotations

from tokenizer.config import SEARCH_BACKENDS as BACKENDS
from tokenizer.config import QuantizerConfig
from tokenizer.quantize.faiss_support import faiss_available
from tokenizer.quantize.ivf import FaissIVFSearch
from tokenizer.quantize.search import FaissSearch, NearestNeighbourSearch, TorchSearch


def build_search(
    name: str,
    chunk_size: int = 0,
    *,
    ivf_nlist: int = 0,
    ivf_nprobe: int = 8,
    ivf_rebuild_every: int = 100,
    ivf_recall_samples: int = 1024,
) -> NearestNeighbourSearch:
    """The search backend a config names (`quantizer.search`); options as in QuantizerConfig.

    "faiss" and "faiss-ivf" raise ImportError naming the package when faiss is missing;
    "auto" then quietly uses "torch".
    """
    if name == "torch":
        return TorchSearch(chunk_size=chunk_size)
    if name == "faiss":
        return FaissSearch(chunk_size=chunk_size)
    if name == "faiss-ivf":
        return FaissIVFSearch(
            nlist=ivf_nlist,
            nprobe=ivf_nprobe,
            rebuild_every=ivf_rebuild_every,
            recall_samples=ivf_recall_samples,
            chunk_size=chunk_size,
        )
    if name == "auto":
        if faiss_available():
            return FaissSearch(chunk_size=chunk_size)
        return TorchSearch(chunk_size=chunk_size)
    raise ValueError(f"unknown search backend {name!r}; choices: {', '.join(BACKENDS)}")


def search_from_config(cfg: QuantizerConfig) -> NearestNeighbourSearch:
    """build_search with every search option of a QuantizerConfig."""
    return build_search(
        cfg.search,
        cfg.search_chunk,
        ivf_nlist=cfg.ivf_nlist,
        ivf_nprobe=cfg.ivf_nprobe,
        ivf_rebuild_every=cfg.ivf_rebuild_every,
        ivf_recall_samples=cfg.ivf_recall_samples,
    )
