"""VectorQuantizer: project, normalise, nearest-code lookup, straight-through, VQ losses,
and the codebook's upkeep (EMA, data or k-means initialisation, dead-code restarts)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from tokenizer.distributed import Collective, LocalCollective
from tokenizer.outputs import NamedOutput
from tokenizer.quantize.codebook import (
    code_counts,
    code_sums,
    dead_codes,
    distinct_rows,
    ema_update,
    idle_codes,
    l2_normalize_rows,
    perplexity,
    sample_rows,
    window_usage,
)
from tokenizer.quantize.kmeans import kmeans
from tokenizer.quantize.search import NearestNeighbourSearch, TorchSearch

# k-means sees at most this many candidate vectors per code (faiss's own default cap).
_KMEANS_POINTS_PER_CODE = 256
# init=data gathers twice as many candidates as codes: room to drop repeated vectors
# (flat image regions encode alike) and still start every code on a real one.
_DATA_POINTS_PER_CODE = 2


@dataclass
class QuantizerOutput(NamedOutput):
    quantized: Tensor  # (B, D, h, w) straight-through: forward value = projected code
    indices: Tensor  # (B, h, w) int64
    loss: Tensor  # scalar: codebook_loss + beta * commitment_loss
    codebook_loss: Tensor  # scalar mean ||sg[z] - e||^2 in lookup space; 0 (detached) under EMA
    commitment_loss: Tensor  # scalar mean ||z - sg[e]||^2 in lookup space, unweighted
    counts: Tensor  # (K,) float32 per-code counts of this process's batch


@dataclass
class CodebookStats:
    """Global codebook health (every rank holds the same values), for the training log."""

    usage: float  # fraction of codes chosen at least once in the last `window` steps
    perplexity: float  # exp(entropy) of the EMA code usage: K when all codes are used evenly
    restarts: int  # codes restarted since training began
    window: int  # the window `usage` was measured over, in training (optimiser) steps
    step: int  # training steps the quantizer has seen (forwards // forwards_per_step)
    forwards: int  # training forwards the quantizer has seen (micro-steps)


class VectorQuantizer(nn.Module):
    """Replaces each D-vector of z_e by its nearest of K codebook vectors (van den Oord 2017).

    The lookup runs in a "lookup space": with `lookup_dim` > 0, z_e is first projected
    to lookup_dim (ViT-VQGAN, LlamaGen: 8 or 32) and the chosen code projected back to
    D; with `l2_normalize` both sides are unit vectors, so the nearest code is the most
    cosine-similar one. The codebook holds lookup-space vectors, the VQ losses are
    measured there, and the straight-through gradient is copied there.

    With `ema=True` the codebook is not trained by gradient but by exponential moving
    averages of the vectors assigned to each code (paper appendix A.1). Everything that
    must be identical on every rank goes through `collective`: per-code counts and sums
    are summed before the update; k-means and restart candidates are gathered from all
    ranks and rank 0's choice is broadcast. No rank relies on DDP buffer broadcasts
    (which DeepSpeed never does).

    Dead codes: `restart_threshold` is a fraction of the uniform rate (a code whose EMA
    share of the vectors falls under threshold / K is restarted), so it means the same
    for any batch size and number of ranks; `restart_unused_steps` and the window of
    `codebook_stats` count training (optimiser) steps of `forwards_per_step` forwards
    each (the gradient accumulation, set by the trainer).
    """

    embed: Tensor  # (K, d): an nn.Parameter, or an fp32 buffer under EMA
    embed_offset: Tensor  # (K, d) fp32 buffer added to a gradient-trained embed (see codebook)

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
        lookup_dim: int = 0,
        l2_normalize: bool = False,
        kmeans_iters: int = 20,
        restart_unused_steps: int = 0,
        forwards_per_step: int = 1,
    ) -> None:
        super().__init__()
        if init not in ("random", "data", "kmeans"):
            raise ValueError(f"init must be 'random', 'data' or 'kmeans', got {init!r}")
        if lookup_dim < 0:
            raise ValueError(f"lookup_dim must be >= 0 (0: no projection), got {lookup_dim}")
        if not 0.0 <= restart_threshold < 1.0:
            raise ValueError(
                f"restart_threshold must be in [0, 1): a fraction of the uniform rate "
                f"(0: off; 1 would restart every code used less than average), "
                f"got {restart_threshold}"
            )
        if restart_unused_steps < 0:
            raise ValueError(
                f"restart_unused_steps must be >= 0 (0: off), got {restart_unused_steps}"
            )
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.lookup_dim = lookup_dim
        self.beta = beta
        self.ema = ema
        self.ema_decay = ema_decay
        self.ema_epsilon = ema_epsilon
        self.init = init
        self.kmeans_iters = kmeans_iters
        self.l2_normalize = l2_normalize
        self.restart_threshold = restart_threshold
        self.restart_unused_steps = restart_unused_steps
        # Plain attributes, not submodules or buffers: the trainer sets them after
        # construction, and none belongs in a state_dict (a resumed run may change the
        # accumulation: `step` counts forwards, which keep their meaning).
        self.forwards_per_step = forwards_per_step
        self.search: NearestNeighbourSearch = search if search is not None else TorchSearch()
        self.collective: Collective = collective if collective is not None else LocalCollective()

        dim = lookup_dim or code_dim  # d: the codebook's width
        if lookup_dim:
            # Linear maps on the flattened vectors = 1x1 convolutions on the grid.
            self.project_in = nn.Linear(code_dim, lookup_dim)
            self.project_out = nn.Linear(lookup_dim, code_dim)
        if ema:
            embed = torch.randn(codebook_size, dim)  # (K, d)
            if l2_normalize:
                embed = l2_normalize_rows(embed)
            self.register_buffer("embed", embed)
            # Start every code with a count of one and a sum equal to itself: a code no
            # vector is assigned to then decays its count and sum together and keeps its
            # value (m_i / N_i stays e_i) instead of collapsing towards zero or blowing up.
            self.register_buffer("cluster_size", torch.ones(codebook_size))  # (K,)
            self.register_buffer("embed_sum", embed.clone())  # (K, d)
        elif l2_normalize:
            # Random unit vectors: the forward normalises the codes, and the paper's tiny
            # init below would turn each optimiser step into a jump of direction.
            self.embed = nn.Parameter(l2_normalize_rows(torch.randn(codebook_size, dim)))
        else:
            # The paper's reference code: uniform(-1/K, 1/K).
            bound = 1.0 / codebook_size
            self.embed = nn.Parameter(torch.empty(codebook_size, dim).uniform_(-bound, bound))
        if not ema:
            # Initialisation and restarts move a trained code by changing its offset, not
            # the parameter: under DeepSpeed the optimiser's fp32 master copy (partitioned
            # under ZeRO-3) would overwrite a write into the parameter at the next step.
            self.register_buffer("embed_offset", torch.zeros(codebook_size, dim))
        # Set by the first training step: data/k-means init and the usage baseline happen
        # there, once, and a resumed run must not redo them.
        self.register_buffer("initialized", torch.tensor(False))
        # EMA over forwards of each code's share of the vectors of all ranks, times K
        # (1: the uniform rate, N_global / K hits): the dead-code detector.
        self.register_buffer("usage_ema", torch.zeros(codebook_size))  # (K,)
        # Training forwards seen (micro-steps under gradient accumulation), and per code
        # the forward it was last chosen by any rank (0: never) and last (re)started: the
        # idle-code detector and the windowed usage, which convert training steps to
        # forwards. Buffers, so a resumed run restarts the same codes.
        self.register_buffer("step", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("last_used", torch.zeros(codebook_size, dtype=torch.int64))
        self.register_buffer("last_restart", torch.zeros(codebook_size, dtype=torch.int64))
        self.register_buffer("restart_count", torch.tensor(0, dtype=torch.int64))

    def _apply(self, fn, recurse: bool = True):
        # Engines cast whole models (DeepSpeed bf16 calls module.bfloat16()); the EMA
        # statistics and usage counters must stay fp32 or small updates round away.
        super()._apply(fn, recurse)
        for name, buffer in self._buffers.items():
            if buffer is not None and buffer.is_floating_point() and buffer.dtype != torch.float32:
                self._buffers[name] = buffer.float()
        return self

    @property
    def forwards_per_step(self) -> int:
        """Training forwards per optimiser step: the gradient accumulation."""
        return self._forwards_per_step

    @forwards_per_step.setter
    def forwards_per_step(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"forwards_per_step must be an int >= 1, got {value!r}")
        self._forwards_per_step = value

    @property
    def codebook(self) -> Tensor:
        """The codes the search compares against: (K, d) lookup-space vectors."""
        if self.ema:
            return self.embed  # kept unit-norm by its update under l2_normalize
        codes = self.embed.float() + self.embed_offset  # (K, d); gradients reach embed
        # A gradient-trained codebook is free; under l2_normalize its codes are its directions.
        return l2_normalize_rows(codes) if self.l2_normalize else codes

    def forward(self, z: Tensor) -> QuantizerOutput:
        b, _, h, w = z.shape
        # Projections, distances, lookup and losses in fp32 even under bf16 autocast: the
        # codebook is fp32 and bf16 rounding would change which code is nearest.
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = rearrange(z.float(), "b c h w -> (b h w) c")  # (N, D)
            x = self._to_lookup(flat)  # (N, d)
            if self.training and not self.initialized:
                self._first_step(x.detach())
            codebook = self.codebook.float()  # (K, d)
            indices = self.search(x.detach(), codebook.detach()).indices  # (N,)
            e = F.embedding(indices, codebook)  # (N, d); carries grad to a trained codebook

            commitment_loss = F.mse_loss(x, e.detach())
            if self.ema:
                codebook_loss = x.new_zeros(())
            else:
                codebook_loss = F.mse_loss(e, x.detach())
            loss = codebook_loss + self.beta * commitment_loss

            counts = code_counts(indices, self.codebook_size)  # (K,)
            if self.training:
                self._update_codebook(x.detach(), indices, counts)

            # Straight-through in lookup space: forward value e, gradient copied unchanged
            # to x, and from there through the normalisation and projection to z_e.
            x_q = x + (e - x).detach()  # (N, d)
            z_q = self._from_lookup(x_q)  # (N, D)
            quantized = rearrange(z_q, "(b h w) c -> b c h w", b=b, h=h, w=w)  # (B, D, h, w)
        if not torch.is_autocast_enabled(z.device.type):
            # Engines that cast whole models (DeepSpeed bf16) give the decoder bf16 weights.
            quantized = quantized.to(z.dtype)

        return QuantizerOutput(
            quantized=quantized,
            indices=rearrange(indices, "(b h w) -> b h w", b=b, h=h, w=w),
            loss=loss,
            codebook_loss=codebook_loss,
            commitment_loss=commitment_loss,
            counts=counts,
        )

    def _to_lookup(self, flat: Tensor) -> Tensor:
        """(N, D) encoder vectors -> (N, d) lookup-space vectors."""
        # The projections may hold bf16 weights (DeepSpeed bf16); the lookup space is fp32.
        x = _linear_fp32(self.project_in, flat) if self.lookup_dim else flat
        return l2_normalize_rows(x) if self.l2_normalize else x

    def _from_lookup(self, x: Tensor) -> Tensor:
        """(N, d) lookup-space vectors -> (N, D) decoder inputs."""
        return _linear_fp32(self.project_out, x) if self.lookup_dim else x

    @torch.no_grad()
    def _first_step(self, x: Tensor) -> None:
        # x (N, d) fp32 lookup-space vectors of this rank.
        everything = torch.arange(self.codebook_size, device=x.device)
        if self.init == "data":
            self._set_codes(everything, self._data_codes(x))
        elif self.init == "kmeans":
            self._set_codes(everything, self._kmeans_codes(x))
        self.usage_ema.fill_(self._grace_usage())
        self.initialized.fill_(True)

    def _data_codes(self, x: Tensor) -> Tensor:
        """K distinct encoder outputs of all ranks (K, d), the same on every rank; with
        fewer distinct vectors than codes, all of them plus jittered copies."""
        pool = self._gather_sample(x, _DATA_POINTS_PER_CODE * self.codebook_size)  # (P, d)
        spherical = self.l2_normalize
        return self._on_rank0(
            pool, lambda seed: distinct_rows(pool, self.codebook_size, _generator(seed), spherical)
        )

    def _kmeans_codes(self, x: Tensor) -> Tensor:
        """K centroids (K, d) of the candidate vectors of all ranks, the same on every rank."""
        pool = self._gather_sample(x, _KMEANS_POINTS_PER_CODE * self.codebook_size)  # (P, d)
        k, iters, spherical = self.codebook_size, self.kmeans_iters, self.l2_normalize
        return self._on_rank0(pool, lambda seed: kmeans(pool, k, iters, seed, spherical=spherical))

    def _on_rank0(self, pool: Tensor, make_codes: Callable[[int], Tensor]) -> Tensor:
        """make_codes(seed) -> (K, d), computed on rank 0 and broadcast to every rank."""
        # Drawn from torch's RNG on every rank (so it follows run.seed and keeps the RNG
        # streams of all ranks in step); only rank 0's value is used.
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
        if self.collective.rank == 0:
            codes = make_codes(seed).to(pool.device, torch.float32)  # (K, d)
        else:
            codes = pool.new_empty(self.codebook_size, pool.shape[1])
        # Computed once, on rank 0, then broadcast: no reliance on every rank's faiss
        # build, thread count or GPU producing bit-identical codes.
        return self.collective.broadcast(codes.contiguous(), src=0)

    def _gather_sample(self, x: Tensor, want: int) -> Tensor:
        """Up to `want` distinct vectors (P, d) from all ranks, the same on every rank.

        all_gather needs the same row count everywhere, so each rank sends a random
        sample of the size the smallest local batch allows.
        """
        world = self.collective.world_size
        sizes = self.collective.all_gather_cat(
            torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
        )  # (world,)
        per_rank = min(math.ceil(want / world), int(sizes.min().item()))
        return self.collective.all_gather_cat(sample_rows(x, per_rank).contiguous())

    @torch.no_grad()
    def _update_codebook(self, x: Tensor, indices: Tensor, counts: Tensor) -> None:
        # x (N, d) fp32, indices (N,), counts (K,). Counts are cloned because a real
        # collective reduces in place and `counts` is returned as this process's own.
        self.step += 1
        self.search.training_step()
        total_counts = self.collective.all_reduce_sum(counts.clone())  # (K,)
        # Hits relative to the uniform rate N_global / K: the threshold then means the same
        # whatever the batch size and the number of ranks.
        share = total_counts * (self.codebook_size / total_counts.sum().clamp_min(1.0))  # (K,)
        total_sums = None
        if self.ema:
            total_sums = self.collective.all_reduce_sum(code_sums(x, indices, self.codebook_size))
        # A non-finite encoder output (bf16 overflow, a diverging step) would poison the
        # codebook for good; the reduced sums are the same on every rank, so every rank
        # leaves it untouched alike (the training step is skipped too: see training/task.py).
        if total_sums is not None and bool(torch.isfinite(total_sums).all()):
            state = ema_update(
                self.cluster_size,
                self.embed_sum,
                total_counts,
                total_sums,
                decay=self.ema_decay,
                epsilon=self.ema_epsilon,
                unit_norm=self.l2_normalize,
            )
            # In place: optimisers, DDP and checkpoints hold references to these buffers.
            self.cluster_size.copy_(state.cluster_size)
            self.embed_sum.copy_(state.embed_sum)
            self.embed.copy_(state.codebook)
        self.usage_ema.mul_(self.ema_decay).add_(share, alpha=1.0 - self.ema_decay)
        self.last_used.masked_fill_(total_counts > 0, self.step)
        # Both detectors read only state built from global counts, so every rank finds
        # the same dead codes and joins the same collectives below.
        dead = self._dead_codes()
        if dead.numel():
            self._restart(dead, x)

    def _dead_codes(self) -> Tensor:
        dead = torch.zeros(self.codebook_size, dtype=torch.bool, device=self.usage_ema.device)
        if self.restart_threshold > 0:
            dead[dead_codes(self.usage_ema, self.restart_threshold)] = True
        if self.restart_unused_steps > 0:
            forwards = self.restart_unused_steps * self.forwards_per_step
            idle = idle_codes(self.last_used, self.last_restart, self.step, forwards)
            dead[idle] = True
        return torch.nonzero(dead).flatten()  # (num_dead,) ascending

    def _restart(self, dead: Tensor, x: Tensor) -> None:
        """Move dead codes (M,) onto recent encoder outputs of all ranks."""
        # Repeated vectors (flat image regions) would restart several codes on one point.
        pool = torch.unique(self._gather_sample(x, dead.numel()), dim=0)  # (P, d), P <= M + ranks
        num = min(dead.numel(), pool.shape[0])
        # Rank 0 draws, everyone takes its draw. When candidates run short (a small
        # batch, many dead codes) the lowest-numbered dead codes go first; the others
        # stay dead and are restarted at a later step.
        fresh = self.collective.broadcast(sample_rows(pool, num).contiguous(), src=0)  # (num, d)
        self._set_codes(dead[:num], fresh)
        self.restart_count += num

    def _grace_usage(self) -> float:
        # A new or restarted code starts at twice the threshold: with decay g it has about
        # ln(2) / (1 - g) forwards (69 at g = 0.99) to attract data before it is restarted.
        return 2.0 * self.restart_threshold

    def _set_codes(self, which: Tensor, vectors: Tensor) -> None:
        """(Re)start codes `which` (M,) at vectors (M, d), with fresh statistics."""
        if self.l2_normalize:
            vectors = l2_normalize_rows(vectors)
        if self.ema:
            self.embed[which] = vectors
            # One pseudo-observation of the new value, as at construction.
            self.cluster_size[which] = 1.0
            self.embed_sum[which] = vectors
        else:
            # embed + offset = vectors; the optimiser goes on moving embed from there.
            self.embed_offset[which] = vectors - self.embed.detach()[which].float()
        self.usage_ema[which] = self._grace_usage()
        self.last_restart[which] = self.step

    @torch.no_grad()
    def codebook_stats(self, window: int) -> CodebookStats:
        """Codebook health over the last `window` training (optimiser) steps, i.e. the
        last window * forwards_per_step forwards; needs no collective (the state behind
        it is built from counts summed over all ranks)."""
        if window < 1:
            raise ValueError(f"window must be at least one step, got {window}")
        forwards = int(self.step.item())
        return CodebookStats(
            usage=window_usage(self.last_used, forwards, window * self.forwards_per_step).item(),
            perplexity=perplexity(self.usage_ema).item(),
            restarts=int(self.restart_count.item()),
            window=window,
            step=forwards // self.forwards_per_step,
            forwards=forwards,
        )

    def lookup(self, indices: Tensor) -> Tensor:
        """Decoder inputs for a grid of indices: (B, h, w) -> (B, D, h, w) fp32."""
        with torch.autocast(device_type=indices.device.type, enabled=False):
            e = F.embedding(indices, self.codebook.float())  # (B, h, w, d)
            z_q = self._from_lookup(e)  # (B, h, w, D)
        return rearrange(z_q, "b h w c -> b c h w")

    def extra_repr(self) -> str:
        return (
            f"codebook_size={self.codebook_size}, code_dim={self.code_dim}, "
            f"lookup_dim={self.lookup_dim}, l2_normalize={self.l2_normalize}, "
            f"beta={self.beta}, ema={self.ema}, init={self.init!r}"
        )


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _linear_fp32(layer: nn.Linear, x: Tensor) -> Tensor:
    """layer(x) computed in fp32 whatever dtype the layer's weights were cast to."""
    return F.linear(x.float(), layer.weight.float(), layer.bias.float())
