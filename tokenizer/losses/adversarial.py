"""The adversarial half of the VQGAN objective: the discriminator's and the generator's
GAN losses on patch logits, their weights, and when they act.

Pure functions of logits (the discriminator runs elsewhere: tokenizer/nn/discriminator.py),
computed in fp32 so bf16 logits do not round the small hinge margins away. A step trains:
- the generator (the tokenizer) on rec + weight x g_loss(D(fake)), `generator_terms`;
- the discriminator on d_loss(D(real), D(fake.detach())) (+ LeCam), `discriminator_terms`;
both idle before `loss.adversarial.start_step` (`adversarial_active`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenizer.config import GAN_LOSSES, AdversarialConfig
from tokenizer.losses.adaptive import ConvTap, adaptive_weight, adaptive_weight_at
from tokenizer.losses.lecam import LeCam


def _check_kind(kind: str) -> None:
    if kind not in GAN_LOSSES:
        raise ValueError(f"loss.adversarial.loss: unknown kind {kind!r} ({', '.join(GAN_LOSSES)})")


def discriminator_loss(logits_real: Tensor, logits_fake: Tensor, kind: str) -> Tensor:
    """Logits of any shape ((B, 1, h, w) patches) -> 0-d loss, halved as taming does (so
    the two kinds, and taming's learning rates, stay on one scale).

    hinge:          (mean relu(1 - real) + mean relu(1 + fake)) / 2
    non_saturating: (mean softplus(-real) + mean softplus(fake)) / 2,
                    the binary cross-entropy of real -> 1, fake -> 0 (taming's "vanilla")
    """
    _check_kind(kind)
    real, fake = logits_real.float(), logits_fake.float()
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
    return 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())


def generator_loss(logits_fake: Tensor, kind: str) -> Tensor:
    """The generator's adversarial loss on the logits of its reconstructions (0-d).

    hinge:          -mean(fake) (taming, LlamaGen: the hinge's generator side is linear)
    non_saturating: mean softplus(-fake) = -mean log sigmoid(fake) (Goodfellow et al.:
                    strong gradients while the discriminator still wins easily)
    """
    _check_kind(kind)
    fake = logits_fake.float()
    if kind == "hinge":
        return -fake.mean()
    return F.softplus(-fake).mean()


def adversarial_active(step: int, cfg: AdversarialConfig) -> bool:
    """Whether the discriminator trains and the generator sees its term at `step`
    (optimiser steps done before this one, as TrainingTask.train_step gets it). Before
    `start_step`, or with weight 0, neither happens: no discriminator forward is needed."""
    return cfg.weight > 0 and step >= cfg.start_step


def discriminator_lr_factor(cfg: AdversarialConfig) -> Callable[[int], float]:
    """The discriminator's LR multiplier (a LambdaLR lambda, stepped once per optimiser
    step like every part's): 0 before start_step, then a linear warmup over warmup_steps
    to 1, then constant. Its own schedule, not train's cosine: it starts late (often 20k
    steps in) and taming and LlamaGen keep it constant."""

    def factor(step: int) -> float:
        since = step - cfg.start_step
        if since < 0:
            return 0.0
        if since < cfg.warmup_steps:
            return (since + 1) / cfg.warmup_steps
        return 1.0

    return factor


@dataclass
class DiscriminatorTerms:
    """What the discriminator's step computed. Every tensor is 0-d fp32."""

    d_loss: Tensor  # what its backward sees: gan + lecam_weight x lecam
    gan: Tensor  # the GAN loss alone
    lecam: Tensor  # the LeCam regulariser, unweighted; 0 when off
    logits_real: Tensor  # mean logit on real images, detached, for the log
    logits_fake: Tensor  # mean logit on the (detached) reconstructions, for the log

    def scalars(self, prefix: str = "disc/") -> dict[str, Tensor]:
        """The terms by name, detached, for StepOutput.scalars."""
        return {
            f"{prefix}loss": self.d_loss.detach(),
            f"{prefix}gan": self.gan.detach(),
            f"{prefix}lecam": self.lecam.detach(),
            f"{prefix}logits_real": self.logits_real,
            f"{prefix}logits_fake": self.logits_fake,
        }


def discriminator_terms(
    logits_real: Tensor,
    logits_fake: Tensor,
    cfg: AdversarialConfig,
    lecam: LeCam | None = None,
    reduce_mean: Callable[[Tensor], Tensor] | None = None,
) -> DiscriminatorTerms:
    """The discriminator's loss on D(real) and D(fake.detach()), both (B, 1, h, w).

    With `lecam` and `cfg.lecam_weight > 0` its EMAs are updated with this batch (through
    `reduce_mean` across ranks, when given) and its penalty joins the loss.
    """
    gan = discriminator_loss(logits_real, logits_fake, cfg.loss)
    reg = torch.zeros((), device=gan.device)
    if lecam is not None and cfg.lecam_weight > 0:
        reg = lecam(logits_real, logits_fake, reduce_mean)
    return DiscriminatorTerms(
        d_loss=gan + cfg.lecam_weight * reg,
        gan=gan,
        lecam=reg,
        logits_real=logits_real.detach().float().mean(),
        logits_fake=logits_fake.detach().float().mean(),
    )


@dataclass
class GeneratorTerms:
    """The generator's adversarial term. Every tensor is 0-d fp32."""

    g_loss: Tensor  # the unweighted generator loss (carries the gradient)
    adaptive_weight: Tensor  # the weight applied, detached: adaptive or fixed; 0 when idle
    weighted: Tensor  # adaptive_weight x g_loss: what joins the tokenizer's total
    logits_fake: Tensor  # mean logit on the reconstructions, detached, for the log

    def scalars(self, prefix: str = "loss/") -> dict[str, Tensor]:
        return {
            f"{prefix}adversarial": self.g_loss.detach(),
            f"{prefix}adversarial_weight": self.adaptive_weight,
            f"{prefix}logits_fake": self.logits_fake,
        }


def generator_terms(
    logits_fake: Tensor,
    cfg: AdversarialConfig,
    step: int,
    rec_loss: Tensor | None = None,
    last_layer: Tensor | ConvTap | None = None,
) -> GeneratorTerms:
    """The generator's term on D(fake) (B, 1, h, w), gradients flowing into the fakes.

    Weight: 0 before start_step (`adversarial_active`); then cfg.weight, or with
    cfg.adaptive taming's adaptive weight from `rec_loss` (the non-adversarial loss the
    decoder answers to) and `last_layer`: the decoder's last conv weight, or under
    DeepSpeed a ConvTap on that conv (tokenizer/losses/adaptive.py says why).
    """
    g_loss = generator_loss(logits_fake, cfg.loss)
    if not adversarial_active(step, cfg):
        weight = torch.zeros((), device=g_loss.device)
    elif cfg.adaptive:
        if rec_loss is None or last_layer is None:
            raise ValueError("loss.adversarial.adaptive needs rec_loss and last_layer")
        if isinstance(last_layer, ConvTap):
            weight = adaptive_weight_at(rec_loss, g_loss, last_layer, cfg.weight)
        else:
            weight = adaptive_weight(rec_loss, g_loss, last_layer, cfg.weight)
    else:
        weight = torch.tensor(cfg.weight, device=g_loss.device)
    return GeneratorTerms(
        g_loss=g_loss,
        adaptive_weight=weight,
        weighted=weight * g_loss,
        logits_fake=logits_fake.detach().float().mean(),
    )
