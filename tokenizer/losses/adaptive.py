"""taming's adaptive weight of the generator's adversarial term (Esser et al. 2021, eq. 7):

    lambda = ||grad_W rec_loss|| / (||grad_W gan_loss|| + 1e-4),   W = the decoder's last layer

clamped to [0, 1e4], detached, times the configured weight. It balances the two terms'
pulls on the decoder's output whatever the scale of either loss. The 1e-4 keeps it finite
when the adversarial gradient vanishes (then the clamp caps it).

Two ways to get the two gradients, the same numbers:
- `adaptive_weight(rec, gan, W)`: torch.autograd.grad with respect to the weight itself,
  as taming does. autograd.grad accumulates nothing, so DDP's reducer does not fire.
- `adaptive_weight_at(rec, gan, tap)`: never differentiates with respect to a parameter.
  A forward hook (`ConvTap`) keeps the last conv's input h and output y, the gradients
  stop at y (an activation), and grad_W = conv2d_weight(h, W's shape, dL/dy) is rebuilt
  from them, exactly what the conv's own backward computes. Under ZeRO-3 W is a 1-D shard
  outside its forward; only its shape (`ds_shape`) is needed, so nothing is gathered.
Measured with DeepSpeed 0.19.8 on CPU (one rank, gloo, ZeRO 1/2/3, three AdamW steps of a
two-conv generator against a single-process reference): when the engine's forward returns
a dataclass (as TokenizerOutput is) both routes match the reference at every stage. When
it returns a bare tensor, DeepSpeed hangs its backward prologue on that tensor, and the
parameter route breaks the following real backward (ZeRO-2: IndexError in the gradient
partition epilogue; ZeRO-3: "active_backward_submodules is empty"; wrapping the calls in
zero.GatheredParameters: "weight should have at least three dimensions"); the tapped
route then still works at ZeRO-3 (at ZeRO-2 its gradient reaches that output hook and fails
alike). Under DeepSpeed prefer the tapped route with a dataclass output: it leans on none
of DeepSpeed's parameter hooks. `loss.adversarial.adaptive=false` needs neither.
Either way each rank computes the weight from its own micro-batch, as taming does; the
averaged gradient then averages each rank's weighted term.
"""

from __future__ import annotations

from types import TracebackType

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

EPSILON = 1e-4
MAX_WEIGHT = 1e4


def _grad(loss: Tensor, wrt: Tensor, name: str) -> Tensor:
    # retain_graph: the real backward of the total loss runs after these two.
    (grad,) = torch.autograd.grad(loss, wrt, retain_graph=True, allow_unused=True)
    if grad is None:
        raise ValueError(
            f"adaptive weight: {name} does not depend on the decoder's last layer; pass "
            f"the weight of (or tap) the decoder's last layer (the model's last_layer())"
        )
    return grad


def _weight_from_grads(rec_grad: Tensor, gan_grad: Tensor, weight: float) -> Tensor:
    # Norms in fp32: under bf16 the gradients' squares lose the small entries.
    ratio = rec_grad.float().norm() / (gan_grad.float().norm() + EPSILON)
    return (ratio.clamp(0.0, MAX_WEIGHT) * weight).detach()


def adaptive_weight(
    rec_loss: Tensor, gan_loss: Tensor, last_layer: Tensor, weight: float = 1.0
) -> Tensor:
    """weight x clamp(||d rec_loss / d W|| / (||d gan_loss / d W|| + 1e-4), 0, 1e4), as a
    detached 0-d fp32 tensor. `rec_loss`: everything but the adversarial term that the
    decoder answers to (reconstruction, + perceptual); `gan_loss`: the generator's
    unweighted adversarial loss; `last_layer`: W, the decoder's last conv weight.
    Under DeepSpeed prefer `adaptive_weight_at` (module docstring)."""
    rec_grad = _grad(rec_loss, last_layer, "the reconstruction loss")
    gan_grad = _grad(gan_loss, last_layer, "the adversarial loss")
    return _weight_from_grads(rec_grad, gan_grad, weight)


class ConvTap:
    """Keeps the input and output of a Conv2d's latest forward, for `adaptive_weight_at`.

    Use as a context manager around the tokenizer's forward (`with ConvTap(conv) as tap:
    out = model(images)`), or call `close()` when done; the hook is removed either way.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"ConvTap needs an nn.Conv2d, got {type(conv).__name__}")
        self.conv = conv
        self.input: Tensor | None = None  # (B, C_in, H, W), detached
        self.output: Tensor | None = None  # (B, C_out, H', W'), in the graph
        self._handle: RemovableHandle | None = conv.register_forward_hook(self._record)

    def _record(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        self.input, self.output = inputs[0].detach(), output

    def weight_grad(self, grad_output: Tensor) -> Tensor:
        """dL/dW from dL/dy: what the conv's backward computes for its weight."""
        if self.input is None:
            raise RuntimeError("ConvTap: the tapped conv has not run a forward yet")
        weight = self.conv.weight
        shape = tuple(getattr(weight, "ds_shape", weight.shape))  # ZeRO-3: W is a shard
        conv = self.conv
        return torch.nn.grad.conv2d_weight(
            self.input.to(grad_output.dtype),
            shape,
            grad_output,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
        )

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self) -> ConvTap:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def adaptive_weight_at(
    rec_loss: Tensor, gan_loss: Tensor, tap: ConvTap, weight: float = 1.0
) -> Tensor:
    """`adaptive_weight` with the last layer's weight gradients rebuilt from its tapped
    activations: no autograd.grad reaches a parameter, so DeepSpeed's parameter hooks
    (ZeRO 1/2/3) never see it. Same value as `adaptive_weight` up to float rounding."""
    if tap.output is None:
        raise RuntimeError("ConvTap: the tapped conv has not run a forward yet")
    rec_out = _grad(rec_loss, tap.output, "the reconstruction loss")  # (B, C_out, H', W')
    gan_out = _grad(gan_loss, tap.output, "the adversarial loss")
    return _weight_from_grads(tap.weight_grad(rec_out), tap.weight_grad(gan_out), weight)
