"""train(cfg): the one training loop (Accelerate), from one CPU to many GPUs."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from torch.optim.lr_scheduler import LambdaLR

from tokenizer.checkpoint import load_training_state, resolve_resume, save_training_state
from tokenizer.config import Config, to_yaml
from tokenizer.data import (
    ImageBatch,
    check_shards_exist,
    expand_shards,
    iter_eval_batches,
    make_train_loader,
)
from tokenizer.distributed import current_collective
from tokenizer.evaluate import EvalResult, evaluate
from tokenizer.imaging import save_image_grid
from tokenizer.losses import vqvae_loss
from tokenizer.metrics import psnr_per_image
from tokenizer.models import VQVAE, build_model
from tokenizer.quantize.codebook import perplexity, usage

logger = logging.getLogger("tokenizer.train")


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    checkpoint: Path | None
    eval: EvalResult | None


def warmup_cosine(warmup_steps: int, max_steps: int, min_ratio: float):
    """LR multiplier: linear warmup to 1, then cosine decay to min_ratio at max_steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class _Window:
    """Sums of per-step quantities between two log lines, reduced across ranks on read."""

    def __init__(self, codebook_size: int, device: torch.device) -> None:
        self.codebook_size, self.device = codebook_size, device
        self.reset()

    def reset(self) -> None:
        self.counts = torch.zeros(self.codebook_size, device=self.device)
        # loss, reconstruction, codebook, commitment, psnr_sum, images, micro-steps
        self.sums = torch.zeros(7, device=self.device)
        self.started = time.perf_counter()

    def add(self, terms, psnr: torch.Tensor, counts: torch.Tensor, images: int) -> None:
        values = [terms.total, terms.reconstruction, terms.codebook, terms.commitment]
        self.sums[:4] += torch.stack([v.detach().float() for v in values])
        self.sums[4] += psnr.sum()
        self.sums[5] += images
        self.sums[6] += 1
        self.counts += counts.detach().float()

    def read(self, accelerator: Accelerator) -> dict[str, float]:
        sums = accelerator.reduce(self.sums, reduction="sum")
        counts = accelerator.reduce(self.counts, reduction="sum")
        micro = sums[6].clamp_min(1)
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        return {
            "loss": (sums[0] / micro).item(),
            "loss/reconstruction": (sums[1] / micro).item(),
            "loss/codebook": (sums[2] / micro).item(),
            "loss/commitment": (sums[3] / micro).item(),
            "psnr": (sums[4] / sums[5].clamp_min(1)).item(),
            "codebook/usage": usage(counts).item(),
            "codebook/perplexity": perplexity(counts).item(),
            "images_per_s": sums[5].item() / elapsed,
        }


def make_accelerator(cfg: Config) -> Accelerator:
    project = ProjectConfiguration(
        project_dir=cfg.run.dir, logging_dir=str(Path(cfg.run.dir) / "logs")
    )
    return Accelerator(
        # Without cpu=True, CPU ranks launched with --multi_gpu each believe they are alone.
        cpu=not torch.cuda.is_available(),
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        log_with="tensorboard" if cfg.logging.tensorboard else None,
        project_config=project,
    )


def _log_line(step: int, max_steps: int, metrics: dict[str, float]) -> str:
    return (
        f"step {step}/{max_steps} loss {metrics['loss']:.4f} "
        f"recon {metrics['loss/reconstruction']:.4f} commit {metrics['loss/commitment']:.4f} "
        f"psnr {metrics['psnr']:.2f} usage {100 * metrics['codebook/usage']:.1f}% "
        f"ppl {metrics['codebook/perplexity']:.1f} img/s {metrics['images_per_s']:.1f} "
        f"lr {metrics['lr']:.2e} bad {int(metrics['data/bad_samples'])}"
    )


def train(cfg: Config, stop_after: int | None = None) -> TrainResult:
    """Train to cfg.train.max_steps (or stop, with a checkpoint, after step `stop_after`)."""
    run_dir = Path(cfg.run.dir)
    accelerator = make_accelerator(cfg)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO
    )
    if not accelerator.is_main_process:
        logger.setLevel(logging.WARNING)

    # Bad data stops the run here, before any compute is spent.
    train_shards = expand_shards(cfg.data.train_shards)
    if not train_shards:
        raise ValueError("data.train_shards is empty: give a brace pattern or a list of tar paths")
    check_shards_exist(train_shards)
    eval_shards = expand_shards(cfg.data.eval_shards)
    check_shards_exist(eval_shards)

    set_seed(cfg.run.seed)  # the same initial weights on every rank
    model = build_model(cfg)
    model.quantizer.collective = current_collective()
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.train.lr,
        betas=tuple(cfg.train.betas),
        weight_decay=cfg.train.weight_decay,
    )
    # Not passed to prepare(): Accelerate would step it once per process per step.
    scheduler = LambdaLR(
        optimizer,
        warmup_cosine(cfg.train.warmup_steps, cfg.train.max_steps, cfg.train.min_lr_ratio),
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    core: VQVAE = accelerator.unwrap_model(model)

    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))

    step, data_state = 0, None
    resume_from = resolve_resume(cfg.resume, run_dir)
    if resume_from is not None:
        resumed = load_training_state(accelerator, resume_from)
        step, data_state = resumed.step, resumed.data_state
        if data_state is None:
            logger.warning(
                "%s has no data position for this rank: the stream restarts", resume_from
            )
        logger.info("resumed from %s at step %d", resume_from, step)

    loader, stream = make_train_loader(
        cfg.data,
        train_shards,
        batch_size=cfg.train.batch_size,
        seed=cfg.run.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        state=data_state,
    )
    if cfg.logging.tensorboard:
        accelerator.init_trackers("tensorboard")
    preview = _preview_images(cfg, eval_shards)
    window = _Window(core.codebook_size, accelerator.device)
    metrics_file = run_dir / "metrics.jsonl"
    last_saved: Path | None = None
    stop_at = min(cfg.train.max_steps, stop_after) if stop_after else cfg.train.max_steps
    logger.info(
        "training %s: %d params, %d ranks x batch %d x accum %d, steps %d -> %d",
        cfg.model.arch,
        sum(p.numel() for p in core.parameters()),
        accelerator.num_processes,
        cfg.train.batch_size,
        cfg.train.grad_accum_steps,
        step,
        stop_at,
    )

    model.train()
    batches = iter(loader)
    while step < stop_at:
        for _ in range(cfg.train.grad_accum_steps):
            batch: ImageBatch = next(batches)
            stream.update(batch)
            images = batch.images.to(accelerator.device)  # (B, 3, R, R) in [-1, 1]
            with accelerator.accumulate(model):
                out = model(images)
                terms = vqvae_loss(images, out, cfg.loss.reconstruction)
                accelerator.backward(terms.total)
                if accelerator.sync_gradients and cfg.train.grad_clip > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                psnr = psnr_per_image(images, out.reconstruction.detach())
            window.add(terms, psnr, out.quantizer.counts, images.shape[0])
        scheduler.step()
        step += 1

        if step % cfg.logging.every == 0 or step == stop_at:
            metrics = window.read(accelerator)
            bad = accelerator.reduce(
                torch.tensor(float(stream.bad_samples), device=accelerator.device)
            )
            metrics.update({"lr": scheduler.get_last_lr()[0], "data/bad_samples": bad.item()})
            window.reset()
            if accelerator.is_main_process:
                logger.info(_log_line(step, cfg.train.max_steps, metrics))
                with metrics_file.open("a") as fh:
                    fh.write(json.dumps({"step": step, **metrics}) + "\n")
            accelerator.log(metrics, step=step)
        if preview is not None and cfg.logging.image_every and step % cfg.logging.image_every == 0:
            if accelerator.is_main_process:
                _save_preview(core, preview, run_dir / "images" / f"step_{step:08d}.png")
        if cfg.logging.eval_every and eval_shards and step % cfg.logging.eval_every == 0:
            result = _evaluate(core, cfg, eval_shards, accelerator)
            accelerator.log({f"eval/{k}": v for k, v in asdict(result).items()}, step=step)
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
            last_saved = save_training_state(
                accelerator, run_dir, step, stream.state_dict(), cfg.checkpoint.keep_last
            )

    if last_saved is None or not last_saved.name.endswith(f"{step:08d}"):
        last_saved = save_training_state(
            accelerator, run_dir, step, stream.state_dict(), cfg.checkpoint.keep_last
        )
    result = None
    if step >= cfg.train.max_steps:
        if eval_shards:
            result = _evaluate(core, cfg, eval_shards, accelerator)
        if preview is not None and accelerator.is_main_process:
            _save_preview(core, preview, run_dir / "images" / f"step_{step:08d}.png")
    accelerator.end_training()
    return TrainResult(run_dir=run_dir, step=step, checkpoint=last_saved, eval=result)


def _evaluate(core: VQVAE, cfg: Config, shards: list[str], accelerator: Accelerator) -> EvalResult:
    batches = iter_eval_batches(
        shards,
        cfg.data.resolution,
        cfg.train.batch_size,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
    )
    result = evaluate(
        core,
        batches,
        accelerator.device,
        reduce_sum=lambda t: accelerator.reduce(t, reduction="sum"),
        max_batches=cfg.logging.eval_batches,
    )
    logger.info(
        "eval: psnr %.2f dB, usage %.1f%%, perplexity %.1f on %d held-out images",
        result.psnr,
        100 * result.usage,
        result.perplexity,
        result.num_images,
    )
    return result


def _preview_images(cfg: Config, eval_shards: list[str]) -> torch.Tensor | None:
    """A fixed set of held-out images whose reconstructions are saved as training goes."""
    if not eval_shards or not cfg.logging.num_images:
        return None
    batch = next(iter_eval_batches(eval_shards, cfg.data.resolution, cfg.logging.num_images), None)
    return None if batch is None else batch.images


@torch.no_grad()
def _save_preview(core: VQVAE, images: torch.Tensor, path: Path) -> None:
    was_training = core.training
    core.eval()
    device = next(core.parameters()).device
    recon = core(images.to(device)).reconstruction
    core.train(was_training)
    save_image_grid([images, recon], path)
