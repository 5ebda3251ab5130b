"""The weight EMA: the average by hand, buffers copied, refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tokenizer.training.weight_ema import WeightEMA


class WithBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 1)
        self.register_buffer("counts", torch.zeros(3))
        self.register_buffer("scratch", torch.zeros(1), persistent=False)


def test_parameters_are_averaged_and_buffers_copied():
    model = WithBuffer()
    start = model.lin.weight.detach().clone()
    ema = WeightEMA(model, decay=0.9)
    with torch.no_grad():
        model.lin.weight.add_(1.0)
        model.counts.fill_(5.0)
    ema.update(model)
    torch.testing.assert_close(ema.params["lin.weight"], start + 0.1)
    with torch.no_grad():
        model.lin.weight.add_(1.0)  # now start + 2
    ema.update(model)
    torch.testing.assert_close(ema.params["lin.weight"], 0.9 * (start + 0.1) + 0.1 * (start + 2))
    state = ema.state_dict()
    assert set(state) == set(model.state_dict()) and "scratch" not in state
    torch.testing.assert_close(state["counts"], torch.full((3,), 5.0))
    fresh = WithBuffer()
    fresh.load_state_dict(state)  # the shadow loads into a model as it is
    other = WeightEMA(fresh, decay=0.9)
    other.load_state_dict(state)
    torch.testing.assert_close(other.params["lin.weight"], state["lin.weight"])


def test_refusals():
    model = WithBuffer()
    with pytest.raises(ValueError, match="ema_decay"):
        WeightEMA(model, decay=1.0)
    ema = WeightEMA(model, decay=0.5)
    with pytest.raises(KeyError, match="missing"):
        ema.load_state_dict({"lin.weight": torch.zeros(1, 2)})
    model.lin.weight.ds_id = 7  # as ZeRO-3 marks a partitioned parameter
    with pytest.raises(ValueError, match="ZeRO-3"):
        WeightEMA(model, decay=0.5)
