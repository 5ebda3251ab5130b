"""Config rules the architectures share, for their `check` in the registry."""

from __future__ import annotations

from tokenizer.config import Config, ConfigError


def require_divisible_resolution(cfg: Config, factor: int, rule: str) -> None:
    """ConfigError unless data.resolution is a multiple of the downsampling factor, which
    `rule` says how the architecture derives (e.g. "2**len(model.channels)")."""
    if cfg.data.resolution % factor:
        raise ConfigError(
            f"data.resolution must be divisible by the downsampling factor "
            f"{rule} = {factor}, got {cfg.data.resolution}"
        )


def refuse_grad_checkpointing(cfg: Config) -> None:
    """For architectures without it: a memory saving asked for and silently not made
    would surface as an out-of-memory error hours later."""
    if cfg.model.grad_checkpointing:
        raise ConfigError(
            f"model.grad_checkpointing is not implemented for model.arch "
            f"{cfg.model.arch!r} (it is for 'vqgan')"
        )
