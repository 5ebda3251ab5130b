"""The transformer prior: causal by gradient (targets see earlier targets and the whole
prefix, never later targets), trains on a toy set, class labels steer it, KV-cached
sampling gives the uncached logits and codes, and wrong inputs are refused by name."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tokenizer.priors.transformer as transformer_module
from tokenizer.priors.transformer import TransformerPrior

K, GRID = 16, (3, 4)
T = GRID[0] * GRID[1]
COND_K, COND_GRID = 5, (2, 2)
P = COND_GRID[0] * COND_GRID[1]

CONFIGS = {
    "plain": {},
    "class": {"num_classes": 3},
    "prefix": {"condition_codebook_size": COND_K, "condition_shape": COND_GRID},
    "prefix+class": {
        "num_classes": 3,
        "condition_codebook_size": COND_K,
        "condition_shape": COND_GRID,
    },
}


@pytest.fixture(autouse=True)
def _one_thread():
    # Models this small gain nothing from a second thread, and on a shared 2-core machine
    # two threads a process stall each other (8x slower training steps measured).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _model(config: str, seed: int = 0, **kw) -> TransformerPrior:
    torch.manual_seed(seed)
    kw = {"dim": 32, "layers": 2, "heads": 4, **CONFIGS[config], **kw}
    return TransformerPrior(K, GRID, **kw)


def _sharpen(model: TransformerPrior, seed: int) -> TransformerPrior:
    """Large random weights: logits of order 1 and peaked attention, so that a cache that
    reads the wrong keys or positions changes the logits by far more than rounding."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def _inputs(model: TransformerPrior, b: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    cond = None
    if model.condition_codebook_size:
        cond = torch.randint(0, COND_K, (b, *COND_GRID), generator=g)
    labels = torch.arange(b) % model.num_classes if model.num_classes else None
    return cond, labels


# --- 1. causality by gradient -----------------------------------------------------------


@pytest.mark.parametrize("config", list(CONFIGS))
def test_each_target_sees_earlier_inputs_and_the_prefix_never_later_targets(config):
    model = _sharpen(_model(config), seed=3).eval()
    cond, labels = _inputs(model, 1)
    x = torch.randn(1, T, model.dim, requires_grad=True)
    probe = torch.randn(K)  # a random read of the K logits, so no cancellation hides a path
    for i in range(T):
        model.zero_grad()
        logits = model.forward_embedded(x, cond, labels).flatten(2)[0, :, i]  # (K,)
        (grad_x,) = torch.autograd.grad(logits @ probe, x, retain_graph=True)
        (logits @ probe).backward()
        seen = grad_x[0].abs().sum(dim=1)  # (T,)
        assert torch.equal(seen[i + 1 :], torch.zeros(T - i - 1)), f"target {i} sees later"
        # Position 0 holds the start token, or nothing of x once a class embedding took it.
        first = 1 if model.num_classes else 0
        assert (seen[first : i + 1] > 0).all(), f"target {i} misses an earlier input"
        if model.num_classes:
            assert seen[0] == 0
            assert model.class_emb.weight.grad[labels[0]].abs().sum() > 0
        if model.prefix_len:
            per_prefix = model.cond_pos.grad.abs().sum(dim=1)  # (P,)
            assert (per_prefix > 0).all(), f"target {i} misses a prefix position"


def test_the_prefix_sees_itself_whole_and_no_target():
    mask = _model("prefix").mask  # (P+T, P+T), True where a query may look
    assert mask[:P, :P].all() and not mask[:P, P:].any()
    assert mask[P:, :P].all()
    assert torch.equal(mask[P:, P:], torch.ones(T, T, dtype=torch.bool).tril())


# --- 2. shapes, loss, training, class conditioning --------------------------------------


@pytest.mark.parametrize("config", list(CONFIGS))
def test_shapes_and_the_loss_is_cross_entropy_of_the_logits(config):
    model = _model(config)
    cond, labels = _inputs(model, 3)
    codes = torch.randint(0, K, (3, *GRID))
    logits = model(codes, cond, labels)
    assert logits.shape == (3, K, *GRID) and logits.dtype == torch.float32
    loss = model.loss(codes, cond, labels)
    assert loss.ndim == 0
    torch.testing.assert_close(loss, F.cross_entropy(logits, codes))
    assert abs(loss.item() - math.log(K)) < 0.1  # near-uniform at nanoGPT's init


def _fit(model, codes, labels=None, steps=120, lr=1e-2) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        loss = model.loss(codes, class_labels=labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.loss(codes, class_labels=labels).item()


def test_a_few_adamw_steps_learn_a_toy_set():
    data = torch.randint(0, K, (4, *GRID), generator=torch.Generator().manual_seed(0))
    model = _model("plain")
    before = model.loss(data).item()
    after = _fit(model, data)
    # The first code of 4 distinct grids costs log(4) nats, the rest little: about 0.12.
    assert after < 0.2 * math.log(K) < before


def test_class_labels_steer_the_samples_to_each_class_grid():
    grids = torch.randint(0, K, (2, *GRID), generator=torch.Generator().manual_seed(1))
    model = _model("class", num_classes=2)
    assert _fit(model, grids, torch.tensor([0, 1])) < 0.05
    labels = torch.tensor([0, 1, 1, 0])
    out = model.sample(4, class_labels=labels, top_k=1)
    assert torch.equal(out, grids[labels])


# --- 3. KV-cached sampling ----------------------------------------------------------------


def _record(monkeypatch) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    real = transformer_module.sample_logits

    def recording(logits, *args, **kwargs):
        seen.append(logits.clone())
        return real(logits, *args, **kwargs)

    monkeypatch.setattr(transformer_module, "sample_logits", recording)
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("config", ["plain", "class", "prefix", "prefix+class"])
def test_cached_sampling_gives_the_uncached_logits_and_codes(config, dtype, monkeypatch):
    model = _sharpen(_model(config), seed=4).to(dtype)
    cond, labels = _inputs(model, 5)
    runs = {}
    for use_cache in (True, False):
        seen = _record(monkeypatch)
        g = torch.Generator().manual_seed(7)
        codes = model.sample(
            5, condition=cond, class_labels=labels, generator=g, use_cache=use_cache
        )
        runs[use_cache] = codes, torch.stack(seen)  # (T, n, K)
    (cached, cached_logits), (plain, plain_logits) = runs[True], runs[False]
    assert cached_logits.shape == (T, 5, K)
    torch.testing.assert_close(cached_logits, plain_logits, rtol=1.3e-6, atol=1e-5)
    assert torch.equal(cached, plain)
    assert cached_logits.std() > 0.5  # the logits are far from uniform: the check has teeth


@pytest.mark.parametrize("config", list(CONFIGS))
def test_samples_are_codes_of_the_grid_and_reproducible(config):
    model = _sharpen(_model(config), seed=5).train()
    cond, labels = _inputs(model, 6)

    def draw(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return model.sample(6, GRID, cond, labels, generator=g, **kw)

    out = draw(0, temperature=1.5, top_p=0.95)
    assert out.shape == (6, *GRID) and out.dtype == torch.int64
    assert 0 <= out.min() and out.max() < K
    assert torch.equal(out, draw(0, temperature=1.5, top_p=0.95))
    assert not torch.equal(draw(0, temperature=3.0), draw(1, temperature=3.0))
    assert model.training  # sampling ran in eval mode and gave the mode back


# --- 4. errors ----------------------------------------------------------------------------


def test_missing_or_misshapen_inputs_are_refused_by_name():
    plain, cls, pre = _model("plain"), _model("class"), _model("prefix")
    codes = torch.randint(0, K, (2, *GRID))
    cond = torch.randint(0, COND_K, (2, *COND_GRID))
    with pytest.raises(ValueError, match="codes must be int64 of shape"):
        plain(torch.randint(0, K, (2, 4, 3)))
    with pytest.raises(ValueError, match="codes must be int64"):
        plain(codes.float())
    with pytest.raises(ValueError, match="condition is required"):
        pre(codes)
    with pytest.raises(ValueError, match="condition must be"):
        pre(codes, torch.randint(0, COND_K, (2, 3, 3)))
    with pytest.raises(ValueError, match="condition must be"):
        pre.sample(3, condition=cond)  # two condition grids for three samples
    with pytest.raises(ValueError, match="condition given"):
        plain(codes, cond)
    with pytest.raises(ValueError, match="class_labels is required"):
        cls(codes)
    with pytest.raises(ValueError, match="class_labels is required"):
        cls.sample(2)
    with pytest.raises(ValueError, match="class_labels must be"):
        cls(codes, class_labels=torch.tensor([[0], [1]]))
    with pytest.raises(ValueError, match="class_labels given"):
        plain.loss(codes, class_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="x must be of shape"):
        plain.forward_embedded(torch.randn(2, T + 1, 32))
    with pytest.raises(ValueError, match=r"shape \(8, 8\) differs from grid_shape \(3, 4\)"):
        plain.sample(1, shape=(8, 8))
    with pytest.raises(ValueError, match="condition_shape"):
        TransformerPrior(K, GRID, dim=32, layers=1, heads=4, condition_codebook_size=COND_K)
    with pytest.raises(ValueError, match="heads"):
        TransformerPrior(K, GRID, dim=30, layers=1, heads=4)
