"""The gated PixelCNN prior: causality proved by gradient (zero at and after the target,
non-zero everywhere before it: no blind spot), conditioning that reaches the logits, a loss
that is the cross-entropy and that training drives down, and sampling that is
autoregressive and reproducible."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tokenizer.priors.pixelcnn import GatedPixelCNN
from tokenizer.priors.sampling import sample_logits

K, DIM = 8, 16


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny convolutions: more threads only contend (several times slower on 2 busy cores).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Small models whose receptive field covers the whole test grid: the first layer's 7x7
# window and each 3x3 layer after it reach 3 + (layers - 1) rows up and columns sideways.
VARIANTS = {
    "plain": dict(),
    "class": dict(num_classes=3),
    "bottom": dict(condition_codebook_size=5, condition_factor=2),
    "attention": dict(attention_every=2, attention_heads=2),
    "kernel3": dict(kernel_size=3, layers=7),
}


def _model(seed: int = 0, **kwargs) -> GatedPixelCNN:
    torch.manual_seed(seed)
    kwargs = {"dim": DIM, "layers": 5, **kwargs}
    return GatedPixelCNN(K, **kwargs)


def _inputs(model: GatedPixelCNN, batch: int, h: int, w: int, seed: int = 1) -> dict:
    """The condition and class labels `model` needs, at random."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    if model.condition_stack is not None:
        f = model.condition_factor
        size = model.condition_stack.embedding.num_embeddings
        out["condition"] = torch.randint(0, size, (batch, h // f, w // f), generator=g)
    if model.num_classes:
        out["class_labels"] = torch.randint(0, model.num_classes, (batch,), generator=g)
    return out


def _input_gradient(model: GatedPixelCNN, r: int, c: int, h: int, w: int, **inputs):
    """|d logits[:, :, r, c].sum() / d x| summed over batch and channels: (h, w)."""
    x = torch.randn(2, DIM, h, w, generator=torch.Generator().manual_seed(2), requires_grad=True)
    model.forward_embedded(x, **inputs)[:, :, r, c].sum().backward()
    return x.grad.abs().sum(dim=(0, 1))


def _targets(h: int, w: int) -> list[tuple[int, int]]:
    # (0, 0), the first row, the first column, the last column, the middle, the last.
    return [(0, 0), (0, 1), (0, w - 1), (1, 0), (h - 1, 0), (2, w - 1), (h // 2, w // 2),
            (h - 1, w - 1)]  # fmt: skip


@pytest.mark.parametrize("grid", [(6, 6), (4, 8)], ids=["6x6", "4x8"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_depend_on_exactly_the_earlier_positions(variant, grid):
    h, w = grid
    model = _model(**VARIANTS[variant])
    inputs = _inputs(model, 2, h, w)
    for r, c in _targets(h, w):
        grad = _input_gradient(model, r, c, h, w, **inputs).flatten()  # raster order
        target = r * w + c
        leaks = (grad[target:] != 0).nonzero().flatten().tolist()
        assert not leaks, f"{variant} ({r}, {c}) sees raster positions {leaks} at or after it"
        unseen = (grad[:target] == 0).nonzero().flatten().tolist()
        assert not unseen, f"{variant} ({r}, {c}) blind to earlier raster positions {unseen}"
        grid_grad = grad.view(h, w)
        if r > 0 and c + 1 < w:  # the original PixelCNN's blind spot: up and to the right
            assert grid_grad[r - 1, c + 1] > 0 and grid_grad[r - 1, w - 1] > 0
        if c > 0:
            assert grid_grad[r, c - 1] > 0


def test_attention_reaches_beyond_the_convolutions_and_stays_causal():
    # Two 3x3 layers see a few positions of a 6x6 grid; with attention after the first
    # one, the target sees every earlier position and still none at or after it.
    h = w = 6
    r, c = 4, 4
    target = r * w + c
    convs = _input_gradient(_model(kernel_size=3, layers=2), r, c, h, w).flatten()
    assert (convs[:target] == 0).sum() >= 10  # the convolutions alone miss these
    attending = _model(kernel_size=3, layers=2, attention_every=1, attention_heads=2)
    grad = _input_gradient(attending, r, c, h, w).flatten()
    assert (grad[target:] == 0).all()
    assert (grad[:target] > 0).all()


def test_the_condition_reaches_every_position_and_codes_do_not_leak_through_it():
    model = _model(**VARIANTS["bottom"])
    h = w = 6
    codes = torch.randint(0, K, (2, h, w), generator=torch.Generator().manual_seed(0))
    condition = _inputs(model, 2, h, w)["condition"]
    for r, c in [(0, 0), (0, w - 1), (h - 1, w - 1)]:
        model.zero_grad()
        model(codes, condition=condition)[:, :, r, c].sum().backward()
        assert model.condition_stack.embedding.weight.grad.abs().sum() > 0, (r, c)
    # Position (0, 0) has no earlier codes: its logits are a function of the condition.
    other = (condition + 1) % 5
    first = model(codes, condition=condition)[:, :, 0, 0]
    assert not torch.allclose(first, model(codes, condition=other)[:, :, 0, 0])
    rolled = model(torch.roll(codes, 1, -1), condition=condition)[:, :, 0, 0]
    torch.testing.assert_close(first, rolled)


def test_class_labels_reach_the_logits():
    model = _model(**VARIANTS["class"])
    codes = torch.randint(0, K, (2, 4, 4), generator=torch.Generator().manual_seed(0))
    a = model(codes, class_labels=torch.tensor([0, 1]))
    b = model(codes, class_labels=torch.tensor([2, 1]))
    assert not torch.allclose(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])


@pytest.mark.parametrize("variant", ["plain", "class", "bottom", "attention"])
def test_sample_is_the_naive_raster_loop(variant):
    # sample() runs the network on rows 0..r only; a full forward per code must agree.
    model = _model(**VARIANTS[variant]).eval()
    inputs = _inputs(model, 3, 4, 4)
    g = torch.Generator().manual_seed(5)
    codes = torch.zeros(3, 4, 4, dtype=torch.long)
    for r in range(4):
        for c in range(4):
            logits = model(codes, **inputs)[:, :, r, c]
            codes[:, r, c] = sample_logits(logits, temperature=0.7, top_p=0.9, generator=g)
    drawn = model.sample(
        3, (4, 4), **inputs, temperature=0.7, top_p=0.9, generator=torch.Generator().manual_seed(5)
    )
    assert torch.equal(drawn, codes)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_shapes_dtypes_and_loss_is_the_cross_entropy(variant):
    model = _model(**VARIANTS[variant])
    codes = torch.randint(0, K, (3, 4, 6), generator=torch.Generator().manual_seed(0))
    inputs = _inputs(model, 3, 4, 6)
    logits = model(codes, **inputs)
    assert logits.shape == (3, K, 4, 6) and logits.dtype == torch.float32
    loss = model.loss(codes, **inputs)
    assert loss.shape == ()
    torch.testing.assert_close(loss, F.cross_entropy(logits, codes))
    embedded = model.embedding(codes).permute(0, 3, 1, 2)
    torch.testing.assert_close(model.forward_embedded(embedded, **inputs), logits)


def _stripes(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Diagonal stripes (offset + r + c) % K, a random offset per grid: every code after
    the first is determined by the one before it."""
    offsets = torch.randint(0, K, (n, 1, 1), generator=torch.Generator().manual_seed(seed))
    r = torch.arange(h)[:, None]
    c = torch.arange(w)[None]
    return (offsets + r + c) % K


def _fit(model: GatedPixelCNN, codes: torch.Tensor, steps: int, lr: float = 3e-3, **inputs):
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model.loss(codes, **inputs)
        loss.backward()
        optimizer.step()
    return loss.item()


@pytest.fixture(scope="module")
def stripes_model() -> GatedPixelCNN:
    model = _model(layers=3)
    start = model.loss(_stripes(16, 6, 6)).item()
    assert start > 0.8 * math.log(K)
    _fit(model, _stripes(16, 6, 6), steps=150)
    return model


def test_training_drives_the_loss_well_below_log_k(stripes_model):
    # Only the first code is uncertain: log(K) / 36 nats per code is the floor.
    assert stripes_model.loss(_stripes(16, 6, 6, seed=1)).item() < 0.15 * math.log(K)


def test_samples_are_autoregressive(stripes_model):
    # top_p=0.8 keeps most codes where the model is unsure (the first code, uniform)
    # and only the argmax where it is sure: each sample must be a stripe grid continuing
    # its own first code, so the later draws read the earlier ones.
    samples = stripes_model.sample(
        12, (6, 6), top_p=0.8, generator=torch.Generator().manual_seed(0)
    )
    offsets = samples[:, 0, 0]
    r = torch.arange(6)[:, None]
    c = torch.arange(6)[None]
    torch.testing.assert_close(samples, (offsets[:, None, None] + r + c) % K)
    assert len(set(offsets.tolist())) >= 3


def test_sample_shape_range_and_reproducibility():
    model = _model(**VARIANTS["attention"])

    def draw(seed: int) -> torch.Tensor:
        return model.sample(3, (4, 5), generator=torch.Generator().manual_seed(seed))

    a = draw(0)
    assert a.shape == (3, 4, 5) and a.dtype == torch.int64
    assert 0 <= a.min() and a.max() < K
    assert torch.equal(a, draw(0)) and not torch.equal(a, draw(1))


def test_sample_runs_in_eval_mode_and_restores_the_mode():
    model = _model(dropout=0.5, attention_every=2, attention_heads=2)
    model.train()
    g = torch.Generator().manual_seed(0)
    a = model.sample(2, (3, 3), top_k=1, generator=g)
    assert model.training
    model.eval()
    assert torch.equal(a, model.sample(2, (3, 3), top_k=1, generator=g))
    assert not model.training


def test_overfit_on_one_grid_then_greedy_sampling_reproduces_it():
    grid = torch.randint(0, K, (1, 5, 5), generator=torch.Generator().manual_seed(3))
    model = _model(layers=3)
    _fit(model, grid.expand(4, 5, 5), steps=150)
    assert torch.equal(model.sample(2, (5, 5), top_k=1), grid.expand(2, 5, 5))


def test_the_bottom_prior_draws_what_its_condition_says():
    # Each fine code is its top code's, plus 1 on the right half of each 2x2 cell: only
    # the condition (and the position inside the cell) decides it.
    g = torch.Generator().manual_seed(0)
    top = torch.randint(0, 4, (8, 3, 3), generator=g)
    fine = top.repeat_interleave(2, 1).repeat_interleave(2, 2) + (torch.arange(6) % 2)
    model = _model(layers=3, condition_codebook_size=4, condition_factor=2)
    _fit(model, fine, steps=150, condition=top)
    drawn = model.sample(8, (6, 6), condition=top, top_k=1)
    assert drawn.shape == (8, 6, 6)
    assert torch.equal(drawn, fine)


def test_the_class_prior_draws_its_class():
    labels = torch.arange(3)
    grids = (labels[:, None, None] * 2 + torch.arange(5)[None, :, None]) % K  # row stripes
    grids = grids.expand(3, 5, 5).contiguous()
    model = _model(layers=3, num_classes=3)
    _fit(model, grids, steps=120, class_labels=labels)
    assert torch.equal(model.sample(3, (5, 5), class_labels=labels, top_k=1), grids)


def test_missing_wrong_or_unexpected_inputs_name_the_argument():
    codes = torch.zeros(2, 4, 4, dtype=torch.long)
    bottom = _model(**VARIANTS["bottom"])
    with pytest.raises(ValueError, match="condition is required"):
        bottom(codes)
    with pytest.raises(ValueError, match=r"condition must be integer codes of shape \(2, 2, 2\)"):
        bottom(codes, condition=torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="condition must be"):
        bottom(codes, condition=torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="condition must be integer codes .* torch.float32"):
        bottom(codes, condition=torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match="condition_factor 2 must divide the grid 3x3"):
        bottom.sample(1, (3, 3), condition=torch.zeros(1, 1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="condition must be"):
        bottom.sample(3, (4, 4), condition=torch.zeros(2, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="condition given"):
        _model()(codes, condition=torch.zeros(2, 2, 2, dtype=torch.long))

    classes = _model(**VARIANTS["class"])
    with pytest.raises(ValueError, match="class_labels .* required"):
        classes(codes)
    with pytest.raises(ValueError, match="class_labels .* required"):
        classes.sample(2, (4, 4))
    with pytest.raises(ValueError, match=r"class_labels must be integers of shape \(2,\)"):
        classes(codes, class_labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="class_labels given"):
        _model()(codes, class_labels=torch.zeros(2, dtype=torch.long))

    with pytest.raises(ValueError, match="codes must be"):
        _model()(codes[0])
    with pytest.raises(ValueError, match="x must be"):
        _model().forward_embedded(torch.zeros(2, DIM + 1, 4, 4))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kernel_size=4), "kernel_size must be odd"),
        (dict(kernel_size=1), "kernel_size must be odd"),
        (dict(attention_every=1, attention_heads=3), "attention_heads"),
        (dict(layers=0), "layers"),
        (dict(condition_factor=0), "condition_factor"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_constructor_refuses_bad_sizes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GatedPixelCNN(K, dim=DIM, **kwargs)


def test_hyperparameters_rebuild_the_same_model():
    model = _model(**VARIANTS["bottom"], attention_every=2)
    again = GatedPixelCNN(**model.hyperparameters())
    assert again.state_dict().keys() == model.state_dict().keys()


# ritheshkumar95/pytorch-vqvae's GatedPixelCNN(512, 64, 15, n_classes=10), counted.
REFERENCE_PARAMETERS = 1_841_472


def test_parameter_count_is_comparable_to_public_code():
    model = GatedPixelCNN(512, dim=64, layers=15, kernel_size=7, num_classes=10)
    count = sum(p.numel() for p in model.parameters())
    print(f"GatedPixelCNN(K=512, dim=64, layers=15, k=7, classes=10): {count:,} parameters")
    assert count == 1_910_720  # the last layer has no residual conv: nothing reads its h
    assert 0.9 < count / REFERENCE_PARAMETERS < 1.1
