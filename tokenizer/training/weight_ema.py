"""An exponential moving average of a model's weights (MaskBit, Open-MAGVIT2 and TiTok
keep one and release it): smoother than the last step's weights, and what a release holds
when `train.ema_decay` > 0."""

from __future__ import annotations

import torch
from torch import nn


class WeightEMA:
    """An fp32 shadow of `module`'s state: parameters averaged after every optimiser step,
    ema <- decay * ema + (1 - decay) * param; buffers (an EMA codebook, usage counters)
    copied as they are, since they already are the model's own running statistics.

    Keys are the module's state_dict keys, so the shadow loads into a fresh model."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay must be in (0, 1), got {decay}")
        partitioned = [n for n, p in module.named_parameters() if hasattr(p, "ds_id")]
        if partitioned:
            # Each ZeRO-3 rank holds a shard of every parameter: averaging needs a gather
            # of the whole model every step, which this class does not do.
            raise ValueError(
                "train.ema_decay > 0 under DeepSpeed ZeRO-3 is not supported (parameters "
                f"such as {partitioned[0]} are partitioned); use ZeRO-1/2 or DDP"
            )
        self.decay = decay
        self.params = {n: p.detach().float().clone() for n, p in module.named_parameters()}
        saved = module.state_dict().keys()  # persistent buffers only, found once
        self._buffer_names = [n for n, _ in module.named_buffers() if n in saved]
        self.buffers: dict[str, torch.Tensor] = {}
        self._copy_buffers(module)

    def _copy_buffers(self, module: nn.Module) -> None:
        buffers = dict(module.named_buffers())
        for name in self._buffer_names:
            self.buffers[name] = buffers[name].detach().clone()

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        # One fused lerp over every parameter (as timm's ModelEmaV3), not one op each:
        # this runs after every optimiser step.
        shadows = list(self.params.values())
        current = [p.detach().float() for _, p in module.named_parameters()]
        torch._foreach_lerp_(shadows, current, 1.0 - self.decay)
        self._copy_buffers(module)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """CPU tensors, contiguous, for safetensors."""
        state = {**self.params, **self.buffers}
        return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.params) | set(self.buffers)
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise KeyError(f"weight EMA state does not fit the model: missing {missing[:5]}, "
                           f"unexpected {extra[:5]}")  # fmt: skip
        for name, target in (*self.params.items(), *self.buffers.items()):
            target.copy_(state[name].to(target.device, target.dtype))


def ema_name(part: str) -> str:
    """The checkpoint name of a part's weight EMA (`<name>.safetensors` in a checkpoint)."""
    return f"{part}_ema"
