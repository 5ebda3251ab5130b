"""The tokenizer task: one tokenizer model trained on reconstruction + its quantizers'
VQ terms (the VQ-VAE objective), plus LPIPS when loss.perceptual.weight > 0, with AdamW
and warmup + cosine, and optionally a weight EMA. The adversarial task builds on it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator

from tokenizer.config import Config
from tokenizer.data.stream import ImageBatch, StreamTracker, iter_eval_batches, make_train_loader
from tokenizer.evaluation.evaluate import evaluate_shards
from tokenizer.evaluation.metrics import psnr_per_image
from tokenizer.losses.perceptual import LPIPS
from tokenizer.losses.perceptual_setup import build_perceptual
from tokenizer.losses.reconstruction import LossTerms, vqvae_loss
from tokenizer.models import TokenizerModel, TokenizerOutput, build_model
from tokenizer.quantize import VectorQuantizer
from tokenizer.training.engine import deepspeed_requested
from tokenizer.training.optim import build_optimizer
from tokenizer.training.task import NonFiniteGuard, Part, StepOutput, TrainingTask
from tokenizer.training.weight_ema import WeightEMA, ema_name

logger = logging.getLogger("tokenizer.training.loop")

TOKENIZER = "tokenizer"  # the part's name: checkpoints and exports refer to it


@dataclass
class OtherSteps:
    """What the other parts' steps of a micro-step report (a discriminator's)."""

    scalars: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: bool = False


class TokenizerTask(TrainingTask):
    def __init__(self, cfg: Config, accelerator: Accelerator) -> None:
        self.cfg, self.accelerator = cfg, accelerator
        model = build_model(cfg)
        optimizer, scheduler = build_optimizer(model, cfg.train)
        self.tokenizer = Part(TOKENIZER, model, optimizer, scheduler)
        self._ema: WeightEMA | None = None
        self.guard = NonFiniteGuard(accelerator, deepspeed_requested())
        # A loss, not part of the model: frozen, never prepared, never in a checkpoint's
        # or a release's weights. Missing weight files stop the run here, before training.
        self.perceptual: LPIPS | None = None
        if cfg.loss.perceptual.weight > 0:
            self.perceptual = build_perceptual(cfg.loss.perceptual, accelerator.device)

    def parts(self) -> list[Part]:
        return [self.tokenizer]

    def description(self) -> str:
        return self.cfg.model.arch

    @property
    def release_part(self) -> str:
        return TOKENIZER

    @property
    def model(self) -> TokenizerModel:
        return self.tokenizer.core

    def quantizers(self) -> dict[str, VectorQuantizer]:
        return self.model.quantizers()

    def batches(
        self, shards: list[str], rank: int, world_size: int, state: dict | None
    ) -> tuple[Iterator[ImageBatch], StreamTracker]:
        loader, tracker = make_train_loader(
            self.cfg.data,
            shards,
            batch_size=self.cfg.train.batch_size,
            seed=self.cfg.run.seed,
            rank=rank,
            world_size=world_size,
            state=state,
        )
        # Seeding the loader's workers draws from torch's RNG: kept out of the training
        # stream, so that a resumed run makes the same draws (restarts, k-means) as an
        # uninterrupted one from the restored RNG state on.
        with torch.random.fork_rng(devices=[]):
            batches = iter(loader)
        return batches, tracker

    def train_step(self, batch: ImageBatch, step: int) -> StepOutput:
        part = self.tokenizer
        images = batch.images.to(self.accelerator.device)  # (B, 3, R, R) in [-1, 1]
        out = self.forward(images)
        terms = self.losses(images, out, step)
        skipped = self.guard.backward(terms.total, part, self.cfg.train.grad_clip)
        ema = self._weight_ema()
        if ema is not None and self.accelerator.sync_gradients and not skipped:
            ema.update(part.core)
        scalars = {"loss": terms.total, **{f"loss/{k}": v for k, v in terms.terms.items()}}
        others = self.after_tokenizer_step(images, out, step)
        with torch.no_grad():
            psnr = psnr_per_image(images, out.reconstruction.detach())  # (B,)
        return StepOutput(
            scalars={**scalars, **others.scalars},
            per_image={"psnr": psnr},
            code_counts={name: grid.counts for name, grid in out.grids.items()},
            num_samples=images.shape[0],
            skipped=skipped or others.skipped,
        )

    def forward(self, images: torch.Tensor) -> TokenizerOutput:
        """The tokenizer's training forward (a subclass may watch a layer through it)."""
        return self.tokenizer.module(images)

    def losses(self, images: torch.Tensor, out: TokenizerOutput, step: int) -> LossTerms:
        """Reconstruction + VQ terms (+ the perceptual term): what the tokenizer minimises."""
        terms = vqvae_loss(images, out, self.cfg.loss.reconstruction)
        if self.perceptual is not None:
            perceptual = self.perceptual(images, out.reconstruction).mean()
            terms.total = terms.total + self.cfg.loss.perceptual.weight * perceptual
            terms.terms["perceptual"] = perceptual  # unweighted, as the other terms
        return terms

    def after_tokenizer_step(
        self, images: torch.Tensor, out: TokenizerOutput, step: int
    ) -> OtherSteps:
        """What other parts train on this micro-step, after the tokenizer's step."""
        return OtherSteps()

    def _weight_ema(self) -> WeightEMA | None:
        """Made on first use, after prepare(): from the weights on their training device."""
        if self._ema is None and self.cfg.train.ema_decay > 0:
            self._ema = WeightEMA(self.tokenizer.core, self.cfg.train.ema_decay)
        return self._ema

    def extra_weights(self) -> dict[str, dict[str, torch.Tensor]]:
        ema = self._weight_ema()
        return {} if ema is None else {ema_name(TOKENIZER): ema.state_dict()}

    def load_extra_weights(self, weights: dict[str, dict[str, torch.Tensor]]) -> None:
        ema = self._weight_ema()
        if ema is None:
            return
        if ema_name(TOKENIZER) in weights:
            ema.load_state_dict(weights[ema_name(TOKENIZER)])
        else:
            logger.warning("the checkpoint holds no weight EMA: it starts from the resumed weights")

    def preview(self, shards: list[str]) -> Callable[[], list[torch.Tensor]] | None:
        if not shards or not self.cfg.logging.num_images:
            return None
        first = next(
            iter_eval_batches(shards, self.cfg.data.resolution, self.cfg.logging.num_images), None
        )
        if first is None:
            return None
        images = first.images  # (N, 3, R, R)

        @torch.no_grad()
        def rows() -> list[torch.Tensor]:
            model = self.tokenizer.core
            was_training = model.training
            model.eval()
            recon = model(images.to(self.accelerator.device)).reconstruction
            model.train(was_training)
            return [images, recon]

        return rows

    def evaluate(self, shards: list[str], accelerator: Accelerator) -> dict[str, float] | None:
        if not shards:
            return None
        result = evaluate_shards(
            self.model,
            shards,
            self.cfg.data.resolution,
            self.cfg.train.batch_size,
            accelerator.device,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            reduce_sum=lambda t: accelerator.reduce(t, reduction="sum"),
            max_batches=self.cfg.logging.eval_batches,
            # The loss's own LPIPS network, when the run trains with one.
            lpips=self.perceptual,
        )
        logger.info("eval: %s on %d held-out images", result.describe(), result.num_images)
        return result.metrics()
