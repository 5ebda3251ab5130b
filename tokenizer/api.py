"""`Tokenizer`: the inference face of a trained model, for other codebases.

tok = Tokenizer.from_pretrained("runs/demo/release")
codes = tok.encode(images)      # (B, 3, H, W) float in [0, 1] -> (B, H/f, W/f) int64
images = tok.decode(codes)      # -> (B, 3, H, W) float in [0, 1]
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from tokenizer.checkpoint import check_weights_match, read_release, write_release
from tokenizer.config import Config, ModelConfig, QuantizerConfig, from_dict
from tokenizer.models import VQVAE, build_model


class Tokenizer:
    def __init__(self, model: VQVAE, config: Config) -> None:
        self.model = model.eval()
        self.config = config

    @classmethod
    def from_config(cls, config: Config, state: dict[str, torch.Tensor], source: str) -> Tokenizer:
        model = build_model(config)
        check_weights_match(model.state_dict(), state, source)
        model.load_state_dict(state, strict=True)
        return cls(model, config)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, device: str | torch.device = "cpu"
    ) -> Tokenizer:
        """Load a release directory (config.json + model.safetensors); never unpickles."""
        raw, state = read_release(directory)
        config = from_dict({k: raw[k] for k in ("model", "quantizer", "data") if k in raw})
        return cls.from_config(config, state, str(directory)).to(device)

    def save_pretrained(self, directory: str | Path) -> Path:
        body: dict[str, Any] = {
            "model": asdict(self.config.model),
            "quantizer": asdict(self.config.quantizer),
            # Preprocessing the tokenizer was trained with, for tools that feed it images.
            "data": {"resolution": self.config.data.resolution},
            "codebook_size": self.codebook_size,
            "downsample_factor": self.downsample_factor,
        }
        return write_release(directory, body, self.model.state_dict())

    def to(self, device: str | torch.device) -> Tokenizer:
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def codebook_size(self) -> int:
        return self.model.codebook_size

    @property
    def downsample_factor(self) -> int:
        return self.model.downsample_factor

    @property
    def model_config(self) -> ModelConfig:
        return self.config.model

    @property
    def quantizer_config(self) -> QuantizerConfig:
        return self.config.quantizer

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float in [0, 1] -> codes (B, H/f, W/f) int64."""
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                f"encode expects a float tensor (B, 3, H, W) in [0, 1], got "
                f"{images.dtype} {tuple(images.shape)}"
            )
        f = self.downsample_factor
        if images.shape[2] % f or images.shape[3] % f:
            raise ValueError(
                f"image size {tuple(images.shape[2:])} is not divisible by the "
                f"downsampling factor {f}"
            )
        x = images.to(self.device, torch.float32) * 2.0 - 1.0  # (B, 3, H, W) in [-1, 1]
        return self.model.quantize(self.model.encode(x)).indices

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) integer -> images (B, 3, h*f, w*f) float in [0, 1]."""
        if codes.ndim != 3 or codes.is_floating_point():
            raise ValueError(
                f"decode expects integer codes (B, h, w), got {codes.dtype} {tuple(codes.shape)}"
            )
        codes = codes.to(self.device, torch.long)
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(
                f"codes outside [0, {self.codebook_size}): "
                f"min {codes.min().item()}, max {codes.max().item()}"
            )
        return ((self.model.decode_indices(codes) + 1.0) / 2.0).clamp(0.0, 1.0)
