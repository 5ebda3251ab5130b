"""Tokenizer models; `build_model` picks one from the config."""

from __future__ import annotations

from tokenizer.config import Config, ConfigError
from tokenizer.models.base import SINGLE_GRID, TokenizerModel, TokenizerOutput
from tokenizer.models.vqvae import VQVAE

_ARCHS = ("vqvae",)


def build_model(cfg: Config) -> VQVAE:
    """The model `cfg.model.arch` names, built from the model and quantizer sections."""
    if cfg.model.arch == "vqvae":
        return VQVAE(cfg.model, cfg.quantizer)
    raise ConfigError(f"unknown model.arch {cfg.model.arch!r}; choices: {', '.join(_ARCHS)}")


__all__ = ["SINGLE_GRID", "VQVAE", "TokenizerModel", "TokenizerOutput", "build_model"]
