"""What the loop does with every code grid a task trains: the collective, one codebook on
every rank (broadcast at start, fingerprint checks), search state, and log statistics."""

from __future__ import annotations

import logging

import torch

from tokenizer.config import Config
from tokenizer.distributed import Collective, broadcast_buffers, check_same_state
from tokenizer.quantize import VectorQuantizer
from tokenizer.training.log import grid_key

logger = logging.getLogger("tokenizer.training.loop")


def attach(
    quantizers: dict[str, VectorQuantizer], collective: Collective, forwards_per_step: int
) -> None:
    """Give every quantizer the ranks' collective. Restart windows and codebook_stats
    count optimiser steps; the quantizer sees forwards."""
    for quantizer in quantizers.values():
        quantizer.collective = collective
        quantizer.forwards_per_step = forwards_per_step


def broadcast_codebooks(collective: Collective, quantizers: dict[str, VectorQuantizer]) -> None:
    """One codebook everywhere from the start: DeepSpeed never broadcasts buffers."""
    for quantizer in quantizers.values():
        broadcast_buffers(collective, quantizer)


def check_codebooks(
    cfg: Config, collective: Collective, quantizers: dict[str, VectorQuantizer], step: int
) -> None:
    """Compare every grid's codebook state across ranks (strict: raise; repair: re-broadcast)."""
    repair = cfg.distributed.on_mismatch == "repair"
    for grid, quantizer in quantizers.items():
        differing = check_same_state(collective, quantizer, step, repair=repair)
        if differing:
            logger.warning("step %d: codebook %r of rank(s) %s differed from rank 0; "
                           "re-broadcast", step, grid, differing)  # fmt: skip


def codebook_metrics(quantizers: dict[str, VectorQuantizer], window: int) -> dict[str, float]:
    """Per grid: codes used in the last `window` steps, restarts, search diagnostics."""
    metrics: dict[str, float] = {}
    for grid, quantizer in quantizers.items():
        stats = quantizer.codebook_stats(window)
        metrics[grid_key(grid, "window_usage")] = stats.usage
        metrics[grid_key(grid, "restarts")] = float(stats.restarts)
        # Approximate search reports its recall (rank 0's index; every rank builds one).
        for name, value in quantizer.search.diagnostics().items():
            metrics[name if len(quantizers) == 1 else _with_grid(name, grid)] = value
    return metrics


def search_states(quantizers: dict[str, VectorQuantizer]) -> dict[str, dict[str, torch.Tensor]]:
    return {grid: q.search.state_dict() for grid, q in quantizers.items()}


def load_search_states(
    quantizers: dict[str, VectorQuantizer], states: dict[str, dict[str, torch.Tensor]]
) -> None:
    for grid, quantizer in quantizers.items():
        quantizer.search.load_state_dict(states.get(grid, {}))


def _with_grid(name: str, grid: str) -> str:
    """`search/recall` of grid `top` -> `search/top/recall`, as grid_key names them."""
    head, _, tail = name.rpartition("/")
    return f"{head}/{grid}/{tail}" if head else f"{grid}/{tail}"
