"""Discrete image tokenizers (VQ-VAE and successors): train, release, load."""

from tokenizer.api import Tokenizer
from tokenizer.config import Config, ConfigError, load_config
from tokenizer.models import VQVAE, build_model

__all__ = ["Config", "ConfigError", "Tokenizer", "VQVAE", "build_model", "load_config"]
