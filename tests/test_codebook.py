"""Codebooks at scale: k-means init, dead-code restarts, windowed usage, multi-rank
agreement and exact resume, checked on small problems with known answers."""

from __future__ import annotations

import importlib.util
import math
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from collective_helpers import run_ranks

import tokenizer.quantize.quantizer as quantizer_module
from tokenizer.config import load_config
from tokenizer.models import build_model
from tokenizer.quantize import VectorQuantizer, build_search
from tokenizer.quantize.codebook import window_usage
from tokenizer.quantize.kmeans import kmeans

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _grid(vectors: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(h*w, D) row-major vectors -> z (1, D, h, w)."""
    return vectors.reshape(1, h, w, -1).permute(0, 3, 1, 2).contiguous()


def _clustered(
    num_clusters: int, per_cluster: int, dim: int, noise: float, seed: int
) -> torch.Tensor:
    """(num_clusters * per_cluster, dim) points around well separated centres."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_clusters, dim, generator=g) * 4  # (C, dim)
    points = centres.repeat_interleave(per_cluster, 0)
    return points + noise * torch.randn(points.shape, generator=g)


def _quantisation_error(q: VectorQuantizer, z: torch.Tensor) -> float:
    """Mean squared distance of z's vectors to their nearest code."""
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    return q.search(flat, q.codebook.detach()).distances.mean().item()


# --- k-means -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_kmeans_finds_the_clusters_and_is_seeded(backend: str) -> None:
    points = _clustered(8, 64, dim=4, noise=0.1, seed=10)  # (512, 4)
    # Four centroids per cluster: with one, Lloyd's from a random start often settles
    # with two centroids in one cluster and one between two others.
    centroids = kmeans(points, 32, iters=20, seed=3, backend=backend)
    assert centroids.shape == (32, 4) and centroids.dtype == torch.float32
    error = torch.cdist(points, centroids).min(dim=1).values.pow(2).mean().item()
    # Centroids in every cluster leave at most the noise: 4 dims x 0.1^2.
    assert error < 4 * 0.1**2
    again = kmeans(points, 32, iters=20, seed=3, backend=backend)
    assert torch.equal(centroids, again)


def test_kmeans_spherical_and_too_few_points() -> None:
    points = _clustered(4, 32, dim=3, noise=0.1, seed=1)
    centroids = kmeans(points, 6, iters=10, seed=0, spherical=True)
    torch.testing.assert_close(centroids.norm(dim=1), torch.ones(6))
    # 5 points, one of them twice, for 8 codes: every point is a code once, the other 3
    # are jittered copies, and no two codes are equal.
    few = torch.randn(5, 3)
    padded = kmeans(torch.cat([few, few[:1]]), 8, iters=10, seed=0)
    assert padded.shape == (8, 3)
    exact = (padded[:, None] == few[None]).all(-1)  # (8, 5)
    assert exact.sum(dim=0).tolist() == [1] * 5  # each point is exactly one code
    copies = padded[~exact.any(dim=1)]  # (3, 3)
    gap = torch.cdist(copies, few).min(dim=1).values  # (3,)
    assert copies.shape[0] == 3 and (gap > 0).all() and (gap < 0.05).all()
    assert torch.unique(padded, dim=0).shape[0] == 8


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_kmeans_with_more_vectors_than_codes_but_fewer_distinct(backend: str) -> None:
    distinct = torch.randn(5, 3, generator=torch.Generator().manual_seed(2))
    repeated = distinct[torch.arange(40) % 5]  # 40 vectors, 5 distinct, for 8 codes
    centroids = kmeans(repeated, 8, iters=10, seed=0, backend=backend)
    assert torch.unique(centroids, dim=0).shape[0] == 8
    assert bool((centroids[:, None] == distinct[None]).all(-1).any(0).all())


@pytest.mark.parametrize("faiss_installed", [True, False])
def test_kmeans_init_beats_random_init(faiss_installed: bool, monkeypatch) -> None:
    if not faiss_installed:
        monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    points = _clustered(8, 128, dim=4, noise=0.1, seed=10)  # (1024, 4)
    z = _grid(points[torch.randperm(1024, generator=torch.Generator().manual_seed(0))], 32, 32)
    errors = {}
    for init in ("random", "data", "kmeans"):
        torch.manual_seed(0)
        q = VectorQuantizer(32, 4, ema=True, init=init, kmeans_iters=20)
        with torch.no_grad():
            q.embed.mul_(4)  # a random codebook at the data's scale, to be fair
        q.train()
        q._first_step(z.permute(0, 2, 3, 1).reshape(-1, 4))  # the first step's init only
        errors[init] = _quantisation_error(q, z)
    assert errors["kmeans"] < 0.05 * errors["random"], errors
    assert errors["kmeans"] < errors["data"], errors
    assert errors["kmeans"] < 4 * 0.1**2, errors


# --- dead-code restarts ------------------------------------------------------------------

# Two live codes near the data and a third far from everything.
LIVE = [[0.0, 0.0], [1.0, 1.0], [50.0, 50.0]]
DATA = torch.tensor([[0.1, 0.0], [0.9, 1.0], [1.0, 0.9], [0.0, 0.1]])


def _fixed(codes: list[list[float]], **kwargs) -> VectorQuantizer:
    e = torch.tensor(codes)
    q = VectorQuantizer(e.shape[0], e.shape[1], **kwargs)
    with torch.no_grad():
        q.embed.copy_(e)
        if q.ema:
            q.embed_sum.copy_(e)
    return q


@pytest.mark.parametrize("ema", [False, True])
def test_unused_code_is_restarted_after_n_steps_then_used(ema: bool) -> None:
    torch.manual_seed(0)
    q = _fixed(LIVE, ema=ema, restart_unused_steps=3)
    z = _grid(DATA, 2, 2)
    for step in (1, 2):
        q(z)
        assert q.last_used.tolist() == [step, step, 0]
        assert q.restart_count.item() == 0
    q(z)  # step 3: code 2 unused for 3 steps since its start at step 0
    assert q.step.item() == 3 and q.restart_count.item() == 1
    assert q.last_restart.tolist() == [0, 0, 3]
    # Now on a data vector (a trained codebook reaches it as embed + offset: to rounding).
    assert (q.codebook.detach()[2] - DATA).abs().amax(-1).min() < 1e-5
    if not ema:  # the parameter itself is untouched (DeepSpeed's master copy owns it)
        torch.testing.assert_close(q.embed.detach(), torch.tensor(LIVE), rtol=0, atol=0)
    if ema:  # its EMA statistics start afresh: one pseudo-observation of the new value
        assert q.cluster_size[2].item() == 1.0
        torch.testing.assert_close(q.embed_sum[2], q.embed[2])
    out = q(z)
    assert (out.indices == 2).any()  # the restarted code wins the vector it sits on
    assert q.last_used.tolist() == [4, 4, 4]


class _MasterCopySGD:
    """An optimiser that owns fp32 master weights and copies them into the model after
    each step, as DeepSpeed's ZeRO optimisers do: any write into a parameter between
    steps is lost."""

    def __init__(self, params, lr: float) -> None:
        self.params = list(params)
        self.master = [p.detach().clone() for p in self.params]
        self.lr = lr

    def step(self) -> None:
        for p, m in zip(self.params, self.master, strict=True):
            if p.grad is not None:
                m.sub_(self.lr * p.grad)
            p.data.copy_(m)
            p.grad = None


def test_idle_rule_and_usage_window_count_optimiser_steps_under_accumulation() -> None:
    # Two forwards per optimiser step: an idle code is restarted after 2 steps = 4 forwards.
    torch.manual_seed(0)
    q = _fixed(LIVE, restart_unused_steps=2, forwards_per_step=2)
    z = _grid(DATA, 2, 2)
    for forward in (1, 2, 3):
        q(z)
        assert q.restart_count.item() == 0, forward
    q(z)
    assert q.restart_count.item() == 1 and q.last_restart.tolist() == [0, 0, 4]
    stats = q.codebook_stats(window=1)
    assert (stats.step, stats.forwards, stats.window) == (2, 4, 1)
    # Forwards 5 and 6 make step 3: the codes of both micro-batches count in a window of
    # one step. Forward 5 chooses code 0 (and 2 if its restart landed there), forward 6
    # code 1 (and maybe 2): the last forward alone would miss code 0.
    fifth = q(_grid(DATA[[0, 3, 0, 3]], 2, 2)).indices
    sixth = q(_grid(DATA[[1, 2, 1, 2]], 2, 2)).indices
    assert q.last_used.tolist()[:2] == [5, 6]
    by_hand = len(set(fifth.flatten().tolist()) | set(sixth.flatten().tolist())) / 3
    assert q.codebook_stats(window=1).usage == pytest.approx(by_hand)
    assert by_hand > len(set(sixth.flatten().tolist())) / 3
    with pytest.raises(ValueError, match="forwards_per_step"):
        q.forwards_per_step = 0


def test_trained_codebook_keeps_data_init_and_restarts_under_a_master_copy() -> None:
    torch.manual_seed(0)
    q = VectorQuantizer(3, 2, init="data", restart_unused_steps=2)
    optimiser = _MasterCopySGD(q.parameters(), lr=1e-3)
    z = _grid(DATA * 10, 2, 2)  # far from the tiny uniform(-1/K, 1/K) parameter init
    one = _grid(DATA[[0, 0, 0, 0]] * 10, 2, 2)  # later batches leave two codes idle
    for batch in (z, one, one, one, one):
        q(batch).loss.backward()
        optimiser.step()
        # Every code sits on (or, after an SGD step, right next to) a data vector.
        gap = torch.cdist(q.codebook.detach(), DATA * 10).amin(1)  # (K,)
        assert bool((gap < 0.1).all()), gap
    assert q.restart_count.item() > 0  # restarts happened, and survived the copy too
    assert q.embed.detach().abs().max() < 0.5  # the parameter never left its small init


def test_restart_rules_combine_and_give_grace() -> None:
    torch.manual_seed(0)
    # Threshold rule: after the first step's grace (2 * 0.5) code 2's usage is 0.5, then
    # 0.25 < 0.5 at step 2. The idle rule alone (10 steps) would wait much longer.
    q = _fixed(LIVE, ema=True, ema_decay=0.5, restart_threshold=0.5, restart_unused_steps=10)
    z = _grid(DATA, 2, 2)
    q(z)
    assert q.restart_count.item() == 0
    q(z)
    assert q.restart_count.item() == 1 and q.last_restart[2].item() == 2
    assert q.usage_ema[2].item() == pytest.approx(1.0)  # grace: twice the threshold


# --- usage and perplexity ----------------------------------------------------------------


def test_window_usage_by_hand() -> None:
    last_used = torch.tensor([0, 1, 5, 9, 10])  # code 0 never used
    assert window_usage(last_used, 10, 1).item() == pytest.approx(1 / 5)  # step 10
    assert window_usage(last_used, 10, 2).item() == pytest.approx(2 / 5)  # steps 9-10
    assert window_usage(last_used, 10, 6).item() == pytest.approx(3 / 5)  # steps 5-10
    assert window_usage(last_used, 10, 100).item() == pytest.approx(4 / 5)


def test_codebook_stats_match_a_hand_count() -> None:
    # Four fixed codes (a gradient codebook does not move without an optimiser); two
    # vectors per step choosing codes {0, 1}, then {1, 1}, then {2, 2}.
    codes = [[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]]
    q = _fixed(codes, ema_decay=0.5)
    for chosen in ([0, 1], [1, 1], [2, 2]):
        q(_grid(torch.tensor([codes[i] for i in chosen]), 1, 2))
    stats = q.codebook_stats(window=1)
    assert (stats.step, stats.window, stats.restarts) == (3, 1, 0)
    assert stats.usage == pytest.approx(1 / 4)
    assert q.codebook_stats(window=2).usage == pytest.approx(2 / 4)
    assert q.codebook_stats(window=3).usage == pytest.approx(3 / 4)
    assert q.codebook_stats(window=50).usage == pytest.approx(3 / 4)
    # usage_ema is relative to the uniform rate (2 vectors / 4 codes = 0.5 hits), so the
    # shares n * K / N are (2, 2, 0, 0), (0, 4, 0, 0), (0, 0, 4, 0); u <- u / 2 + share / 2
    # from 0: (1, 1, 0, 0), (.5, 2.5, 0, 0), (.25, 1.25, 2, 0).
    usage_ema = [0.25, 1.25, 2.0, 0.0]
    torch.testing.assert_close(q.usage_ema, torch.tensor(usage_ema))
    p = [u / sum(usage_ema) for u in usage_ema if u > 0]
    assert stats.perplexity == pytest.approx(math.exp(-sum(x * math.log(x) for x in p)))


# --- several ranks -----------------------------------------------------------------------


def _scale_quantizer(ema: bool = True) -> VectorQuantizer:
    return VectorQuantizer(
        48,
        6,
        ema=ema,
        ema_decay=0.9,
        init="kmeans",
        kmeans_iters=5,
        lookup_dim=3,
        l2_normalize=True,
        restart_threshold=0.3,
        restart_unused_steps=2,
    )


def test_two_ranks_with_different_batches_end_with_identical_codebooks(monkeypatch) -> None:
    clustered_by = []
    real_kmeans = quantizer_module.kmeans

    def spy(*args, **kwargs):
        clustered_by.append(threading.current_thread().name)
        return real_kmeans(*args, **kwargs)

    monkeypatch.setattr(quantizer_module, "kmeans", spy)
    quantizers = []
    for _ in range(2):
        torch.manual_seed(0)  # same initial weights on every rank, as set_seed does
        quantizers.append(_scale_quantizer())
    g = torch.Generator().manual_seed(1)
    # Rank 1 sees other data (shifted), and its first batch is smaller than rank 0's.
    batches = [
        [torch.randn(2, 6, 4, 4, generator=g) for _ in range(8)],
        [torch.randn(1 if i == 0 else 2, 6, 4, 4, generator=g) + 2.0 for i in range(8)],
    ]
    run_ranks(quantizers, batches)

    q0, q1 = quantizers
    state0, state1 = q0.state_dict(), q1.state_dict()
    for name in state0:
        assert torch.equal(state0[name], state1[name]), name
    assert q0.restart_count.item() > 0 and q0.initialized
    c0, c1 = q0.collective, q1.collective
    assert c0.calls == c1.calls  # the same collectives in the same order, with equal shapes
    assert len(clustered_by) == 1  # k-means ran once, on rank 0, and was broadcast

    ops = [op for op, _ in c0.calls]
    # First step: batch sizes gathered, then candidates (16 rows, rank 1's smaller batch
    # bounds every rank's sample), then rank 0's centroids broadcast.
    assert ops[:3] == ["all_gather_cat", "all_gather_cat", "broadcast"]
    assert c0.calls[1] == ("all_gather_cat", (16, 3)) and c0.calls[2] == ("broadcast", (48, 3))
    # Every later restart: sizes gathered, candidates gathered, rank 0's choice broadcast.
    restarts = [i for i, op in enumerate(ops) if op == "broadcast"][1:]
    assert restarts and all(ops[i - 2 : i] == ["all_gather_cat"] * 2 for i in restarts)
    # The restart vectors are rows of the pool gathered from both ranks, and both ranks
    # contributed rows that were picked.
    picked_from = set()
    for i in restarts:
        pool, fresh = c0.results[i - 1][1], c0.results[i][1]
        half = pool.shape[0] // 2
        for row in fresh:
            match = torch.nonzero((pool == row).all(dim=1)).flatten()
            assert match.numel() > 0
            picked_from.add(int(match[0] >= half))
    assert picked_from == {0, 1}


# --- resume ------------------------------------------------------------------------------


@pytest.mark.parametrize("ema", [False, True])
def test_resume_from_state_dict_equals_uninterrupted_run(ema: bool) -> None:
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 6, 4, 4, generator=g) + 0.3 * i for i in range(6)]

    torch.manual_seed(0)
    straight = _scale_quantizer(ema)
    straight_indices = [straight(z).indices for z in batches]

    torch.manual_seed(0)
    first = _scale_quantizer(ema)
    indices = [first(z).indices for z in batches[:3]]
    saved = {k: v.clone() for k, v in first.state_dict().items()}
    rng = torch.get_rng_state()
    restarts_at_save = int(saved["restart_count"])

    torch.manual_seed(123)  # a fresh process: other weights, other RNG state
    resumed = _scale_quantizer(ema)
    resumed.load_state_dict(saved)
    torch.set_rng_state(rng)
    indices += [resumed(z).indices for z in batches[3:]]

    assert resumed.restart_count.item() > restarts_at_save  # restarts after the resume
    for a, b in zip(indices, straight_indices, strict=True):
        assert torch.equal(a, b)
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


# --- the configs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overlay,codebook_size",
    [
        ("codebook_262k.yaml", 262144),
        # Building the IVF index over a million codes takes ~10 s on 2 CPU cores.
        pytest.param("codebook_1m_ivf.yaml", 1048576, marks=pytest.mark.slow),
    ],
)
def test_codebook_config_trains_one_step(overlay: str, codebook_size: int) -> None:
    cfg = load_config(CONFIGS / "demo.yaml", CONFIGS / overlay)
    assert cfg.quantizer.codebook_size == codebook_size
    # faiss-ivf needs faiss; "auto" falls back to exact torch search without it. Any other
    # error building the search is a failure.
    if cfg.quantizer.search == "faiss-ivf" and importlib.util.find_spec("faiss") is None:
        pytest.skip("faiss-ivf needs faiss, which is not installed")
    assert build_search(cfg.quantizer.search, cfg.quantizer.search_chunk) is not None
    torch.manual_seed(0)
    model = build_model(cfg)
    q = model.quantizer
    assert q.codebook.shape == (codebook_size, cfg.quantizer.lookup_dim)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]

    x = torch.rand(2, 3, 64, 64) * 2 - 1
    model.train()
    out = model(x)
    loss = F.mse_loss(out.reconstruction, x) + out.grids["tokens"].loss
    loss.backward()
    optimizer.step()

    assert torch.isfinite(loss)
    assert out.grids["tokens"].indices.shape == (2, 16, 16)
    assert q.initialized and q.step.item() == 1
    torch.testing.assert_close(q.codebook.norm(dim=1), torch.ones(codebook_size))
    changed = [not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True)]
    assert all(changed)  # every parameter, projections included, took a step
