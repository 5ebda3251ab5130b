"""Optimiser and learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from tokenizer.config import TrainConfig
from tokenizer.quantize import VectorQuantizer


def warmup_cosine(warmup_steps: int, max_steps: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1, then cosine decay to min_ratio at max_steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


@dataclass
class ParameterGroups:
    """A model's trainable parameters split by whether weight decay applies, by name."""

    decay: dict[str, nn.Parameter]  # convolution and linear weights
    no_decay: dict[str, nn.Parameter]  # the codebook, biases, norm weights, any 1-D tensor


def parameter_groups(model: nn.Module) -> ParameterGroups:
    """Weight decay on the weights of convolutions and linear maps only (MaskBit's AdamW).

    Not on biases and norm gains (1-D: decaying them pulls activations' offsets and scales
    to zero for no regularising benefit), and never on a codebook: decay drags every code
    towards the origin, away from the encoder outputs it is meant to sit on.
    """
    codebooks = {
        id(m.embed)
        for m in model.modules()
        if isinstance(m, VectorQuantizer) and isinstance(m.embed, nn.Parameter)
    }
    groups = ParameterGroups(decay={}, no_decay={})
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # ZeRO-3 partitions parameters to 1-D shards; ds_shape keeps the real shape.
        ndim = len(getattr(param, "ds_shape", param.shape))
        target = groups.no_decay if ndim < 2 or id(param) in codebooks else groups.decay
        target[name] = param
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, LambdaLR]:
    """A plain AdamW with two parameter groups (DeepSpeed wraps it as it is), weight
    decay on conv/linear weights only, and its warmup + cosine schedule."""
    groups = parameter_groups(model)
    param_groups = [
        {"params": list(params.values()), "weight_decay": decay}
        for params, decay in ((groups.decay, cfg.weight_decay), (groups.no_decay, 0.0))
        if params
    ]
    optimizer = torch.optim.AdamW(
        param_groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay
    )
    schedule = warmup_cosine(cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    return optimizer, LambdaLR(optimizer, schedule)
