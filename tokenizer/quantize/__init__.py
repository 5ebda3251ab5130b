"""Vector quantization: codebook math, nearest-neighbour search, the quantizer module."""

from tokenizer.quantize.backends import build_search, search_from_config
from tokenizer.quantize.codebook import (
    EMAState,
    code_counts,
    code_sums,
    ema_update,
    perplexity,
    usage,
)
from tokenizer.quantize.from_config import quantizer_from_config
from tokenizer.quantize.quantizer import QuantizerOutput, VectorQuantizer
from tokenizer.quantize.search import (
    NearestNeighbourSearch,
    SearchResult,
    TorchSearch,
)

__all__ = [
    "EMAState",
    "NearestNeighbourSearch",
    "QuantizerOutput",
    "SearchResult",
    "TorchSearch",
    "VectorQuantizer",
    "build_search",
    "quantizer_from_config",
    "search_from_config",
    "code_counts",
    "code_sums",
    "ema_update",
    "perplexity",
    "usage",
]
