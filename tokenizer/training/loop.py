"""train(cfg): the one training loop (Accelerate), from one CPU to many GPUs.

The loop owns the engine, the data stream, resume and the schedule of logs, previews,
evaluations and checkpoints; what a step computes comes from the task `train.task` names
(tokenizer/training/tasks/).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import set_seed
from torch import nn

from tokenizer.atomic import write_text
from tokenizer.config import Config, ConfigError, to_yaml
from tokenizer.distributed import current_collective
from tokenizer.training.checkpoint import (
    load_extra_weights,
    load_training_state,
    resolve_resume,
    save_training_state,
)
from tokenizer.training.codebooks import (
    attach,
    broadcast_codebooks,
    check_codebooks,
    codebook_metrics,
    load_search_states,
    search_states,
)
from tokenizer.training.engine import deepspeed_requested, make_accelerator
from tokenizer.training.log import TrainLog
from tokenizer.training.task import Part
from tokenizer.training.tasks import build_task, resolve_task_data

logger = logging.getLogger("tokenizer.training.loop")


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    checkpoint: Path | None
    eval: dict[str, float] | None  # the final held-out metrics, by name
    model: nn.Module  # the release part, unwrapped (the tokenizer), for notebooks and tests


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
    train_shards, eval_shards = resolve_task_data(cfg)

    set_seed(cfg.run.seed)  # the same initial weights on every rank
    task = build_task(cfg, accelerator)
    parts = task.parts()
    _check_engine_fits(cfg, parts)
    quantizers = task.quantizers()
    collective = current_collective()
    attach(quantizers, collective, cfg.train.grad_accum_steps)
    _prepare(accelerator, parts)

    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text(run_dir / "config.yaml", to_yaml(cfg))

    step, data_state = 0, None
    resume_from = resolve_resume(cfg.resume, run_dir)
    if resume_from is not None:
        resumed = load_training_state(
            accelerator, resume_from, [p.name for p in parts], list(quantizers)
        )
        step, data_state = resumed.step, resumed.data_state
        load_search_states(quantizers, resumed.search_states)
        task.load_extra_weights(load_extra_weights(resume_from, list(task.extra_weights())))
        if data_state is None:
            logger.warning(
                "%s has no data position for this rank: the stream restarts", resume_from
            )
        logger.info("resumed from %s at step %d", resume_from, step)
    broadcast_codebooks(collective, quantizers)

    batches, stream = task.batches(
        train_shards, accelerator.process_index, accelerator.num_processes, data_state
    )
    stop_at = min(cfg.train.max_steps, stop_after) if stop_after else cfg.train.max_steps
    log = TrainLog(cfg, accelerator, start_step=step, end_step=stop_at)
    preview = task.preview(eval_shards)
    logger.info(
        "training %s (task %s): %s, %d ranks x batch %d x accum %d, steps %d -> %d",
        task.description(),
        cfg.train.task,
        ", ".join(f"{p.name} {_num_params(p.core):,} params" for p in parts),
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
            {p.name: p.module for p in parts},
            run_dir,
            step,
            stream.state_dict(),
            cfg.checkpoint.keep_last,
            search_states=search_states(quantizers),
            parent=lineage_head,
            extra_weights=task.extra_weights(),
            local={p.name for p in parts if not p.engine},
        )
        return lineage_head

    for part in parts:
        part.module.train()
    last_saved: Path | None = None
    skipped_steps = 0  # optimiser steps skipped for a non-finite loss, in this process
    while step < stop_at:
        outputs = []
        for _ in range(cfg.train.grad_accum_steps):
            batch = next(batches)
            stream.update(batch)
            log.consumed(step + 1, batch.keys)
            with accelerator.accumulate(*(p.module for p in parts if p.engine)):
                outputs.append(task.train_step(batch, step))
        if outputs[-1].skipped:  # the same on every rank (NonFiniteGuard)
            skipped_steps += 1
            _check_bad_steps(cfg, step + 1, skipped_steps, lineage_head)
        else:
            for out in outputs:
                log.window.add(out)
        for part in parts:
            part.scheduler.step()
        step += 1

        if step % cfg.logging.every == 0 or step == stop_at:
            bad = torch.tensor(float(stream.bad_samples), device=accelerator.device)
            extra = _learning_rates(parts)
            extra.update(codebook_metrics(quantizers, cfg.logging.every))
            extra["data/bad_samples"] = accelerator.reduce(bad, reduction="sum").item()
            extra["train/skipped_steps"] = float(skipped_steps)
            log.metrics(step, extra)
        if preview is not None and cfg.logging.image_every and step % cfg.logging.image_every == 0:
            log.preview(preview(), step)
        if cfg.logging.eval_every and eval_shards and step % cfg.logging.eval_every == 0:
            log.evaluation(step, task.evaluate(eval_shards, accelerator))
        if cfg.distributed.check_every and step % cfg.distributed.check_every == 0:
            check_codebooks(cfg, collective, quantizers, step)
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
            last_saved = checkpoint()

    if cfg.distributed.check_every:
        check_codebooks(cfg, collective, quantizers, step)
    if last_saved is None or not last_saved.name.endswith(f"{step:08d}"):
        last_saved = checkpoint()
    result = None
    if step >= cfg.train.max_steps:
        if eval_shards:
            result = task.evaluate(eval_shards, accelerator)
            log.evaluation(step, result)
        if preview is not None:
            log.preview(preview(), step)
    log.close()
    release = next(p.core for p in parts if p.name == task.release_part)
    return TrainResult(
        run_dir=run_dir, step=step, checkpoint=last_saved, eval=result, model=release
    )


def _check_bad_steps(cfg: Config, step: int, skipped: int, last_checkpoint: Path | None) -> None:
    logger.warning("step %d: non-finite loss on some rank; step skipped (%d so far)", step, skipped)
    if skipped > cfg.train.max_bad_steps:
        raise RuntimeError(
            f"step {step}: {skipped} optimiser steps skipped for non-finite losses, more "
            f"than train.max_bad_steps={cfg.train.max_bad_steps}; the last checkpoint, "
            f"{last_checkpoint or 'none yet'}, holds no update from a skipped step. Lower "
            "the learning rate or the adversarial weight, or train in fp32, and resume"
        )


def _check_engine_fits(cfg: Config, parts: list[Part]) -> None:
    # Accelerate drives one DeepSpeed engine per Accelerator (accelerate#2496): a task
    # with several parts needs a plan of its own under DeepSpeed, not a silent misuse.
    engine = [p.name for p in parts if p.engine]
    if deepspeed_requested() and len(engine) > 1:
        raise ConfigError(
            f"train.task={cfg.train.task!r} puts {len(engine)} parts in the engine "
            f"({', '.join(engine)}); under DeepSpeed one Accelerator drives one engine: "
            "keep the others local (Part.engine=False) or launch with DDP"
        )


def _prepare(accelerator, parts: list[Part]) -> None:
    """Prepare every engine part's module and optimiser in one call (DeepSpeed pairs
    them), move local parts to the device, and register what Accelerate's checkpoint
    must hold besides: every schedule (not passed to prepare(): Accelerate would step
    them once per process) and each local part's module and optimiser, in part order."""
    engine = [p for p in parts if p.engine]
    prepared = accelerator.prepare(*(x for p in engine for x in (p.module, p.optimizer)))
    prepared = prepared if isinstance(prepared, (list, tuple)) else [prepared]
    for i, part in enumerate(engine):
        part.module, part.optimizer = prepared[2 * i], prepared[2 * i + 1]
        part.core = accelerator.unwrap_model(part.module)
    for part in parts:
        if not part.engine:
            part.module.to(accelerator.device)
            accelerator.register_for_checkpointing(part.module, part.optimizer)
        accelerator.register_for_checkpointing(part.scheduler)


def _learning_rates(parts: list[Part]) -> dict[str, float]:
    """`lr` for a one-part task, `lr/<part>` for each part of several."""
    if len(parts) == 1:
        return {"lr": parts[0].scheduler.get_last_lr()[0]}
    return {f"lr/{p.name}": p.scheduler.get_last_lr()[0] for p in parts}


def _num_params(module: nn.Module) -> int:
    # ZeRO-3 partitions parameters; ds_numel keeps the real size.
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
