"""LeCam regularisation of the discriminator (Tseng et al. 2021, "Regularizing Generative
Adversarial Networks under Limited Data"; used by MaskBit's VQGAN+ and Open-MAGVIT2).

It keeps exponential moving averages of the discriminator's mean logit on real and on fake
images, and penalises logits that cross the other side's average:

    reg = mean(relu(D(real) - ema_fake)^2) + mean(relu(ema_real - D(fake))^2)

so real logits pay for rising above the fakes' usual level and fake logits for falling
below the reals': the discriminator cannot run its logits away from the generator's
(Tseng et al. show the regularised objective minimises a weighted LeCam divergence,
which stays stable where the unregularised one diverges on little data).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LeCam(nn.Module):
    """The two EMAs (0-d fp32 buffers, so they are checkpointed with whatever module
    holds this one) and the regulariser.

    The EMAs must be the same on every rank, as the codebook's are: pass `reduce_mean`
    (an all-reduce mean over ranks, from the task) to `update`. DeepSpeed never
    synchronises buffers; DDP copies rank 0's over the others' before each forward when
    this module sits inside the wrapped one; with `reduce_mean` both agree anyway.
    """

    ema_real: Tensor
    ema_fake: Tensor

    def __init__(self, decay: float = 0.999) -> None:
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"LeCam decay must be in (0, 1), got {decay}")
        self.decay = decay
        # Start at 0, as MaskBit and Open-MAGVIT2 do (no bias correction): the penalty is
        # weak while the averages warm up, which is when the logits are near 0 anyway.
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    @torch.no_grad()
    def update(
        self,
        logits_real: Tensor,
        logits_fake: Tensor,
        reduce_mean: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        """ema <- decay * ema + (1 - decay) * batch mean, for real and fake logits."""
        means = torch.stack([logits_real.float().mean(), logits_fake.float().mean()])  # (2,)
        if reduce_mean is not None:
            means = reduce_mean(means)
        self.ema_real.lerp_(means[0], 1.0 - self.decay)
        self.ema_fake.lerp_(means[1], 1.0 - self.decay)

    def penalty(self, logits_real: Tensor, logits_fake: Tensor) -> Tensor:
        """The regulariser for these logits against the current EMAs (0-d, fp32)."""
        real = F.relu(logits_real.float() - self.ema_fake).pow(2).mean()
        fake = F.relu(self.ema_real - logits_fake.float()).pow(2).mean()
        return real + fake

    def forward(
        self,
        logits_real: Tensor,
        logits_fake: Tensor,
        reduce_mean: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """Update the EMAs with this batch, then penalise it against them (the order of
        Tseng et al.'s code and Open-MAGVIT2; MaskBit penalises against the EMAs before
        the update and applies the penalty to the batch-mean logits, not to each logit)."""
        self.update(logits_real, logits_fake, reduce_mean)
        return self.penalty(logits_real, logits_fake)
