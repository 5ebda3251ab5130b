"""Tokenizer models; `build_model` picks one from the config."""

from __future__ import annotations

from tokenizer.config import Config, ConfigError
from tokenizer.models.vqvae import VQVAE, VQVAEOutput

_ARCHS = ("vqvae",)


def build_model(cfg: Config) -> VQVAE:
    """The model `cfg.model.arch` names, built from the model and quantizer sections."""
    if cfg.model.arch == "vqvae":
        return VQVAE(cfg.model, cfg.quantizer)
    raise ConfigError(f"unknown model.arch {cfg.model.arch!r}; choices: {', '.join(_ARCHS)}")


__all__ = ["VQVAE", "VQVAEOutput", "build_model"]
