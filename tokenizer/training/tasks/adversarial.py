"""The tokenizer trained against a PatchGAN discriminator (the VQGAN objective: taming,
LlamaGen, MaskBit): the tokenizer task's losses plus the generator's adversarial term,
and a discriminator part with its own optimiser and schedule, idle before
`loss.adversarial.start_step`.

The discriminator is a local part (Part.engine=False): it stays out of the engine, so the
tokenizer alone is the DeepSpeed engine under ZeRO-1/2/3 (Accelerate drives one engine per
Accelerator), and its gradients are averaged over ranks by the task. It is small (a few
million parameters); sharding it would save nothing worth a second engine.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import nn

from tokenizer.config import Config, ConfigError
from tokenizer.losses.adaptive import ConvTap
from tokenizer.losses.adversarial import (
    adversarial_active,
    discriminator_lr_factor,
    discriminator_terms,
    generator_terms,
)
from tokenizer.losses.lecam import LeCam
from tokenizer.losses.reconstruction import LossTerms
from tokenizer.models import TokenizerOutput
from tokenizer.nn.discriminator import PatchDiscriminator
from tokenizer.training.engine import deepspeed_requested
from tokenizer.training.task import NonFiniteGuard, Part
from tokenizer.training.tasks.tokenizer import OtherSteps, TokenizerTask

DISCRIMINATOR = "discriminator"


class Critic(nn.Module):
    """The discriminator and its LeCam averages, one module so both are checkpointed."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.net = PatchDiscriminator.from_config(cfg.loss.adversarial)
        self.lecam = LeCam(cfg.loss.adversarial.lecam_decay)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)  # (B, 1, h, w) patch logits


class AdversarialTask(TokenizerTask):
    def __init__(self, cfg: Config, accelerator: Accelerator) -> None:
        super().__init__(cfg, accelerator)
        adv = cfg.loss.adversarial
        if adv.adaptive and not callable(getattr(self.tokenizer.core, "last_layer", None)):
            raise ConfigError(
                f"loss.adversarial.adaptive needs the decoder's last layer; model.arch "
                f"{cfg.model.arch!r} does not expose one (last_layer()): set it to false"
            )
        critic = Critic(cfg)
        optimizer = torch.optim.AdamW(
            critic.parameters(), lr=adv.lr, betas=tuple(adv.betas), weight_decay=adv.weight_decay
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, discriminator_lr_factor(adv))
        self.critic = Part(DISCRIMINATOR, critic, optimizer, schedule, engine=False)
        self.critic_guard = NonFiniteGuard(accelerator, deepspeed=False)
        self._tap: ConvTap | None = None

    def parts(self) -> list[Part]:
        return [self.tokenizer, self.critic]

    def _adaptive_at(self) -> torch.Tensor | ConvTap | None:
        """Where the adaptive weight reads the decoder's last-layer gradients: the weight
        itself, or under DeepSpeed a tap on its conv (tokenizer/losses/adaptive.py)."""
        if not self.cfg.loss.adversarial.adaptive:
            return None
        if deepspeed_requested():
            return self._tap
        return self.tokenizer.core.last_layer()

    def forward(self, images: torch.Tensor) -> TokenizerOutput:
        if self.cfg.loss.adversarial.adaptive and deepspeed_requested() and self._tap is None:
            self._tap = ConvTap(_conv_of(self.tokenizer.core))
        return super().forward(images)

    def losses(self, images: torch.Tensor, out: TokenizerOutput, step: int) -> LossTerms:
        terms = super().losses(images, out, step)
        adv = self.cfg.loss.adversarial
        if not adversarial_active(step, adv):
            return terms
        critic = self.critic.module
        critic.requires_grad_(False)  # the generator's term must not train the critic
        with self.accelerator.autocast():
            # fp32 in: an engine that casts the tokenizer (DeepSpeed bf16) hands out bf16.
            logits_fake = critic(out.reconstruction.float())  # (B, 1, h, w)
        critic.requires_grad_(True)
        # taming balances the adversarial term against the decoder's other pixel losses.
        rec = terms.terms["reconstruction"]
        if "perceptual" in terms.terms:
            rec = rec + self.cfg.loss.perceptual.weight * terms.terms["perceptual"]
        gen = generator_terms(logits_fake, adv, step, rec, self._adaptive_at())
        terms.total = terms.total + gen.weighted
        terms.terms["generator"] = gen.g_loss
        terms.terms["adaptive_weight"] = gen.adaptive_weight
        return terms

    def after_tokenizer_step(
        self, images: torch.Tensor, out: TokenizerOutput, step: int
    ) -> OtherSteps:
        adv = self.cfg.loss.adversarial
        if not adversarial_active(step, adv):
            return OtherSteps()
        critic: Critic = self.critic.module
        fake = out.reconstruction.detach().float()  # (B, 3, H, W): none into the tokenizer
        with self.accelerator.autocast():
            # Two forwards: BatchNorm normalises real and fake apart, as taming does.
            logits_real, logits_fake = critic(images), critic(fake)
        terms = discriminator_terms(
            logits_real,
            logits_fake,
            adv,
            critic.lecam,
            reduce_mean=lambda t: self.accelerator.reduce(t, reduction="mean"),
        )
        skipped = self.critic_guard.backward(terms.d_loss, self.critic, self.cfg.train.grad_clip)
        return OtherSteps(scalars=terms.scalars(), skipped=skipped)


def _conv_of(model: nn.Module) -> nn.Conv2d:
    """The Conv2d whose weight model.last_layer() is."""
    weight = model.last_layer()
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.weight is weight:
            return module
    raise ConfigError("loss.adversarial.adaptive: the model's last_layer() is not a Conv2d weight")
