"""Build the Accelerator for whatever `accelerate launch` asked for: one process, DDP,
DeepSpeed ZeRO 1/2/3, on GPUs or on CPU ranks (gloo)."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DistributedDataParallelKwargs,
    InitProcessGroupKwargs,
    ProjectConfiguration,
)

from tokenizer.config import Config


def deepspeed_requested() -> bool:
    # `accelerate launch` with a DEEPSPEED config sets this for every rank.
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def _allow_deepspeed_without_transformers() -> None:
    """Accelerate's DeepSpeed plugin registers a weak reference for transformers'
    ZeRO-3 `from_pretrained`; without transformers installed that import crashes the
    plugin. We never load transformers models, so the reference is not needed."""
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.imports import is_transformers_available

    if not is_transformers_available():
        DeepSpeedPlugin.set_deepspeed_weakref = lambda self: None


def make_accelerator(cfg: Config | None = None, timeout: timedelta | None = None) -> Accelerator:
    """The Accelerator of a training run (`cfg`: mixed precision, accumulation, logging,
    DeepSpeed), or with cfg None one for inference across ranks (tokenize: no gradients,
    so none of that). `timeout`: how long collectives wait (a barrier after ranks
    finish unequal work)."""
    if cfg is None:
        return _accelerator(use_deepspeed=False, timeout=timeout)
    use_deepspeed = deepspeed_requested()
    # The codebook synchronises its own buffers (all-reduced EMA statistics, broadcast
    # restarts) exactly as it must under DeepSpeed; DDP re-broadcasting them from rank 0
    # before every forward would only cost bandwidth and hide a sync bug.
    handlers: list = [DistributedDataParallelKwargs(broadcast_buffers=False)]
    if use_deepspeed:
        _allow_deepspeed_without_transformers()
    project = ProjectConfiguration(
        project_dir=cfg.run.dir, logging_dir=str(Path(cfg.run.dir) / "logs")
    )
    accelerator = _accelerator(
        use_deepspeed,
        timeout,
        handlers,
        mixed_precision=None if cfg.train.mixed_precision == "auto" else cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        log_with="tensorboard" if cfg.logging.tensorboard else None,
        project_config=project,
    )
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        # Our loader is not passed to prepare() (it would drop or duplicate samples), so
        # DeepSpeed cannot read the batch size from it; clipping is DeepSpeed's job too.
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
        plugin.deepspeed_config["gradient_clipping"] = cfg.train.grad_clip
    return accelerator


def _accelerator(
    use_deepspeed: bool,
    timeout: timedelta | None,
    handlers: list | None = None,
    **options: Any,
) -> Accelerator:
    """The CPU and process-group rules every Accelerator here needs."""
    on_cpu = not torch.cuda.is_available()
    group: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    if use_deepspeed and on_cpu:
        # DeepSpeed on CPU ranks needs gloo named explicitly, and cpu=True must NOT be
        # passed (Accelerate would then drop the DeepSpeed engine).
        group["backend"] = "gloo"
    extra = [InitProcessGroupKwargs(**group)] if group else []
    return Accelerator(
        # Without cpu=True, CPU ranks launched with --multi_gpu each believe they are alone.
        cpu=on_cpu and not use_deepspeed,
        kwargs_handlers=[*(handlers or []), *extra],
        **options,
    )


def deepspeed_fp32_weights(accelerator: Accelerator, engine) -> dict[str, torch.Tensor] | None:
    """Every tensor of a DeepSpeed engine's model, whole: parameters from DeepSpeed's fp32
    master weights, buffers as the module holds them (the codebook keeps its fp32).

    Under bf16/fp16 the module's own parameters are 16-bit copies (and only a shard of
    each under ZeRO-3); the fp32 masters live in the optimizer, partitioned across ranks
    under ZeRO-1/2/3. Collective: every rank calls this at the same point; the main
    process gets the weights on the CPU, the other ranks None.
    """
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    keep = accelerator.is_main_process
    saved = set(module.state_dict().keys())  # persistent tensors only, as a state_dict has
    weights: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        full = safe_get_full_fp32_param(param)  # (shape of param) fp32; gathers across ranks
        if full is None:
            # No master copy (a parameter the optimizer does not hold): its own value.
            with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):
                full = param.detach().clone()
        if keep:
            weights[name] = full.detach().to("cpu", copy=True).contiguous()
    for name, buffer in module.named_buffers(remove_duplicate=False):
        if keep and name in saved:
            weights[name] = buffer.detach().to("cpu", copy=True).contiguous()
    return weights if keep else None
