"""Codebook upkeep that must not depend on how the global batch is split: data init from
every rank's vectors, and a restart threshold that means the same at any batch size and
number of ranks. Ranks are threads sharing one simulated process group."""

from __future__ import annotations

import pytest
import torch
from collective_helpers import run_ranks

from tokenizer.quantize import VectorQuantizer


def _grid(flat: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(h*w, D) row-major vectors -> z (1, D, h, w)."""
    return flat.reshape(1, h, w, -1).permute(0, 3, 1, 2).contiguous()


def _on_a_code(vectors: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """(N,) bool: which vectors (N, d) are exactly one of the codes (K, d)."""
    return (vectors[:, None] == codes[None]).all(-1).any(1)


def test_data_init_on_two_ranks_uses_both_ranks_vectors_and_no_code_twice() -> None:
    g = torch.Generator().manual_seed(0)
    # 100 vectors per rank, apart (rank 1's shifted), for 256 codes.
    local = [torch.randn(100, 4, generator=g), torch.randn(100, 4, generator=g) + 5.0]
    quantizers = []
    for _ in range(2):
        torch.manual_seed(0)  # the same initial weights on every rank, as set_seed does
        quantizers.append(VectorQuantizer(256, 4, ema=True, init="data"))
    run_ranks(quantizers, [[_grid(x, 10, 10)] for x in local])

    # The initial codes are what each rank received from rank 0's broadcast (the EMA
    # update of the same step has moved them since).
    starts = [
        [value for op, value in q.collective.results if op == "broadcast"] for q in quantizers
    ]
    assert [len(s) for s in starts] == [1, 1]  # one broadcast: the init (no restarts)
    start0, start1 = starts[0][0], starts[1][0]
    assert start0.shape == (256, 4) and torch.equal(start0, start1)
    assert torch.unique(start0, dim=0).shape[0] == 256
    for x in local:  # every vector of both ranks is a code
        assert bool(_on_a_code(x, start0).all())
    for name, value in quantizers[0].state_dict().items():
        assert torch.equal(value, quantizers[1].state_dict()[name]), name


def test_data_init_on_two_ranks_draws_from_both_when_vectors_abound() -> None:
    g = torch.Generator().manual_seed(1)
    local = [torch.randn(64, 3, generator=g) - 5.0, torch.randn(64, 3, generator=g) + 5.0]
    quantizers = []
    for _ in range(2):
        torch.manual_seed(0)
        quantizers.append(VectorQuantizer(32, 3, init="data"))  # gradient-trained: codes stay
    run_ranks(quantizers, [[_grid(x, 8, 8)] for x in local])
    codes = quantizers[0].codebook.detach()
    torch.testing.assert_close(codes, quantizers[1].codebook.detach(), rtol=0, atol=0)
    near = [(codes[:, None] - x[None]).abs().amax(-1).amin(1) < 1e-5 for x in local]  # (K,)
    assert bool((near[0] | near[1]).all())  # every code on a vector of one of the ranks
    assert int(near[0].sum()) > 0 and int(near[1].sum()) > 0  # and both ranks supplied some
    assert torch.unique(codes, dim=0).shape[0] == 32


# Four fixed codes and a batch that uses them unevenly: 16 vectors, 4 per code at the
# uniform rate; codes 0..3 get 10, 4, 1 and 1 hits: shares 2.5, 1, 0.25, 0.25 of it.
CODES = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
HITS = [10, 4, 1, 1]
BATCH = torch.cat([CODES[i].expand(n, 2) for i, n in enumerate(HITS)])  # (16, 2)
BATCH = BATCH + 0.01 * torch.randn(BATCH.shape, generator=torch.Generator().manual_seed(0))
BATCH = BATCH[torch.randperm(16, generator=torch.Generator().manual_seed(1))]


def _threshold_quantizer() -> VectorQuantizer:
    # A gradient-trained codebook without an optimiser stays where it is put.
    q = VectorQuantizer(4, 2, ema_decay=0.5, restart_threshold=0.5)
    with torch.no_grad():
        q.embed.copy_(CODES)
    return q


def _first_restart(quantizers: list[VectorQuantizer], batches: list[list[torch.Tensor]]):
    """Forward every rank through its batches; the first forward that restarted codes,
    which codes, and usage_ema just before (every rank must agree)."""
    usages, restarted = [], None
    for step in range(len(batches[0])):
        usages.append(quantizers[0].usage_ema.clone())
        if len(quantizers) == 1:
            quantizers[0](batches[0][step])
        else:
            run_ranks(quantizers, [[b[step]] for b in batches])
        for q in quantizers[1:]:
            assert torch.equal(q.last_restart, quantizers[0].last_restart)
        fired = torch.nonzero(quantizers[0].last_restart == step + 1).flatten().tolist()
        if fired:
            restarted = (step + 1, fired)
            break
    return restarted, usages


@pytest.mark.parametrize(
    "layout",
    ["one rank, batch b", "one rank, batch 2b", "two ranks, batch b each", "two ranks, b/2 each"],
)
def test_restart_threshold_means_the_same_for_any_batch_and_ranks(layout: str) -> None:
    z = _grid(BATCH, 4, 4)  # (1, 2, 4, 4)
    halves = [_grid(BATCH[:8], 2, 4), _grid(BATCH[8:], 2, 4)]
    steps = 4
    if layout == "one rank, batch b":
        quantizers, batches = [_threshold_quantizer()], [[z] * steps]
    elif layout == "one rank, batch 2b":
        quantizers, batches = [_threshold_quantizer()], [[torch.cat([z, z])] * steps]
    elif layout == "two ranks, batch b each":
        quantizers = [_threshold_quantizer(), _threshold_quantizer()]
        batches = [[z] * steps, [z] * steps]
    else:
        quantizers = [_threshold_quantizer(), _threshold_quantizer()]
        batches = [[halves[0]] * steps, [halves[1]] * steps]
    torch.manual_seed(0)
    restarted, usages = _first_restart(quantizers, batches)

    # By hand, from the grace 2 * 0.5 with decay 1/2: u <- u / 2 + share / 2, shares
    # (2.5, 1, .25, .25): step 1 (1.75, 1, .625, .625), step 2 (2.125, 1, .4375, .4375):
    # codes 2 and 3 fall under 0.5 at step 2, whatever the layout.
    assert restarted == (2, [2, 3])
    torch.testing.assert_close(usages[1], torch.tensor([1.75, 1.0, 0.625, 0.625]))
