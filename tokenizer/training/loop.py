"""train(cfg): the one training loop (Accelerate), from one CPU to many GPUs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from tokenizer.config import Config, to_yaml
from tokenizer.data.shard_specs import resolve_shards
from tokenizer.data.stream import iter_eval_batches, make_train_loader
from tokenizer.distributed import (
    Collective,
    broadcast_buffers,
    check_same_state,
    current_collective,
)
from tokenizer.evaluation.evaluate import EvalResult, evaluate_shards
from tokenizer.evaluation.metrics import psnr_per_image
from tokenizer.losses.reconstruction import vqvae_loss
from tokenizer.models import SINGLE_GRID, VQVAE, build_model
from tokenizer.training.checkpoint import load_training_state, resolve_resume, save_training_state
from tokenizer.training.engine import make_accelerator
from tokenizer.training.log import TrainLog
from tokenizer.training.optim import build_optimizer

logger = logging.getLogger("tokenizer.training.loop")


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    checkpoint: Path | None
    eval: EvalResult | None
    model: VQVAE  # the trained model (unwrapped), e.g. for notebooks and tests


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
    train_shards = resolve_shards(cfg.data.train_shards, "data.train_shards", required=True)
    eval_shards = resolve_shards(cfg.data.eval_shards, "data.eval_shards", required=False)

    set_seed(cfg.run.seed)  # the same initial weights on every rank
    model = build_model(cfg)
    collective = current_collective()
    model.quantizer.collective = collective
    # Restart windows and codebook_stats count optimiser steps; the quantizer sees forwards.
    model.quantizer.forwards_per_step = cfg.train.grad_accum_steps
    optimizer, scheduler = build_optimizer(model, cfg.train)
    # The scheduler is not passed to prepare(): Accelerate would step it once per process.
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
        core.quantizer.search.load_state_dict(resumed.search_state)
        if data_state is None:
            logger.warning(
                "%s has no data position for this rank: the stream restarts", resume_from
            )
        logger.info("resumed from %s at step %d", resume_from, step)
    # One codebook everywhere from the start: DeepSpeed never broadcasts buffers.
    broadcast_buffers(collective, core.quantizer)

    loader, stream = make_train_loader(
        cfg.data,
        train_shards,
        batch_size=cfg.train.batch_size,
        seed=cfg.run.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        state=data_state,
    )
    stop_at = min(cfg.train.max_steps, stop_after) if stop_after else cfg.train.max_steps
    log = TrainLog(cfg, accelerator, core.codebook_size, start_step=step, end_step=stop_at)
    preview = _preview_images(cfg, eval_shards)
    logger.info(
        "training %s: %d params, %d ranks x batch %d x accum %d, steps %d -> %d",
        cfg.model.arch,
        sum(getattr(p, "ds_numel", p.numel()) for p in core.parameters()),
        accelerator.num_processes,
        cfg.train.batch_size,
        cfg.train.grad_accum_steps,
        step,
        stop_at,
    )

    # The checkpoint the next one descends from: pruning deletes only this lineage's.
    lineage_head = resume_from

    def checkpoint() -> Path:
        nonlocal lineage_head
        log.flush()
        lineage_head = save_training_state(
            accelerator,
            model,
            run_dir,
            step,
            stream.state_dict(),
            cfg.checkpoint.keep_last,
            search_state=core.quantizer.search.state_dict(),
            parent=lineage_head,
        )
        return lineage_head

    model.train()
    # Seeding the loader's workers draws from torch's RNG: kept out of the training
    # stream, so that a resumed run makes the same draws (restarts, k-means) as an
    # uninterrupted one from the restored RNG state on.
    with torch.random.fork_rng(devices=[]):
        batches = iter(loader)
    last_saved: Path | None = None
    while step < stop_at:
        for _ in range(cfg.train.grad_accum_steps):
            batch = next(batches)
            stream.update(batch)
            log.consumed(step + 1, batch.keys)
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
                psnr = psnr_per_image(images, out.reconstruction.detach())  # (B,)
            log.window.add(terms, psnr, out.grids[SINGLE_GRID].counts)
        scheduler.step()
        step += 1

        if step % cfg.logging.every == 0 or step == stop_at:
            bad = torch.tensor(float(stream.bad_samples), device=accelerator.device)
            extra = {"lr": scheduler.get_last_lr()[0]}
            stats = core.quantizer.codebook_stats(cfg.logging.every)
            extra["codebook/window_usage"] = stats.usage
            extra["codebook/restarts"] = float(stats.restarts)
            # Approximate search reports its recall (rank 0's index; every rank builds one).
            extra.update(core.quantizer.search.diagnostics())
            extra["data/bad_samples"] = accelerator.reduce(bad, reduction="sum").item()
            log.metrics(step, extra)
        if preview is not None and cfg.logging.image_every and step % cfg.logging.image_every == 0:
            log.preview(core, preview, step)
        if cfg.logging.eval_every and eval_shards and step % cfg.logging.eval_every == 0:
            result = _evaluate(core, cfg, eval_shards, accelerator)
            accelerator.log({f"eval/{k}": v for k, v in result.metrics().items()}, step=step)
        if cfg.distributed.check_every and step % cfg.distributed.check_every == 0:
            _check_codebook(cfg, collective, core, step)
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
            last_saved = checkpoint()

    if cfg.distributed.check_every:
        _check_codebook(cfg, collective, core, step)
    if last_saved is None or not last_saved.name.endswith(f"{step:08d}"):
        last_saved = checkpoint()
    result = None
    if step >= cfg.train.max_steps:
        if eval_shards:
            result = _evaluate(core, cfg, eval_shards, accelerator)
        if preview is not None:
            log.preview(core, preview, step)
    log.close()
    return TrainResult(run_dir=run_dir, step=step, checkpoint=last_saved, eval=result, model=core)


def _check_codebook(cfg: Config, collective: Collective, core: VQVAE, step: int) -> None:
    repair = cfg.distributed.on_mismatch == "repair"
    differing = check_same_state(collective, core.quantizer, step, repair=repair)
    if differing:
        logger.warning("step %d: codebook of rank(s) %s differed from rank 0; re-broadcast",
                       step, differing)  # fmt: skip


def _evaluate(core: VQVAE, cfg: Config, shards: list[str], accelerator: Accelerator) -> EvalResult:
    result = evaluate_shards(
        core,
        shards,
        cfg.data.resolution,
        cfg.train.batch_size,
        accelerator.device,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        reduce_sum=lambda t: accelerator.reduce(t, reduction="sum"),
        max_batches=cfg.logging.eval_batches,
    )
    logger.info("eval: %s on %d held-out images", result.describe(), result.num_images)
    return result


def _preview_images(cfg: Config, eval_shards: list[str]) -> torch.Tensor | None:
    """A fixed set of held-out images whose reconstructions are saved as training goes."""
    if not eval_shards or not cfg.logging.num_images:
        return None
    batch = next(iter_eval_batches(eval_shards, cfg.data.resolution, cfg.logging.num_images), None)
    return None if batch is None else batch.images
