"""VectorQuantizer and the codebook math, checked against values worked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from tokenizer.quantize import (
    VectorQuantizer,
    code_counts,
    code_sums,
    ema_update,
    perplexity,
    usage,
)


def _grid(vectors: list[list[float]], h: int, w: int) -> torch.Tensor:
    """Row-major list of h*w D-vectors -> z (1, D, h, w)."""
    return torch.tensor(vectors).reshape(1, h, w, -1).permute(0, 3, 1, 2).contiguous()


def _quantizer(codebook: list[list[float]], **kwargs) -> VectorQuantizer:
    e = torch.tensor(codebook)
    q = VectorQuantizer(e.shape[0], e.shape[1], **kwargs)
    with torch.no_grad():
        q.embed.copy_(e)
        if q.ema:
            q.embed_sum.copy_(e)  # keep the "unused code keeps its value" start
    return q


# Two codes, two vectors: v0 -> e0 (diff (0.2, -0.1)), v1 -> e1 (diff (-0.1, 0.3)).
CODES = [[0.0, 0.0], [1.0, 1.0]]
VECTORS = [[0.2, -0.1], [0.9, 1.3]]
# Mean over the 4 elements of the squared differences: (0.04 + 0.01 + 0.01 + 0.09) / 4.
HAND_MSE = 0.0375


def test_losses_by_hand() -> None:
    q = _quantizer(CODES, beta=0.25)
    out = q(_grid(VECTORS, 1, 2))
    assert out.indices.tolist() == [[[0, 1]]]
    assert out.indices.dtype == torch.int64
    assert out.codebook_loss.item() == pytest.approx(HAND_MSE)
    assert out.commitment_loss.item() == pytest.approx(HAND_MSE)
    assert out.loss.item() == pytest.approx(HAND_MSE * 1.25)
    # Forward value of the straight-through output is the chosen code.
    assert torch.allclose(out.quantized, _grid(CODES, 1, 2))
    assert out.counts.tolist() == [1.0, 1.0] and out.counts.dtype == torch.float32


def test_straight_through_copies_decoder_gradient_to_encoder() -> None:
    torch.manual_seed(0)
    q = VectorQuantizer(16, 4, beta=0.0)
    z = torch.randn(2, 4, 3, 5, requires_grad=True)
    out = q(z)
    out.quantized.retain_grad()
    weight = torch.randn_like(out.quantized)
    (out.quantized * weight).sum().backward()  # a loss on `quantized` only
    assert torch.equal(z.grad, out.quantized.grad)
    assert torch.equal(z.grad, weight)
    # The decoder's gradient never reaches a gradient-trained codebook.
    assert q.embed.grad is None or torch.all(q.embed.grad == 0)


def test_codebook_gets_gradient_only_from_codebook_term() -> None:
    q = _quantizer(CODES, beta=0.25)
    z = _grid(VECTORS, 1, 2).requires_grad_()
    out = q(z)
    (out.quantized.sum() + out.commitment_loss).backward()
    assert q.embed.grad is None or torch.all(q.embed.grad == 0)

    q.embed.grad = None
    z.grad = None
    out = q(z)
    out.loss.backward()
    # d/de_k mean((e_k - v)^2) = 2 (e_k - v) / 4 for the one vector assigned to e_k.
    expected_embed = torch.tensor([[-0.1, 0.05], [0.05, -0.15]])
    torch.testing.assert_close(q.embed.grad, expected_embed)
    # The encoder sees only beta * commitment: beta * 2 (v - e_k) / 4.
    expected_z = 0.25 * 0.5 * _grid([[0.2, -0.1], [-0.1, 0.3]], 1, 2)
    torch.testing.assert_close(z.grad, expected_z)


def test_codebook_counts_and_statistics_by_hand() -> None:
    indices = torch.tensor([[0, 0], [1, 3]])
    counts = code_counts(indices, 5)
    assert counts.dtype == torch.float32
    assert counts.tolist() == [2.0, 1.0, 0.0, 1.0, 0.0]
    assert usage(counts).item() == pytest.approx(3 / 5)
    # p = (1/2, 1/4, 1/4): entropy = 1.5 ln 2, perplexity = 2 ** 1.5.
    assert perplexity(counts).item() == pytest.approx(2**1.5)
    assert perplexity(torch.full((7,), 3.0)).item() == pytest.approx(7.0)
    assert perplexity(torch.tensor([0.0, 5.0, 0.0])).item() == pytest.approx(1.0)

    flat = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    sums = code_sums(flat, indices.reshape(-1), 5)
    expected = [[4.0, 6.0], [5.0, 6.0], [0.0, 0.0], [7.0, 8.0], [0.0, 0.0]]
    assert sums.tolist() == expected


def test_ema_update_by_hand() -> None:
    state = ema_update(
        cluster_size=torch.tensor([1.0, 1.0, 1.0]),
        embed_sum=torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]),
        batch_counts=torch.tensor([2.0, 0.0, 1.0]),
        batch_sums=torch.tensor([[2.0, 0.0], [0.0, 0.0], [1.0, -1.0]]),
        decay=0.9,
        epsilon=0.01,
    )
    # N = 0.9 * 1 + 0.1 * n_i; m = 0.9 * m + 0.1 * sums.
    n_i = [1.1, 0.9, 1.0]
    m_i = [[1.1, 1.8], [2.7, 3.6], [4.6, 5.3]]
    # Laplace: N' = (N + eps) / (n + K eps) * n with n = 3.0, K eps = 0.03.
    smoothed = [(x + 0.01) / 3.03 * 3.0 for x in n_i]
    codebook = [[m / s for m in row] for row, s in zip(m_i, smoothed, strict=True)]
    torch.testing.assert_close(state.cluster_size, torch.tensor(n_i))
    torch.testing.assert_close(state.embed_sum, torch.tensor(m_i))
    torch.testing.assert_close(state.codebook, torch.tensor(codebook))


# An EMA example: codes far apart, four vectors, code 2 unused.
EMA_CODES = [[0.0, 0.0], [10.0, 10.0], [-10.0, 10.0]]
EMA_VECTORS = [[1.0, 0.0], [0.0, 1.0], [9.0, 11.0], [11.0, 9.0]]
EMA_COUNTS = [2.0, 2.0, 0.0]
EMA_SUMS = [[1.0, 1.0], [20.0, 20.0], [0.0, 0.0]]


def _hand_ema(counts: list[float], sums: list[list[float]], decay: float, eps: float):
    """The paper's update on EMA_CODES (cluster_size = 1, embed_sum = the codes)."""
    n_i = [decay * 1.0 + (1 - decay) * c for c in counts]
    m_i = [
        [decay * e + (1 - decay) * s for e, s in zip(code, total, strict=True)]
        for code, total in zip(EMA_CODES, sums, strict=True)
    ]
    n = sum(n_i)
    smoothed = [(x + eps) / (n + len(n_i) * eps) * n for x in n_i]
    codebook = [[m / s for m in row] for row, s in zip(m_i, smoothed, strict=True)]
    return torch.tensor(n_i), torch.tensor(m_i), torch.tensor(codebook)


def test_ema_quantizer_applies_the_update_in_training_only() -> None:
    q = _quantizer(EMA_CODES, ema=True, ema_decay=0.5, ema_epsilon=0.1)
    assert not q.embed.requires_grad
    z = _grid(EMA_VECTORS, 2, 2)

    q.eval()
    out = q(z)
    torch.testing.assert_close(q.embed, torch.tensor(EMA_CODES))
    torch.testing.assert_close(q.cluster_size, torch.ones(3))

    q.train()
    out = q(z)
    assert out.indices.tolist() == [[[0, 0], [1, 1]]]
    assert out.counts.tolist() == EMA_COUNTS
    # The output uses the codebook the indices were chosen from, before the update.
    expected_quantized = _grid([EMA_CODES[i] for i in (0, 0, 1, 1)], 2, 2)
    torch.testing.assert_close(out.quantized, expected_quantized)
    # Under EMA the codebook term is a detached zero; the commitment term remains.
    assert out.codebook_loss.item() == 0.0 and not out.codebook_loss.requires_grad
    # Squared element errors: (1, 0), (0, 1), (1, 1), (1, 1) -> 6 / 8.
    assert out.commitment_loss.item() == pytest.approx(0.75)
    assert out.loss.item() == pytest.approx(0.25 * 0.75)

    n_i, m_i, codebook = _hand_ema(EMA_COUNTS, EMA_SUMS, decay=0.5, eps=0.1)
    torch.testing.assert_close(q.cluster_size, n_i)
    torch.testing.assert_close(q.embed_sum, m_i)
    torch.testing.assert_close(q.embed, codebook)
    torch.testing.assert_close(q.codebook, codebook)


def test_unused_ema_code_keeps_its_value_without_smoothing() -> None:
    q = _quantizer(EMA_CODES, ema=True, ema_decay=0.5, ema_epsilon=0.0)
    q(_grid(EMA_VECTORS, 2, 2))
    torch.testing.assert_close(q.embed[2], torch.tensor(EMA_CODES[2]))


class DoublingCollective:
    """Pretends a second rank saw exactly the same batch."""

    world_size = 2
    rank = 0

    def __init__(self, quantizer: VectorQuantizer) -> None:
        self.quantizer = quantizer
        self.inputs: list[torch.Tensor] = []
        self.embed_at_call: list[torch.Tensor] = []

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        self.inputs.append(tensor.clone())
        self.embed_at_call.append(self.quantizer.embed.clone())
        return tensor.mul_(2)  # in place, as torch.distributed does

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        return tensor

    def all_gather_cat(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.cat([tensor, tensor])


def test_collective_reduces_counts_and_sums_before_the_update() -> None:
    q = _quantizer(EMA_CODES, ema=True, ema_decay=0.5, ema_epsilon=0.1)
    fake = DoublingCollective(q)
    q.collective = fake  # set after construction, as the trainer does
    out = q(_grid(EMA_VECTORS, 2, 2))

    assert len(fake.inputs) == 2
    torch.testing.assert_close(fake.inputs[0], torch.tensor(EMA_COUNTS))
    torch.testing.assert_close(fake.inputs[1], torch.tensor(EMA_SUMS))
    for embed in fake.embed_at_call:
        torch.testing.assert_close(embed, torch.tensor(EMA_CODES))
    # The returned counts stay this process's own, even with an in-place collective.
    assert out.counts.tolist() == EMA_COUNTS

    doubled_sums = [[2 * s for s in row] for row in EMA_SUMS]
    n_i, m_i, codebook = _hand_ema([2 * c for c in EMA_COUNTS], doubled_sums, 0.5, 0.1)
    torch.testing.assert_close(q.cluster_size, n_i)
    torch.testing.assert_close(q.embed_sum, m_i)
    torch.testing.assert_close(q.embed, codebook)
    # Doubling changed the result: the single-process update differs.
    _, _, local = _hand_ema(EMA_COUNTS, EMA_SUMS, 0.5, 0.1)
    assert not torch.allclose(q.embed, local)

    q.eval()
    q(_grid(EMA_VECTORS, 2, 2))
    assert len(fake.inputs) == 2  # no collective outside training


@pytest.mark.parametrize("ema", [False, True])
def test_state_dict_holds_only_codebook_state(ema: bool) -> None:
    q = VectorQuantizer(8, 3, ema=ema)
    q.collective = DoublingCollective(q)
    tracking = {"initialized", "usage_ema", "step", "last_used", "last_restart", "restart_count"}
    expected = tracking | (
        {"embed", "cluster_size", "embed_sum"} if ema else {"embed", "embed_offset"}
    )
    assert set(q.state_dict()) == expected
    fresh = VectorQuantizer(8, 3, ema=ema)
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh.codebook, q.codebook)


def test_initialisation() -> None:
    torch.manual_seed(0)
    q = VectorQuantizer(64, 8)
    assert isinstance(q.embed, torch.nn.Parameter)
    assert q.codebook.shape == (64, 8)
    assert q.codebook.abs().max().item() <= 1 / 64
    e = VectorQuantizer(64, 8, ema=True)
    assert e.cluster_size.tolist() == [1.0] * 64
    assert torch.equal(e.embed_sum, e.embed)
    assert list(e.parameters()) == []
    assert all(b.dtype == torch.float32 for b in e.buffers() if b.is_floating_point())


def test_lookup_inverts_forward_indices() -> None:
    torch.manual_seed(1)
    q = VectorQuantizer(32, 6)
    out = q(torch.randn(3, 6, 4, 5))
    looked_up = q.lookup(out.indices)
    assert looked_up.shape == (3, 6, 4, 5)
    torch.testing.assert_close(looked_up, out.quantized)


def test_fp32_under_bf16_autocast() -> None:
    torch.manual_seed(2)
    q = VectorQuantizer(64, 8, ema=True)
    z = torch.randn(2, 8, 4, 4).to(torch.bfloat16)
    reference = q.search(z.float().permute(0, 2, 3, 1).reshape(-1, 8), q.codebook).indices.reshape(
        2, 4, 4
    )
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = q(z)
        looked_up = q.lookup(out.indices)
    assert torch.equal(out.indices, reference)
    assert out.quantized.dtype == torch.float32 and looked_up.dtype == torch.float32
    assert out.commitment_loss.dtype == torch.float32
    assert q.embed.dtype == torch.float32 and q.embed_sum.dtype == torch.float32
    assert math.isfinite(out.loss.item())


@pytest.mark.parametrize("ema", [False, True])
def test_data_init_puts_every_code_on_an_encoder_output(ema: bool) -> None:
    torch.manual_seed(0)
    q = VectorQuantizer(16, 4, ema=ema, init="data")
    z = torch.randn(2, 4, 4, 4) * 5 + 3  # 32 vectors far from the random init
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    before = q.codebook.detach().clone()
    q.eval()
    q(z)  # evaluation never initialises
    assert torch.equal(q.codebook, before) and not q.initialized
    q.train()
    out = q(z)
    assert q.initialized
    # Before the EMA step every code was one of the batch vectors, all distinct: each
    # vector is then its own nearest code, so the quantisation error is zero.
    assert out.indices.unique().numel() == 16
    if not ema:
        # embed + offset = the vector, to fp32 rounding (the offset keeps embed untouched).
        gap = (q.codebook.detach()[:, None] - flat[None]).abs().amax(-1)  # (K, N)
        assert gap.min(dim=1).values.max() < 1e-5
    # A second step does not re-initialise.
    snapshot = q.codebook.detach().clone()
    q(z * 0 + 100.0)
    assert not ema or not torch.equal(q.codebook, snapshot)
    if not ema:
        torch.testing.assert_close(q.codebook.detach(), snapshot)


def test_dead_code_is_restarted_then_used() -> None:
    torch.manual_seed(0)
    codes = [[0.0, 0.0], [1.0, 1.0], [50.0, 50.0]]  # code 2 is far from all data
    q = _quantizer(codes, ema=True, ema_decay=0.5, ema_epsilon=0.0, restart_threshold=0.5)
    z = _grid([[0.1, 0.0], [0.9, 1.0], [1.0, 0.9], [0.0, 0.1]], 2, 2)
    q.train()
    q(z)  # first step: every code starts at usage 2 * 0.5; code 2 gets 0 -> usage 0.5
    assert torch.equal(q.codebook[2], torch.tensor([50.0, 50.0]))
    q(z)  # usage of code 2 -> 0.25 < 0.5: restarted at one of the batch vectors
    flat = z.permute(0, 2, 3, 1).reshape(-1, 2)
    assert (q.codebook[2:3] - flat).abs().amax(-1).min() == 0
    torch.testing.assert_close(q.usage_ema[2], torch.tensor(1.0))  # the grace value again
    out = q(z)
    assert (out.indices == 2).any()  # the restarted code now wins some vectors


def test_restart_broadcasts_rank0_vectors() -> None:
    class FixedBroadcast(DoublingCollective):
        world_size = 1

        def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
            return tensor

        def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
            self.inputs.append(tensor.clone())
            return tensor.fill_(7.0)  # what rank 0 sent

    # The one vector picks code 0: shares (2, 0) of the uniform rate; from the grace
    # 2 * 0.9 the usage is (0.18 + 1.8, 0.18): code 1 alone is under 0.9, dead.
    q = _quantizer([[0.0, 0.0], [9.0, 9.0]], ema_decay=0.1, restart_threshold=0.9)
    q.collective = FixedBroadcast(q)
    q.train()
    q(_grid([[0.0, 0.1]], 1, 1))
    assert len(q.collective.inputs) == 1
    assert q.codebook.detach().tolist() == [[0.0, 0.0], [7.0, 7.0]]


# Lookup-space variants: l2-normalised codes, a low-dimensional lookup, and both.
VARIANTS = [
    pytest.param({"l2_normalize": True}, id="l2"),
    pytest.param({"lookup_dim": 3}, id="lowdim"),
    pytest.param({"lookup_dim": 3, "l2_normalize": True}, id="lowdim-l2"),
]


def _lookup_space(q: VectorQuantizer, z: torch.Tensor) -> torch.Tensor:
    """The quantizer's input map written out by hand: z (B, D, h, w) -> (N, d)."""
    x = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    if q.lookup_dim:
        x = x @ q.project_in.weight.t() + q.project_in.bias
    return torch.nn.functional.normalize(x, dim=1) if q.l2_normalize else x


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("ema", [False, True])
def test_lookup_space_shapes_and_unit_norm(variant: dict, ema: bool) -> None:
    torch.manual_seed(0)
    q = VectorQuantizer(16, 6, ema=ema, **variant)
    d = variant.get("lookup_dim", 6)
    assert q.embed.shape == (16, d) and q.codebook.shape == (16, d)
    z = torch.randn(2, 6, 3, 5)
    out = q(z)
    assert out.quantized.shape == (2, 6, 3, 5) and out.quantized.dtype == torch.float32
    assert out.indices.shape == (2, 3, 5) and out.counts.shape == (16,)
    if q.l2_normalize:
        torch.testing.assert_close(q.codebook.norm(dim=1), torch.ones(16))
    # The indices are the nearest codes to the lookup-space vectors...
    x = _lookup_space(q, z).detach()
    e = q.codebook.detach()
    if ema:  # (the EMA update has moved the codes since the search: use a fresh step)
        q.eval()
        out = q(z)
    nearest = torch.cdist(x, e).argmin(dim=1)
    assert torch.equal(out.indices.reshape(-1), nearest)
    # ...the losses are measured in that space...
    chosen = e[nearest]  # (N, d)
    expected = ((x - chosen) ** 2).mean()
    torch.testing.assert_close(out.commitment_loss, expected)
    if not ema:
        torch.testing.assert_close(out.codebook_loss, expected)
    # ...and the output is the chosen code brought back to D dimensions.
    back = q.project_out(chosen) if q.lookup_dim else chosen  # (N, D)
    torch.testing.assert_close(out.quantized, back.reshape(2, 3, 5, 6).permute(0, 3, 1, 2))
    torch.testing.assert_close(q.lookup(out.indices), out.quantized)


@pytest.mark.parametrize("variant", VARIANTS)
def test_lookup_space_straight_through_is_exact(variant: dict) -> None:
    """The encoder gets exactly the gradient it would get if quantization were the
    identity in lookup space: z -> project_in -> normalise -> project_out."""
    torch.manual_seed(0)
    q = VectorQuantizer(16, 6, beta=0.0, **variant)
    z = torch.randn(2, 6, 3, 5, requires_grad=True)
    weight = torch.randn(2, 6, 3, 5)
    (q(z).quantized * weight).sum().backward()

    z_ref = z.detach().clone().requires_grad_()
    x = _lookup_space(q, z_ref)  # (N, d)
    back = q.project_out(x) if q.lookup_dim else x  # (N, D)
    (back.reshape(2, 3, 5, 6).permute(0, 3, 1, 2) * weight).sum().backward()
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-6, atol=1e-6)
    assert z.grad.abs().sum() > 0
    if q.lookup_dim:
        # Both projections learn: project_out from the decoder's gradient.
        assert q.project_out.weight.grad.abs().sum() > 0
        assert q.project_in.weight.grad.abs().sum() > 0
    assert q.embed.grad is None or torch.all(q.embed.grad == 0)


def test_l2_losses_by_hand() -> None:
    # Unit codes along the axes; the vector (3, 4) normalises to (0.6, 0.8): nearest is
    # e1 = (0, 1) with differences (0.6, -0.2) -> mean squared error (0.36 + 0.04) / 2.
    q = _quantizer([[1.0, 0.0], [0.0, 1.0]], l2_normalize=True)
    out = q(_grid([[3.0, 4.0]], 1, 1))
    assert out.indices.tolist() == [[[1]]]
    assert out.commitment_loss.item() == pytest.approx(0.2)
    assert out.codebook_loss.item() == pytest.approx(0.2)
    torch.testing.assert_close(out.quantized, _grid([[0.0, 1.0]], 1, 1))


def test_l2_ema_codes_stay_unit_norm_through_updates_and_restarts() -> None:
    torch.manual_seed(0)
    q = VectorQuantizer(32, 4, ema=True, l2_normalize=True, init="kmeans", restart_unused_steps=2)
    for _ in range(5):
        q(torch.randn(2, 4, 4, 4) * 3 + 1)
    assert q.restart_count.item() > 0
    torch.testing.assert_close(q.embed.norm(dim=1), torch.ones(32))
    assert all(b.dtype == torch.float32 for b in q.buffers() if b.is_floating_point())
    assert q.step.dtype == torch.int64 and q.last_used.dtype == torch.int64


def test_lookup_space_fp32_under_bf16_autocast() -> None:
    torch.manual_seed(2)
    q = VectorQuantizer(64, 8, ema=True, lookup_dim=4, l2_normalize=True)
    z = torch.randn(2, 8, 4, 4).to(torch.bfloat16)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = q(z)
    assert out.quantized.dtype == torch.float32 and out.commitment_loss.dtype == torch.float32
    assert q.embed.dtype == torch.float32 and q.embed_sum.dtype == torch.float32


def _rows_present(vectors: torch.Tensor, codes: torch.Tensor, tol: float = 1e-5) -> torch.Tensor:
    """(N,) bool: which vectors (N, d) are (to rounding) one of the codes (K, d)."""
    return (vectors[:, None] - codes[None]).abs().amax(-1).amin(1) <= tol


@pytest.mark.parametrize("ema", [False, True])
def test_data_init_with_fewer_vectors_than_codes_gives_distinct_codes(ema: bool) -> None:
    torch.manual_seed(0)
    q = VectorQuantizer(256, 4, ema=ema, init="data")
    flat = torch.randn(100, 4) * 2 + 1  # (N, d): 100 vectors for 256 codes
    q._first_step(flat)  # the first step's initialisation alone (EMA would move codes)
    codes = q.codebook.detach()  # (K, d)
    assert torch.unique(codes, dim=0).shape[0] == 256  # no two codes coincide
    assert bool(_rows_present(flat, codes).all())  # every data vector is a code
    # The other 156 are jittered copies: next to a data vector, at none (to rounding).
    extra = ~_rows_present(codes, flat)  # (K,)
    gap = (codes[extra][:, None] - flat[None]).norm(dim=-1).amin(1)  # (156,) exact, no cdist
    assert int(extra.sum()) == 156 and bool((gap > 0).all()) and bool((gap < 0.05).all())
    # Distinct codes: a forward on the data vectors gives each of them its own code.
    q.eval()
    assert q(_grid(flat.tolist(), 10, 10)).indices.unique().numel() == 100


def test_data_init_skips_repeated_vectors_and_jitters_a_constant_batch() -> None:
    torch.manual_seed(0)
    # 64 vectors, only 12 distinct (flat image regions encode alike), 16 codes.
    distinct = torch.randn(12, 3)
    flat = distinct[torch.arange(64) % 12]
    q = VectorQuantizer(16, 3, ema=True, init="data")
    q._first_step(flat)
    assert torch.unique(q.codebook, dim=0).shape[0] == 16
    assert bool(_rows_present(distinct, q.codebook, tol=0.0).all())
    # Enough distinct vectors: every code is one of them, none twice.
    q = VectorQuantizer(8, 3, ema=True, init="data")
    q._first_step(flat)
    assert torch.unique(q.codebook, dim=0).shape[0] == 8
    assert bool(_rows_present(q.codebook, distinct, tol=0.0).all())
    # One vector repeated, far from the origin: fp32 still keeps the copies apart.
    q = VectorQuantizer(32, 3, ema=True, init="data")
    q._first_step(torch.full((20, 3), 300.0))
    assert torch.unique(q.codebook, dim=0).shape[0] == 32
    assert (q.codebook - 300.0).abs().max() < 1.0


def test_a_non_finite_batch_leaves_the_ema_codebook_untouched() -> None:
    from tokenizer.quantize import VectorQuantizer

    torch.manual_seed(0)
    q = VectorQuantizer(codebook_size=8, code_dim=4, ema=True)
    q.train()
    q(torch.randn(2, 4, 3, 3))
    before = {k: v.clone() for k, v in q.state_dict().items()}
    z = torch.randn(2, 4, 3, 3)
    z[0, :, 1, 1] = float("nan")
    q(z)
    for name in ("embed", "embed_sum", "cluster_size"):
        torch.testing.assert_close(q.state_dict()[name], before[name], msg=name)
    assert torch.isfinite(q.embed).all()
