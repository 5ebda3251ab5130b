"""One prior per code grid of a tokenizer, trained together: a single grid's prior, or
VQ-VAE-2's hierarchy of priors (the top grid's unconditioned, each grid below conditioned
on the true codes of the grid above it in training, on its sampled codes in sampling).
Computes only."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tokenizer.config import PriorConfig
from tokenizer.outputs import NamedOutput


@dataclass(frozen=True)
class GridShape:
    """What a prior needs of a code grid: its name, K and (h, w)."""

    name: str
    codebook_size: int
    shape: tuple[int, int]


@dataclass
class PriorOutput(NamedOutput):
    loss: Tensor  # () sum over grids of each grid's mean negative log-likelihood, nats
    nats: dict[str, Tensor]  # grid name -> () mean nats per code
    codes: dict[str, int]  # grid name -> codes per sample, h * w


class GridPriors(nn.Module):
    """Grid name -> its prior (an nn.Module with forward / loss / sample over (B, h, w)
    codes, `condition` the coarser grid's codes), coarsest grid first."""

    def __init__(self, grids: list[GridShape], priors: list[nn.Module]) -> None:
        super().__init__()
        if len(grids) != len(priors) or not grids:
            raise ValueError("one prior per grid, at least one grid")
        self.grids = {g.name: g for g in grids}
        self.priors = nn.ModuleDict({g.name: p for g, p in zip(grids, priors, strict=True)})
        names = list(self.grids)
        # Each grid's condition: the grid just above it (none for the first).
        self.conditions = {n: (names[i - 1] if i else None) for i, n in enumerate(names)}

    def forward(self, codes: dict[str, Tensor], class_labels: Tensor | None = None) -> PriorOutput:
        """Grid name -> (B, h, w) int64 codes -> every grid's loss (teacher forcing).
        class_labels (B,) int64: a class-conditional prior's classes, given to every grid."""
        nats: dict[str, Tensor] = {}
        for name, prior in self.priors.items():
            above = self.conditions[name]
            condition = None if above is None else codes[above]
            nats[name] = prior.loss(codes[name], condition=condition, class_labels=class_labels)
        sizes = {n: math.prod(g.shape) for n, g in self.grids.items()}
        return PriorOutput(loss=sum(nats.values()), nats=nats, codes=sizes)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        class_labels: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """n samples of every grid, coarsest first: grid name -> (n, h, w) int64;
        class_labels (n,): each sample's class, for a class-conditional prior."""
        out: dict[str, Tensor] = {}
        for name, prior in self.priors.items():
            above = self.conditions[name]
            out[name] = prior.sample(
                n,
                self.grids[name].shape,
                condition=None if above is None else out[above],
                class_labels=class_labels,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                generator=generator,
            )
        return out


def build_grid_priors(cfg: PriorConfig, grids: list[GridShape]) -> GridPriors:
    """The priors `cfg` describes for `grids` (coarsest first, as an index manifest lists
    them)."""
    priors = []
    for i, grid in enumerate(grids):
        above = grids[i - 1] if i else None
        priors.append(_prior(cfg, grid, above, coarsest=i == 0))
    return GridPriors(grids, priors)


def _prior(cfg: PriorConfig, grid: GridShape, above: GridShape | None, coarsest: bool) -> nn.Module:
    condition_k = 0 if above is None else above.codebook_size
    if cfg.arch == "pixelcnn":
        from tokenizer.priors.pixelcnn import GatedPixelCNN

        factor = 1 if above is None else _factor(grid, above)
        return GatedPixelCNN(
            grid.codebook_size,
            dim=cfg.dim,
            layers=cfg.layers,
            kernel_size=cfg.kernel_size,
            condition_codebook_size=condition_k,
            condition_factor=factor,
            attention_every=cfg.attention_every if coarsest else 0,
            attention_heads=cfg.heads,
            dropout=cfg.dropout,
            num_classes=cfg.num_classes,
        )
    from tokenizer.priors.transformer import TransformerPrior

    return TransformerPrior(
        grid.codebook_size,
        grid.shape,
        dim=cfg.dim,
        layers=cfg.layers,
        heads=cfg.heads,
        mlp_ratio=cfg.mlp_ratio,
        dropout=cfg.dropout,
        condition_codebook_size=condition_k,
        condition_shape=None if above is None else above.shape,
        num_classes=cfg.num_classes,
    )


def _factor(grid: GridShape, above: GridShape) -> int:
    """How many times finer `grid` is than the grid above it (the same along both sides)."""
    (h, w), (ah, aw) = grid.shape, above.shape
    if h % ah or w % aw or h // ah != w // aw:
        raise ValueError(
            f"grid {grid.name!r} {list(grid.shape)} is not an integer multiple of grid "
            f"{above.name!r} {list(above.shape)} alike along both sides"
        )
    return h // ah
