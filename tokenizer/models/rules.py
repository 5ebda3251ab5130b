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


def require_attention_levels(cfg: Config, levels: list[int], kind: str = "level") -> None:
    """ConfigError unless every model.attn_resolutions entry is one of `levels`, the
    feature resolutions the network has at data.resolution (an attention that no `kind`
    has would silently build a network without it)."""
    attn = list(cfg.model.attn_resolutions)
    missing = [r for r in attn if r not in levels]
    if missing:
        shown = sorted(set(levels), reverse=True)
        raise ConfigError(
            f"model.attn_resolutions {attn}: {missing} is no {kind}'s feature resolution at "
            f"data.resolution={cfg.data.resolution} (the {kind}s: {shown}); name those that "
            "attend, or [] for attention in the mid block only"
        )
