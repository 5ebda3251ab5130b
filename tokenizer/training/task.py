"""What one training step computes: a task. The loop (tokenizer/training/loop.py) is one.

The loop owns the engine, the data stream, resume and the schedule of logs, previews,
evaluations and checkpoints. A task owns what differs between objectives: its parts (each a
module with its own optimiser and LR schedule: the tokenizer; later a discriminator or a
prior), what a micro-step computes and which code grids it trains. Everything the loop does
with a part (prepare, accumulate, checkpoint, resume) goes by the part's name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from tokenizer.distributed import average_gradients, current_collective
from tokenizer.quantize import VectorQuantizer


@dataclass
class Part:
    """One trained module with its optimiser and schedule. After `accelerator.prepare`
    `module` and `optimizer` of an engine part are the prepared (wrapped) objects; `core`
    stays the bare module, for the forwards that must not go through a wrapper (previews,
    evaluation)."""

    name: str
    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    # True: prepared by the Accelerator (DDP or a DeepSpeed engine). False: a small module
    # kept out of the engine (a discriminator beside a ZeRO-sharded tokenizer: Accelerate
    # drives one DeepSpeed engine per Accelerator): moved to the device, its gradients
    # averaged over ranks by local_optimizer_step, checkpointed by the loop.
    engine: bool = True
    core: nn.Module = field(init=False)

    def __post_init__(self) -> None:
        self.core = self.module


@dataclass
class StepOutput:
    """What one micro-step reports to the metric window, by name.

    scalars: 0-d tensors (loss terms, weights, logits), averaged over the micro-steps of a
    log window; per_image: (B,) tensors (PSNR), averaged over images; code_counts: grid
    name -> (K,) hits of each code in this micro-batch.
    """

    scalars: dict[str, torch.Tensor]
    per_image: dict[str, torch.Tensor] = field(default_factory=dict)
    code_counts: dict[str, torch.Tensor] = field(default_factory=dict)
    num_samples: int = 0
    # The optimiser step this micro-step belongs to is skipped (a non-finite loss on some
    # rank): the loop counts it and leaves the step's values out of the log window.
    skipped: bool = False


class TrainingTask(ABC):
    """A training objective. The loop calls, in order: `parts()` once (then prepares them
    and writes the prepared objects back into the same Part objects), `quantizers()` to
    synchronise every code grid across ranks, then `train_step` for every micro-batch
    inside `accelerator.accumulate` of every part."""

    @abstractmethod
    def parts(self) -> list[Part]:
        """The task's parts, built once, in a fixed order (the checkpoint's order)."""

    def description(self) -> str:
        """What is trained, for the log's first line (e.g. the model's architecture)."""
        return type(self).__name__

    @property
    @abstractmethod
    def release_part(self) -> str:
        """The part a release (tools/export_tokenizer.py) is written from."""

    def quantizers(self) -> dict[str, VectorQuantizer]:
        """Grid name -> the quantizer the loop synchronises, checks and logs; {} if none."""
        return {}

    @abstractmethod
    def train_step(self, batch: Any, step: int) -> StepOutput:
        """One micro-step: forward, losses, backward and (on the accumulation boundary,
        as Accelerate decides) the optimiser steps of the parts it trains. `step` is the
        number of optimiser steps done before this one."""

    @abstractmethod
    def batches(
        self, shards: list[str], rank: int, world_size: int, state: dict | None
    ) -> tuple[Iterator[Any], Any]:
        """An endless iterator of this rank's batches, and the stream tracker whose
        `update(batch)`, `state_dict()` and `bad_samples` the loop keeps and checkpoints
        (`state`: a tracker state to resume from)."""

    def preview(self, shards: list[str]) -> Callable[[], list[torch.Tensor]] | None:
        """A function giving the image rows (B, 3, H, W) in [-1, 1] to save as training
        goes, on a fixed held-out batch; None: no preview. Every rank calls the function
        (ZeRO-3 gathers weights collectively); the main process saves."""
        return None

    def extra_weights(self) -> dict[str, dict[str, torch.Tensor]]:
        """Tensors beside the parts' own state that a checkpoint keeps, by name (a weight
        EMA): each is written by the main process as `<name>.safetensors`. Every rank
        calls this; their values must be the same on every rank."""
        return {}

    def load_extra_weights(self, weights: dict[str, dict[str, torch.Tensor]]) -> None:
        """What a resumed checkpoint holds of extra_weights()' names (absent ones missing)."""
        if weights:
            raise ValueError(f"this task keeps no extra weights, got {sorted(weights)}")

    def evaluate(self, shards: list[str], accelerator: Accelerator) -> dict[str, float] | None:
        """Held-out metrics by name; every rank calls it; None: nothing to evaluate."""
        return None


def optimizer_step(accelerator: Accelerator, part: Part, grad_clip: float) -> None:
    """Clip (on the accumulation boundary only: the gradient is whole then), step, zero.
    An engine part's prepared optimiser steps only on the boundary; a local part's
    gradients are averaged over ranks there first (see Part.engine)."""
    if not part.engine:
        _local_optimizer_step(accelerator, part, grad_clip)
        return
    if accelerator.sync_gradients and grad_clip > 0:
        accelerator.clip_grad_norm_(part.module.parameters(), grad_clip)
    part.optimizer.step()
    part.optimizer.zero_grad(set_to_none=True)


def _local_optimizer_step(accelerator: Accelerator, part: Part, grad_clip: float) -> None:
    if not accelerator.sync_gradients:
        return  # gradients accumulate in .grad until the boundary, as DDP's no_sync does
    average_gradients(current_collective(), part.module)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(part.module.parameters(), grad_clip)
    part.optimizer.step()
    part.optimizer.zero_grad(set_to_none=True)


def backward(accelerator: Accelerator, part: Part, loss: torch.Tensor) -> None:
    """Backward for one part's loss: through the engine for an engine part (DeepSpeed
    steps inside its backward), plain autograd for a local part (its loss must not
    reach the engine's parameters: detach what comes from them)."""
    if part.engine:
        accelerator.backward(loss)
    else:
        loss.backward()


class NonFiniteGuard:
    """Skips an optimiser step on every rank when a loss of any of its micro-steps is
    non-finite on any rank (GAN onsets and bf16 are where this happens): one all-reduce
    of a flag per micro-step, so that the ranks agree before any of them runs backward.

    Under DDP (and one process) the step is skipped whole: no backward from the bad
    micro-step on, no optimiser step, gradients zeroed. Under DeepSpeed the engine steps
    inside backward and keeps its own accumulation count, so a bad micro-step runs
    backward on a zero loss instead (the engine's step cannot be withheld; the other
    micro-steps' gradients are applied)."""

    def __init__(self, accelerator: Accelerator, deepspeed: bool) -> None:
        self.accelerator, self.deepspeed = accelerator, deepspeed
        self.bad = False

    def usable(self, loss: torch.Tensor) -> bool:
        """Whether this micro-step may run backward on `loss` (same answer on every rank)."""
        if not self.bad:
            flag = (~torch.isfinite(loss.detach())).any().float().reshape(1)
            self.bad = self.accelerator.reduce(flag, reduction="sum").item() > 0
        return not self.bad

    def backward(self, loss: torch.Tensor, part: Part, grad_clip: float) -> bool:
        """Backward and step `part` unless the step went bad; returns whether this
        optimiser step is being skipped. Call once per micro-step."""
        if self.usable(loss):
            backward(self.accelerator, part, loss)
            optimizer_step(self.accelerator, part, grad_clip)
        elif self.deepspeed and part.engine:
            trainable = [p for p in part.module.parameters() if p.requires_grad]
            self.accelerator.backward(sum(p.sum() * 0.0 for p in trainable))
            optimizer_step(self.accelerator, part, grad_clip)
        elif self.accelerator.sync_gradients:
            part.optimizer.zero_grad(set_to_none=True)
        skipped = self.bad
        if self.accelerator.sync_gradients:
            self.bad = False  # the next optimiser step starts clean
        return skipped
