"""The stages a VQ-VAE-2 hierarchy is built from, in either family of blocks
(`model.blocks`): the VQ-VAE paper's (ReLU residual stacks, strided and transposed convs;
rosinality's VQ-VAE-2) or the VQGAN's (GroupNorm + SiLU residual blocks, attention,
optional gradient checkpointing; taming / LlamaGen).

Every stage is one of four: the bottom encoder (image -> features at the bottom grid),
an upper encoder (features -> features at half the size), a condition (the codes above
-> features at twice their size) and the decoder (the joined codes -> the image).
"""

from __future__ import annotations

from typing import Protocol

from torch import nn

from tokenizer.config import Config, ConfigError, ModelConfig
from tokenizer.models.rules import require_attention_levels
from tokenizer.nn import paper, vqgan

BLOCKS = ("paper", "vqgan")


class HierarchyBlocks(Protocol):
    width: int  # channels of every encoder's output features
    bottom_factor: int  # pixels per bottom-grid code along a side

    def bottom_encoder(self) -> nn.Module:
        """(B, 3, H, W) -> (B, width, H/f, W/f), f = bottom_factor."""
        ...

    def upper_encoder(self, resolution: int) -> nn.Module:
        """(B, width, r, r) -> (B, width, r/2, r/2); r = `resolution`."""
        ...

    def condition(self, in_channels: int, out_channels: int, resolution: int) -> nn.Module:
        """(B, in_channels, r/2, r/2) -> (B, out_channels, r, r); r = `resolution`."""
        ...

    def decoder(self, in_channels: int) -> nn.Module:
        """(B, in_channels, H/f, W/f) -> (B, 3, H, W), no activation at the end."""
        ...


class PaperBlocks:
    """The widths of model.channels (the bottom encoder: one stride-2 stage per entry),
    model.res_channels and model.num_res_blocks, as the VQ-VAE's."""

    def __init__(self, model: ModelConfig) -> None:
        self.model = model
        self.width = model.channels[-1]
        self.bottom_factor = 2 ** len(model.channels)
        self._stack = dict(num_res_blocks=model.num_res_blocks, res_channels=model.res_channels)

    def bottom_encoder(self) -> nn.Module:
        channels = list(self.model.channels)
        return paper.Encoder(self.model.in_channels, channels, **self._stack, code_dim=None)

    def upper_encoder(self, resolution: int) -> nn.Module:
        return paper.Encoder(self.width, [self.width], **self._stack, code_dim=None)

    def condition(self, in_channels: int, out_channels: int, resolution: int) -> nn.Module:
        return paper.Decoder(out_channels, [self.width], **self._stack, code_dim=in_channels)

    def decoder(self, in_channels: int) -> paper.Decoder:
        channels = list(self.model.channels)
        return paper.Decoder(self.model.in_channels, channels, **self._stack, code_dim=in_channels)


class VQGANBlocks:
    """The bottom encoder and the decoder are the VQGAN's (model.ch, ch_mult,
    num_res_blocks, attn_resolutions, z_channels, dropout, grad_checkpointing); each
    upper encoder and condition is a VQGAN of two levels (one resampling) at the width
    of its coarsest level, ch * ch_mult[-1]. Attention: the mid block of every stage, and
    the levels whose feature resolution (at `resolution` pixels in) is in attn_resolutions."""

    def __init__(self, model: ModelConfig, resolution: int) -> None:
        self.model = model
        self.resolution = resolution
        self.width = model.z_channels
        self.bottom_factor = 2 ** (len(model.ch_mult) - 1)

    def _shape(self, ch: int, ch_mult: list[int], resolution: int) -> dict:
        m = self.model
        return dict(
            ch=ch,
            ch_mult=ch_mult,
            num_res_blocks=m.num_res_blocks,
            attn_resolutions=list(m.attn_resolutions),
            resolution=resolution,
            dropout=m.dropout,
            grad_checkpointing=m.grad_checkpointing,
        )

    def _coarse(self, resolution: int) -> dict:
        return self._shape(self.model.ch * self.model.ch_mult[-1], [1, 1], resolution)

    def bottom_encoder(self) -> nn.Module:
        shape = self._shape(self.model.ch, list(self.model.ch_mult), self.resolution)
        return vqgan.Encoder(self.model.in_channels, z_channels=self.width, **shape)

    def upper_encoder(self, resolution: int) -> nn.Module:
        return vqgan.Encoder(self.width, z_channels=self.width, **self._coarse(resolution))

    def condition(self, in_channels: int, out_channels: int, resolution: int) -> nn.Module:
        return vqgan.Decoder(out_channels, z_channels=in_channels, **self._coarse(resolution))

    def decoder(self, in_channels: int) -> vqgan.Decoder:
        shape = self._shape(self.model.ch, list(self.model.ch_mult), self.resolution)
        return vqgan.Decoder(self.model.in_channels, z_channels=in_channels, **shape)


def hierarchy_blocks(model: ModelConfig, resolution: int) -> HierarchyBlocks:
    if model.blocks == "vqgan":
        return VQGANBlocks(model, resolution)
    return PaperBlocks(model)


def bottom_factor(model: ModelConfig) -> int:
    """Pixels per bottom-grid code, from the keys of the chosen blocks."""
    return 2 ** (len(model.ch_mult) - 1) if model.blocks == "vqgan" else 2 ** len(model.channels)


def check_blocks(cfg: Config, grid_resolutions: list[int]) -> None:
    """ConfigError for what the chosen blocks cannot build: gradient checkpointing with
    the paper's blocks, an attention resolution no stage has with the VQGAN's."""
    m = cfg.model
    if m.blocks == "paper":
        if m.grad_checkpointing:
            raise ConfigError(
                "model.grad_checkpointing needs model.blocks: vqgan for model.arch 'vqvae2' "
                "(the paper's blocks do not implement it)"
            )
        return
    # Feature resolutions of every stage: the bottom encoder's levels, then each grid's.
    levels = vqgan.level_resolutions(cfg.data.resolution, len(m.ch_mult)) + grid_resolutions
    require_attention_levels(cfg, levels, kind="stage")
