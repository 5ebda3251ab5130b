"""VectorQuantizer: nearest-code lookup, straight-through gradient, VQ losses, EMA codebook."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from tokenizer.distributed import Collective, LocalCollective
from tokenizer.quantize.codebook import code_counts, code_sums, ema_update
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
            if self.ema and self.training:
                self._ema_step(flat.detach(), indices, counts)

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
    def _ema_step(self, flat: Tensor, indices: Tensor, counts: Tensor) -> None:
        # flat (N, D) fp32, indices (N,), counts (K,). Cloned because a real collective
        # reduces in place and `counts` is returned as this process's own counts.
        total_counts = self.collective.all_reduce_sum(counts.clone())  # (K,)
        total_sums = self.collective.all_reduce_sum(code_sums(flat, indices, self.codebook_size))
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

    def lookup(self, indices: Tensor) -> Tensor:
        """Codebook vectors for a grid of indices: (B, h, w) -> (B, D, h, w) fp32."""
        with torch.autocast(device_type=indices.device.type, enabled=False):
            z_q = F.embedding(indices, self.embed.float())  # (B, h, w, D)
        return rearrange(z_q, "b h w d -> b d h w")

    def extra_repr(self) -> str:
        return f"codebook_size={self.codebook_size}, code_dim={self.code_dim}, beta={self.beta}, ema={self.ema}"
