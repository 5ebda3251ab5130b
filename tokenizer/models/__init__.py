"""Tokenizer models; `build_model` builds the one `model.arch` names (see registry.py)."""

from __future__ import annotations

from tokenizer.models.base import SINGLE_GRID, TokenizerModel, TokenizerOutput
from tokenizer.models.registry import arch_names, build_model, register_arch
from tokenizer.models.vqvae import VQVAE

# One line per architecture.
register_arch("vqvae", VQVAE.from_config)

__all__ = [
    "SINGLE_GRID",
    "VQVAE",
    "TokenizerModel",
    "TokenizerOutput",
    "arch_names",
    "build_model",
    "register_arch",
]
