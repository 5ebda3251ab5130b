"""Vector quantization: codebook math, nearest-neighbour search, the quantizer module."""

from tokenizer.quantize.codebook import (
    EMAState,
    code_counts,
    code_sums,
    ema_update,
    perplexity,
    usage,
)
from tokenizer.quantize.quantizer import QuantizerOutput, VectorQuantizer
from tokenizer.quantize.search import (
    NearestNeighbourSearch,
    SearchResult,
    TorchSearch,
    build_search,
)

__all__ = [
    "EMAState",
    "NearestNeighbourSearch",
    "QuantizerOutput",
    "SearchResult",
    "TorchSearch",
    "VectorQuantizer",
    "build_search",
    "code_counts",
    "code_sums",
    "ema_update",
    "perplexity",
    "usage",
]
