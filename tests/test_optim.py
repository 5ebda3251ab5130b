"""AdamW's parameter groups: weight decay on conv/linear weights only, never on the
codebook, biases or norm weights; and the warmup + cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tokenizer.config import TrainConfig, load_config
from tokenizer.models import build_model
from tokenizer.quantize import VectorQuantizer
from tokenizer.training.optim import build_optimizer, parameter_groups, warmup_cosine

TINY = [
    "model.channels=[8]",
    "model.num_res_blocks=1",
    "model.res_channels=4",
    "quantizer.codebook_size=16",
    "quantizer.code_dim=4",
    "quantizer.lookup_dim=2",
    "data.resolution=8",
]


def _conv_layers(prefix: str, indices: list[str]) -> set[str]:
    return {f"{prefix}.{i}" for i in indices}


ENCODER = _conv_layers("encoder.net", ["0", "2", "3.0.block.1", "3.0.block.3", "4"])
DECODER = _conv_layers("decoder.net", ["0", "1.0.block.1", "1.0.block.3", "2"])
PROJECTIONS = {"quantizer.project_in", "quantizer.project_out"}
LAYERS = ENCODER | DECODER | PROJECTIONS


@pytest.mark.parametrize("ema", [False, True])
def test_groups_of_the_vqvae_by_name(ema: bool) -> None:
    cfg = load_config(overrides=[*TINY, f"quantizer.ema={str(ema).lower()}"])
    groups = parameter_groups(build_model(cfg))
    assert set(groups.decay) == {f"{layer}.weight" for layer in LAYERS}
    # The trained codebook is a parameter that never decays; under EMA it is a buffer.
    codebook = set() if ema else {"quantizer.embed"}
    assert set(groups.no_decay) == {f"{layer}.bias" for layer in LAYERS} | codebook


def test_norm_weights_and_frozen_parameters() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.GroupNorm(2, 4),
        nn.Linear(4, 4, bias=False),
        VectorQuantizer(8, 4),
        nn.LayerNorm(4),
    )
    model[2].weight.requires_grad_(False)  # frozen: in no group
    groups = parameter_groups(model)
    assert set(groups.decay) == {"0.weight"}
    assert set(groups.no_decay) == {"0.bias", "1.weight", "1.bias", "3.embed", "4.weight", "4.bias"}


def test_one_step_with_zero_gradients_decays_only_conv_and_linear_weights() -> None:
    torch.manual_seed(0)
    cfg = load_config(overrides=[*TINY, "quantizer.ema=false"])
    model = build_model(cfg)
    train = TrainConfig(lr=0.1, weight_decay=0.5, warmup_steps=0, max_steps=10)
    optimizer, _ = build_optimizer(model, train)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # zero, not None: AdamW skips parameters without grad
    optimizer.step()
    # With a zero gradient Adam's update is 0; decoupled decay alone scales by 1 - lr * wd.
    shrink = 1.0 - train.lr * train.weight_decay
    for name, p in model.named_parameters():
        if name.endswith(".weight"):
            torch.testing.assert_close(p.detach(), before[name] * shrink, msg=name)
        else:  # biases and the codebook
            assert torch.equal(p.detach(), before[name]), name
    decays = sorted(group["weight_decay"] for group in optimizer.param_groups)
    assert decays == [0.0, 0.5]


def test_warmup_cosine_by_hand() -> None:
    factor = warmup_cosine(warmup_steps=4, max_steps=14, min_ratio=0.1)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert factor(14) == pytest.approx(0.1) and factor(100) == pytest.approx(0.1)
