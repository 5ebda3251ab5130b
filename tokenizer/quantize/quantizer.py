"""VectorQuantizer: nearest-code lookup, straight-through gradient, VQ losses, EMA codebook."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from tokenizer.distributed import Collective, LocalCollective
from tokenizer.quantize.codebook import (
    code_counts,
    code_sums,
    dead_codes,
    ema_update,
    sample_rows,
)
from tokenizer.quantize.search import NearestNeighbourSearch, TorchSearch


@dataclass
class QuantizerOutput:
    quantized: Tensor  # (B, D, h, w) straight-through: z_e + (z_q - z_e).detach()
    indices: Tensor  # (B, h, w) int64
    loss: Tensor  # scalar: codebook_loss + beta * commitment_loss
    codebook_loss: Tensor  # scalar mean ||sg[z_e] - e||^2; 0 (detached) under EMA
    commitment_loss: Tensor  # scalar mean ||z_e - sg[e]||^2, unweighted
    counts: Tensor  # (K,) float32 per-code counts of this process's batch


class VectorQuantizer(nn.Module):
    """Replaces each D-vector of z_e by its nearest of K codebook vectors (van den Oord 2017).

    With `ema=True` the codebook is not trained by gradient but by exponential moving
    averages of the vectors assigned to each code (paper appendix A.1). The per-code
    counts and sums are summed across ranks through `collective` before the update, so
    every rank computes the same codebook without relying on DDP buffer broadcasts
    (which DeepSpeed never does).
    """

    embed: Tensor  # (K, D): an nn.Parameter, or an fp32 buffer under EMA

    def __init__(
        self,
        codebook_size: int,
        code_dim: int,
        beta: float = 0.25,
        ema: bool = False,
        ema_decay: float = 0.99,
        ema_epsilon: float = 1e-5,
        init: str = "random",
        restart_threshold: float = 0.0,
        search: NearestNeighbourSearch | None = None,
        collective: Collective | None = None,
    ) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.beta = beta
        self.ema = ema
        self.ema_decay = ema_decay
        self.ema_epsilon = ema_epsilon
        if init not in ("random", "data"):
            raise ValueError(f"init must be 'random' or 'data', got {init!r}")
        self.init = init
        self.restart_threshold = restart_threshold
        # Plain attributes, not submodules or buffers: the trainer swaps the collective
        # after construction, and neither belongs in a state_dict.
        self.search: NearestNeighbourSearch = search if search is not None else TorchSearch()
        self.collective: Collective = collective if collective is not None else LocalCollective()

        if ema:
            embed = torch.randn(codebook_size, code_dim)  # (K, D)
            self.register_buffer("embed", embed)
            # Start every code with a count of one and a sum equal to itself: a code no
            # vector is assigned to then decays its count and sum together and keeps its
            # value (m_i / N_i stays e_i) instead of collapsing towards zero or blowing up.
            self.register_buffer("cluster_size", torch.ones(codebook_size))  # (K,)
            self.register_buffer("embed_sum", embed.clone())  # (K, D)
        else:
            # The paper's reference code: uniform(-1/K, 1/K).
            bound = 1.0 / codebook_size
            self.embed = nn.Parameter(torch.empty(codebook_size, code_dim).uniform_(-bound, bound))
        # Set by the first training step: data init and the usage baseline happen there,
        # once, and a resumed run must not redo them.
        self.register_buffer("initialized", torch.tensor(False))
        # EMA of global per-code assignments per step: the dead-code detector.
        self.register_buffer("usage_ema", torch.zeros(codebook_size))  # (K,)

    @property
    def codebook(self) -> Tensor:
        return self.embed  # (K, D)

    def forward(self, z: Tensor) -> QuantizerOutput:
        b, _, h, w = z.shape
        # Distances, lookup and losses in fp32 even under bf16 autocast: the codebook is
        # fp32 and bf16 rounding would change which code is nearest.
        with torch.autocast(device_type=z.device.type, enabled=False):
            z32 = z.float()  # (B, D, h, w)
            flat = rearrange(z32, "b d h w -> (b h w) d")  # (N, D)
            if self.training and not self.initialized:
                self._first_step(flat.detach())
            codebook = self.embed.float()  # (K, D)
            indices = self.search(flat.detach(), codebook.detach()).indices  # (N,)
            z_q = F.embedding(indices, codebook)  # (N, D); carries grad to a trained codebook

            commitment_loss = F.mse_loss(flat, z_q.detach())
            if self.ema:
                codebook_loss = flat.new_zeros(())
            else:
                codebook_loss = F.mse_loss(z_q, flat.detach())
            loss = codebook_loss + self.beta * commitment_loss

            counts = code_counts(indices, self.codebook_size)  # (K,)
            if self.training:
                self._update_codebook(flat.detach(), indices, counts)

            z_q = rearrange(z_q, "(b h w) d -> b d h w", b=b, h=h, w=w)  # (B, D, h, w)
            # Straight-through: forward value z_q, gradient copied unchanged to z_e.
            quantized = z32 + (z_q - z32).detach()  # (B, D, h, w)

        return QuantizerOutput(
            quantized=quantized,
            indices=rearrange(indices, "(b h w) -> b h w", b=b, h=h, w=w),
            loss=loss,
            codebook_loss=codebook_loss,
            commitment_loss=commitment_loss,
            counts=counts,
        )

    @torch.no_grad()
    def _first_step(self, flat: Tensor) -> None:
        # flat (N, D) fp32 of this rank; rank 0's draw is broadcast so all ranks agree.
        if self.init == "data":
            start = self.collective.broadcast(sample_rows(flat, self.codebook_size), src=0)
            self._set_codes(torch.arange(self.codebook_size, device=flat.device), start)
        self.usage_ema.fill_(self._grace_usage())
        self.initialized.fill_(True)

    @torch.no_grad()
    def _update_codebook(self, flat: Tensor, indices: Tensor, counts: Tensor) -> None:
        # flat (N, D) fp32, indices (N,), counts (K,). Counts are cloned because a real
        # collective reduces in place and `counts` is returned as this process's own.
        total_counts = self.collective.all_reduce_sum(counts.clone())  # (K,)
        if self.ema:
            total_sums = self.collective.all_reduce_sum(
                code_sums(flat, indices, self.codebook_size)
            )
            state = ema_update(
                self.cluster_size,
                self.embed_sum,
                total_counts,
                total_sums,
                decay=self.ema_decay,
                epsilon=self.ema_epsilon,
            )
            # In place: optimisers, DDP and checkpoints hold references to these buffers.
            self.cluster_size.copy_(state.cluster_size)
            self.embed_sum.copy_(state.embed_sum)
            self.embed.copy_(state.codebook)
        self.usage_ema.mul_(self.ema_decay).add_(total_counts, alpha=1.0 - self.ema_decay)
        if self.restart_threshold > 0:
            # usage_ema is built from global counts, so every rank finds the same dead codes
            # and joins the same broadcast.
            dead = dead_codes(self.usage_ema, self.restart_threshold)
            if dead.numel():
                fresh = self.collective.broadcast(sample_rows(flat, dead.numel()), src=0)
                self._set_codes(dead, fresh)
                self.usage_ema[dead] = self._grace_usage()

    def _grace_usage(self) -> float:
        # A new or restarted code starts at twice the threshold: with decay g it has about
        # ln(2) / (1 - g) steps (69 at g = 0.99) to attract data before it is restarted.
        return 2.0 * self.restart_threshold

    def _set_codes(self, which: Tensor, vectors: Tensor) -> None:
        """Overwrite codes `which` (M,) with vectors (M, D), EMA statistics included."""
        self.embed.data[which] = vectors.to(self.embed.dtype)
        if self.ema:
            # One pseudo-observation of the new value, as at construction.
            self.cluster_size[which] = 1.0
            self.embed_sum[which] = vectors

    def lookup(self, indices: Tensor) -> Tensor:
        """Codebook vectors for a grid of indices: (B, h, w) -> (B, D, h, w) fp32."""
        with torch.autocast(device_type=indices.device.type, enabled=False):
            z_q = F.embedding(indices, self.embed.float())  # (B, h, w, D)
        return rearrange(z_q, "b h w d -> b d h w")

    def extra_repr(self) -> str:
        return f"codebook_size={self.codebook_size}, code_dim={self.code_dim}, beta={self.beta}, ema={self.ema}"
