"""Tokenizer models; `build_model` builds the one `model.arch` names (see registry.py)."""

from __future__ import annotations

from tokenizer.models.base import SINGLE_GRID, TokenizerModel, TokenizerOutput
from tokenizer.models.registry import arch_names, build_model, register_arch
from tokenizer.models.vqgan import VQGAN
from tokenizer.models.vqvae import VQVAE
from tokenizer.models.vqvae2 import VQVAE2, release_keys

# One line per architecture.
register_arch("vqvae", VQVAE.from_config, check=VQVAE.check_config, release_keys=VQVAE.RELEASE_KEYS)
register_arch("vqgan", VQGAN.from_config, check=VQGAN.check_config, release_keys=VQGAN.RELEASE_KEYS)
register_arch("vqvae2", VQVAE2.from_config, check=VQVAE2.check_config, release_keys=release_keys)

__all__ = [
    "SINGLE_GRID",
    "VQGAN",
    "VQVAE",
    "VQVAE2",
    "TokenizerModel",
    "TokenizerOutput",
    "arch_names",
    "build_model",
    "register_arch",
]
