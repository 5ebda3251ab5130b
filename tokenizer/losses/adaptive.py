"""taming's adaptive weight of the generator's adversarial term (Esser et al. 2021, eq. 7):

    lambda = ||grad_L rec_loss|| / (||grad_L gan_loss|| + 1e-4),   L = the decoder's last layer

clamped to [0, 1e4], detached, times the configured weight. It balances the two terms'
pulls on the decoder's output whatever the scale of either loss. The 1e-4 keeps it finite
when the adversarial gradient vanishes (then the clamp caps it).

Distributed notes:
- Each rank computes it from its own micro-batch, as taming does: torch.autograd.grad
  returns gradients without accumulating them, so neither DDP's nor DeepSpeed's gradient
  hooks fire and nothing is reduced. Ranks then weight their own terms slightly
  differently, and the averaged gradient averages those weighted terms.
- ZeRO-3 partitions parameters: outside its forward and backward hooks the last layer's
  weight holds only a 1-D shard (`ds_shape` keeps the real shape). Two ways through:
  pass `gather`, a context manager factory that makes the whole weight present for the
  two gradient calls, e.g. `lambda p: deepspeed.zero.GatheredParameters([p])`; or, where
  gathering is not wanted, set `loss.adversarial.adaptive=false` (the fixed weight of
  LlamaGen and MaskBit), which needs no parameter at all.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor

GatherFn = Callable[[Tensor], AbstractContextManager]

EPSILON = 1e-4
MAX_WEIGHT = 1e4


def _grad(loss: Tensor, last_layer: Tensor, name: str) -> Tensor:
    # retain_graph: the real backward of the total loss runs after these two.
    (grad,) = torch.autograd.grad(loss, last_layer, retain_graph=True, allow_unused=True)
    if grad is None:
        raise ValueError(
            f"adaptive weight: {name} does not depend on the given last layer; pass the "
            f"weight of the decoder's last layer (the model's last_layer())"
        )
    return grad


def adaptive_weight(
    rec_loss: Tensor,
    gan_loss: Tensor,
    last_layer: Tensor,
    weight: float = 1.0,
    gather: GatherFn | None = None,
) -> Tensor:
    """weight x clamp(||d rec_loss / d L|| / (||d gan_loss / d L|| + 1e-4), 0, 1e4), as a
    detached 0-d fp32 tensor. `rec_loss`: everything but the adversarial term that the
    decoder answers to (reconstruction, + perceptual); `gan_loss`: the generator's
    unweighted adversarial loss; `last_layer`: the decoder's last conv weight."""
    with gather(last_layer) if gather is not None else nullcontext():
        rec_grad = _grad(rec_loss, last_layer, "the reconstruction loss")
        gan_grad = _grad(gan_loss, last_layer, "the adversarial loss")
    # Norms in fp32: under bf16 the gradients' squares lose the small entries.
    ratio = rec_grad.float().norm() / (gan_grad.float().norm() + EPSILON)
    return (ratio.clamp(0.0, MAX_WEIGHT) * weight).detach()
