"""A decoder-only transformer prior over a tokenizer's code grid in raster order (GPT-2
style, after nanoGPT): pre-LayerNorm blocks, learned positional embeddings, a linear head
to the K code logits.

The sequence it reads is [prefix, first, codes[0], ..., codes[T-2]] with T = h*w:
- prefix (optional): the P = h'*w' codes of a coarser grid (VQ-VAE-2's top codes for the
  bottom prior), with their own embedding table and positional embeddings;
- first: a learned start token, or the class embedding when the prior is class-conditional;
and the output at target position i (the slot holding `first` for i = 0, codes[i-1]
after) gives the logits of codes[i], so forward returns (B, K, h, w) like a PixelCNN.

Attention: targets see every prefix position and the targets up to themselves; prefix
positions see the whole prefix (it is known in full before any target is drawn, so
nothing is gained by reading it causally) and no target. Without a prefix the mask is
plain causal (SDPA's is_causal, which lets the fused kernels run).

Sampling draws one position at a time. With use_cache the prefix and the first token run
once, then each step feeds one new code and reuses every layer's keys and values; without
it each step recomputes the whole sequence. Both end in the same final LayerNorm and head
on the newest position, so they give the same logits up to rounding, and with the same
generator the same codes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenizer.priors.attention import Block, KVCache
from tokenizer.priors.inputs import check_class_labels, check_condition
from tokenizer.priors.sampling import sample_logits


class TransformerPrior(nn.Module):
    def __init__(
        self,
        codebook_size: int,
        grid_shape: tuple[int, int],
        dim: int = 512,
        layers: int = 8,
        heads: int = 8,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        num_classes: int = 0,
        condition_codebook_size: int = 0,
        condition_shape: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if (condition_codebook_size > 0) != (condition_shape is not None):
            raise ValueError(
                "condition_codebook_size > 0 and condition_shape go together, got "
                f"condition_codebook_size={condition_codebook_size}, condition_shape={condition_shape}"
            )
        self.codebook_size = codebook_size
        self.grid_shape = (int(grid_shape[0]), int(grid_shape[1]))
        self.num_classes = num_classes
        self.condition_codebook_size = condition_codebook_size
        self.condition_shape = None if condition_shape is None else tuple(condition_shape)
        self.dim, self.heads = dim, heads
        targets = self.grid_shape[0] * self.grid_shape[1]
        prefix = 0 if condition_shape is None else condition_shape[0] * condition_shape[1]
        self.prefix_len = prefix

        self.tok_emb = nn.Embedding(codebook_size, dim)
        self.pos = nn.Parameter(torch.zeros(targets, dim))
        # Only the parameters this configuration uses exist: DDP refuses parameters that
        # never get a gradient (unless told to look for them every step).
        if num_classes > 0:
            self.class_emb = nn.Embedding(num_classes, dim)
        else:
            self.start = nn.Parameter(torch.zeros(dim))
        if prefix > 0:
            self.cond_emb = nn.Embedding(condition_codebook_size, dim)
            self.cond_pos = nn.Parameter(torch.zeros(prefix, dim))
            length = prefix + targets
            causal = torch.ones(length, length, dtype=torch.bool).tril()
            mask = causal | (torch.arange(length) < prefix)  # every row sees the prefix
            self.register_buffer("mask", mask, persistent=False)  # (P+T, P+T)
        else:
            self.register_buffer("mask", None, persistent=False)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, codebook_size, bias=False)

        self.apply(_init_weights)
        for p in (self.pos, getattr(self, "start", None), getattr(self, "cond_pos", None)):
            if p is not None:
                nn.init.normal_(p, mean=0.0, std=0.02)
        # GPT-2: each residual branch's output projection scaled by 1/sqrt(2 * layers), so
        # the residual stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * layers))

    # --- inputs -----------------------------------------------------------------------

    def _check_codes(self, codes: Tensor) -> None:
        if (
            codes.dtype != torch.long
            or codes.ndim != 3
            or tuple(codes.shape[1:]) != self.grid_shape
        ):
            raise ValueError(
                f"codes must be int64 of shape (B, {self.grid_shape[0]}, {self.grid_shape[1]}), "
                f"got {codes.dtype} {tuple(codes.shape)}"
            )

    def _prefix(self, condition: Tensor | None, batch: int) -> Tensor | None:
        """(B, h', w') condition codes -> (B, P, C) prefix embeddings, or None."""
        if self.prefix_len == 0:
            return check_condition(condition, None)
        condition = check_condition(condition, (batch, *self.condition_shape))
        return self.cond_emb(condition.flatten(1)) + self.cond_pos

    def _first(self, class_labels: Tensor | None, batch: int) -> Tensor:
        """The first input token, (B, 1, C): the class embedding or the start token."""
        labels = check_class_labels(class_labels, self.num_classes, batch)
        if labels is None:
            return self.start.expand(batch, 1, -1)
        return self.class_emb(labels)[:, None]

    # --- the network ------------------------------------------------------------------

    def _trunk(
        self, x: Tensor, offset: int, prefix: Tensor | None, caches: list[KVCache] | None
    ) -> Tensor:
        """x (B, t, C): input tokens of target positions offset..offset+t-1 -> their final
        hidden states (B, t, C). The prefix comes with the sequence's start (offset 0);
        a cached step (caches already filled) feeds one position after everything cached."""
        t = x.shape[1]
        h = x + self.pos[offset : offset + t]  # (B, t, C)
        if prefix is not None:
            h = torch.cat([prefix, h], dim=1)  # (B, P+t, C)
        h = self.drop(h)
        mask, is_causal = None, False
        if caches is None or caches[0].length == 0:  # the sequence from its start
            if self.mask is None:
                is_causal = True
            else:
                mask = self.mask[: h.shape[1], : h.shape[1]]
        for i, block in enumerate(self.blocks):
            h = block(h, mask, is_causal, None if caches is None else caches[i])
        return self.ln_f(h[:, h.shape[1] - t :])

    def _logits(self, x: Tensor, prefix: Tensor | None) -> Tensor:
        b, (gh, gw) = x.shape[0], self.grid_shape
        logits = self.head(self._trunk(x, 0, prefix, None))  # (B, T, K)
        return logits.transpose(1, 2).reshape(b, self.codebook_size, gh, gw)

    # --- public face ------------------------------------------------------------------

    def forward(
        self, codes: Tensor, condition: Tensor | None = None, class_labels: Tensor | None = None
    ) -> Tensor:
        """codes (B, h, w) int64 -> logits (B, K, h, w); logits[:, :, i] (raster order)
        predict codes i from the codes before it (teacher forcing)."""
        self._check_codes(codes)
        b = codes.shape[0]
        inputs = self.tok_emb(codes.flatten(1)[:, :-1])  # (B, T-1, C)
        x = torch.cat([self._first(class_labels, b), inputs], dim=1)  # (B, T, C)
        return self._logits(x, self._prefix(condition, b))

    def forward_embedded(
        self, x: Tensor, condition: Tensor | None = None, class_labels: Tensor | None = None
    ) -> Tensor:
        """x (B, h*w, dim): the embedded input sequence (start token, then codes[:-1]),
        before positional embeddings -> logits (B, K, h, w). In a class-conditional
        prior the class embedding replaces x[:, 0], as it replaces the start token."""
        if x.ndim != 3 or tuple(x.shape[1:]) != (self.pos.shape[0], self.dim):
            raise ValueError(
                f"x must be of shape (B, {self.pos.shape[0]}, {self.dim}), got {tuple(x.shape)}"
            )
        first = self._first(class_labels, x.shape[0])
        if self.num_classes > 0:
            x = torch.cat([first, x[:, 1:]], dim=1)
        return self._logits(x, self._prefix(condition, x.shape[0]))

    def loss(
        self, codes: Tensor, condition: Tensor | None = None, class_labels: Tensor | None = None
    ) -> Tensor:
        """Mean cross-entropy in nats per code (a scalar)."""
        logits = self(codes, condition, class_labels)  # (B, K, h, w)
        # In float32: under bf16 autocast the log-softmax over K codes loses digits.
        return F.cross_entropy(logits.float(), codes)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        shape: tuple[int, int] | None = None,
        condition: Tensor | None = None,
        class_labels: Tensor | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> Tensor:
        """n grids of codes, (n, h, w) int64 in [0, K), drawn in raster order. Runs in
        eval mode (dropout off) and restores the module's mode after."""
        if shape is not None and tuple(shape) != self.grid_shape:
            raise ValueError(
                f"shape {tuple(shape)} differs from grid_shape {self.grid_shape}: the "
                "positional embeddings are learned for grid_shape only"
            )
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        was_training = self.training
        self.eval()
        try:
            return self._sample(
                n, condition, class_labels, temperature, top_k, top_p, generator, use_cache
            )
        finally:
            self.train(was_training)

    def _sample(self, n, condition, class_labels, temperature, top_k, top_p, generator, use_cache):
        prefix, first = self._prefix(condition, n), self._first(class_labels, n)
        targets = self.pos.shape[0]
        codes = torch.zeros(n, targets, dtype=torch.long, device=first.device)
        caches = None
        if use_cache:
            hs = self.dim // self.heads
            size = (n, self.heads, self.prefix_len + targets, hs, first.device, first.dtype)
            caches = [KVCache(*size) for _ in self.blocks]
        for i in range(targets):
            if not use_cache:
                x = torch.cat([first, self.tok_emb(codes[:, :i])], dim=1)  # (n, i+1, C)
                h = self._trunk(x, 0, prefix, None)
            elif i == 0:
                h = self._trunk(first, 0, prefix, caches)
            else:
                h = self._trunk(self.tok_emb(codes[:, i - 1 : i]), i, None, caches)
            logits = self.head(h[:, -1])  # (n, K)
            codes[:, i] = sample_logits(logits, temperature, top_k, top_p, generator)
        return codes.view(n, *self.grid_shape)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
