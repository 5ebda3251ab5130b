"""The gated PixelCNN prior over a code grid (van den Oord et al. 2016, "Conditional Image
Generation with PixelCNN Decoders"), as VQ-VAE and VQ-VAE-2 use it. Computes only.

Logits at raster position (r, c) depend only on the codes before it. Two stacks carry
that: the vertical stack sees the rows above (never the current one, once shifted down),
the horizontal stack the current row to the left, and the vertical feeds the horizontal,
never the reverse, so no earlier position is left out (the original PixelCNN's blind
spot). What may reach every position:
- class labels (`num_classes`): a per-layer embedding added to the gate pre-activations;
- a coarser code grid (`condition_codebook_size`, VQ-VAE-2's bottom prior, conditioned on
  the top codes): an unmasked conv stack, upsampled to the grid, then a per-layer 1x1
  projection added to the gate pre-activations.
Optional causal self-attention over raster positions (`attention_every`, the VQ-VAE-2
paper's top prior) widens the context to the whole grid above and to the left.

Sizes: the first (type A) layer uses `kernel_size`; the gated residual layers after it
use 3x3 windows, as the PixelRNN paper's PixelCNN and public code at this scale do: 7x7
throughout would take GatedPixelCNN(512, num_classes=10) from 1.9M to 4.7M parameters,
for a receptive field a 3x3 stack reaches in a few more layers. Each layer after the
first widens it by one row up and one column each side (the defaults reach 17); past
that, only attention sees.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenizer.nn.paper import ResidualBlock
from tokenizer.priors.causal_conv import check_kernel_size
from tokenizer.priors.gated_layer import GatedLayer
from tokenizer.priors.inputs import check_class_labels, check_condition
from tokenizer.priors.raster_attention import CausalSelfAttention
from tokenizer.priors.sampling import sample_logits

LAYER_KERNEL_SIZE = 3  # the gated residual layers' window (the first layer's is kernel_size)
HEAD_WIDTH_PER_DIM = 8  # output head's hidden width / dim: 512 at dim 64, as public code
CONDITION_BLOCKS = 3  # residual blocks of the conditioning stack


class ConditionStack(nn.Module):
    """Coarser grid codes (B, h/f, w/f) -> features (B, dim, h, w). Not masked: the whole
    coarse grid is known before the fine one is drawn."""

    def __init__(self, codebook_size: int, dim: int, factor: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, dim)
        blocks: list[nn.Module] = [ResidualBlock(dim, dim) for _ in range(CONDITION_BLOCKS)]
        self.blocks = nn.Sequential(*blocks, nn.ReLU())
        # Kernel = stride = f: each of the f x f fine positions under a coarse code gets
        # its own projection of it (nearest upsampling would give them all the same).
        self.upsample = nn.ConvTranspose2d(dim, dim, kernel_size=factor, stride=factor)

    def forward(self, condition: Tensor) -> Tensor:
        x = self.embedding(condition).permute(0, 3, 1, 2)  # (B, dim, h/f, w/f)
        return self.upsample(self.blocks(x))  # (B, dim, h, w)


class GatedPixelCNN(nn.Module):
    """Codes (B, h, w) in [0, codebook_size) -> logits (B, codebook_size, h, w), those at
    (r, c) a function of the codes at raster positions before (r, c) only.

    `condition_codebook_size > 0`: a bottom prior, taking the coarser grid's codes
    (B, h / condition_factor, w / condition_factor). `num_classes > 0`: class-conditional,
    taking labels (B,). `attention_every > 0`: a causal self-attention block after every
    `attention_every`-th gated layer. Every layer's skip output (and every attention
    block's update) is summed into the head: 1x1, ReLU, 1x1 to the logits.
    """

    def __init__(
        self,
        codebook_size: int,
        dim: int = 64,
        layers: int = 15,
        kernel_size: int = 7,
        num_classes: int = 0,
        condition_codebook_size: int = 0,
        condition_factor: int = 2,
        attention_every: int = 0,
        attention_heads: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value, least in [
            ("codebook_size", codebook_size, 1),
            ("dim", dim, 1),
            ("layers", layers, 1),
            ("num_classes", num_classes, 0),
            ("condition_codebook_size", condition_codebook_size, 0),
            ("condition_factor", condition_factor, 1),
            ("attention_every", attention_every, 0),
            ("attention_heads", attention_heads, 1),
        ]:
            if value < least:
                raise ValueError(f"{name} must be >= {least}, got {value}")
        check_kernel_size(kernel_size)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self._hyperparameters = dict(
            codebook_size=codebook_size,
            dim=dim,
            layers=layers,
            kernel_size=kernel_size,
            num_classes=num_classes,
            condition_codebook_size=condition_codebook_size,
            condition_factor=condition_factor,
            attention_every=attention_every,
            attention_heads=attention_heads,
            dropout=dropout,
        )
        self.codebook_size = codebook_size
        self.dim = dim
        self.num_classes = num_classes
        self.condition_factor = condition_factor

        self.embedding = nn.Embedding(codebook_size, dim)
        self.condition_stack = (
            ConditionStack(condition_codebook_size, dim, condition_factor)
            if condition_codebook_size
            else None
        )
        condition_channels = dim if self.condition_stack is not None else 0
        # Keyed by the index of the gated layer each block follows.
        self.attention = nn.ModuleDict(
            {
                str(i): CausalSelfAttention(dim, attention_heads, dropout)
                for i in range(layers)
                if attention_every and (i + 1) % attention_every == 0
            }
        )
        self.layers = nn.ModuleList(
            GatedLayer(
                dim,
                kernel_size if i == 0 else LAYER_KERNEL_SIZE,
                first=i == 0,
                num_classes=num_classes,
                condition_channels=condition_channels,
                dropout=dropout,
                # The last layer's h' is read only by an attention block after it.
                horizontal_out=i < layers - 1 or str(i) in self.attention,
            )
            for i in range(layers)
        )
        head_width = HEAD_WIDTH_PER_DIM * dim
        # No ReLU before the first 1x1: it would drop the negative half of the skip sum
        # (at 150 steps, 8 layers, dim 32: 9.58 bits per code with it, 8.67 without).
        self.head = nn.Sequential(
            nn.Conv2d(dim, head_width, 1),
            nn.ReLU(),
            nn.Conv2d(head_width, codebook_size, 1),
        )
        # Xavier weights and zero biases on the stacks' and the head's convs, as public
        # gated PixelCNNs do: PyTorch's default init starts them smaller, and at a few
        # hundred Adam steps the prior is still far from converged.
        for module in [*self.layers.modules(), *self.head.modules()]:
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def hyperparameters(self) -> dict[str, int | float]:
        """The constructor's arguments: GatedPixelCNN(**p.hyperparameters()) rebuilds it."""
        return dict(self._hyperparameters)

    # -- inputs ---------------------------------------------------------------------------

    def _condition_features(
        self, condition: Tensor | None, batch: int, grid: tuple[int, int]
    ) -> Tensor | None:
        """(B, dim, h, w) features of the coarser grid, or None for a prior without one."""
        if self.condition_stack is None:
            return check_condition(condition, None)
        f = self.condition_factor
        h, w = grid
        if h % f or w % f:
            raise ValueError(f"condition_factor {f} must divide the grid {h}x{w}")
        return self.condition_stack(check_condition(condition, (batch, h // f, w // f)))

    def _embed(self, codes: Tensor) -> Tensor:
        if codes.dim() != 3:
            raise ValueError(f"codes must be (B, h, w), got shape {tuple(codes.shape)}")
        return self.embedding(codes).permute(0, 3, 1, 2)  # (B, dim, h, w)

    # -- the network ----------------------------------------------------------------------

    def _logits(self, x: Tensor, condition: Tensor | None, class_labels: Tensor | None) -> Tensor:
        v, h = x, x  # (B, dim, h, w) each
        skips = torch.zeros_like(x)
        for i, layer in enumerate(self.layers):
            v, h, skip = layer(v, h, class_labels, condition)
            skips = skips + skip
            if str(i) in self.attention:
                h, update = self.attention[str(i)](h)
                skips = skips + update
        return self.head(skips)  # (B, K, h, w)

    def forward_embedded(
        self, x: Tensor, condition: Tensor | None = None, class_labels: Tensor | None = None
    ) -> Tensor:
        """Code embeddings (B, dim, h, w) -> logits (B, K, h, w): `forward` after its
        embedding lookup (what gradients w.r.t. the inputs are taken from)."""
        if x.dim() != 4 or x.shape[1] != self.dim:
            raise ValueError(f"x must be (B, dim={self.dim}, h, w), got {tuple(x.shape)}")
        batch, grid = x.shape[0], (x.shape[2], x.shape[3])
        features = self._condition_features(condition, batch, grid)
        return self._logits(x, features, check_class_labels(class_labels, self.num_classes, batch))

    def forward(
        self, codes: Tensor, condition: Tensor | None = None, class_labels: Tensor | None = None
    ) -> Tensor:
        """Codes (B, h, w) int64 -> logits (B, K, h, w)."""
        return self.forward_embedded(self._embed(codes), condition, class_labels)

    def loss(
        self, codes: Tensor, condition: Tensor | None = None, class_labels: Tensor | None = None
    ) -> Tensor:
        """Mean cross-entropy of the codes under the prior, in nats per code (scalar)."""
        return F.cross_entropy(self(codes, condition, class_labels), codes)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        shape: tuple[int, int],
        condition: Tensor | None = None,
        class_labels: Tensor | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """(n, h, w) int64 codes in [0, K), drawn in raster order with
        sampling.sample_logits, one forward (over rows 0..r) per code. Runs in eval mode (no dropout), then restores the
        module's mode. `generator` must live on the model's device."""
        h, w = shape
        if n < 1 or h < 1 or w < 1:
            raise ValueError(f"sample needs n >= 1 and a non-empty shape, got {n}, {shape}")
        device = self.embedding.weight.device
        was_training = self.training
        self.eval()
        try:
            features = self._condition_features(condition, n, (h, w))
            labels = check_class_labels(class_labels, self.num_classes, n)
            codes = torch.zeros(n, h, w, dtype=torch.long, device=device)
            for r in range(h):
                # Row r depends on rows <= r only (no padding below, causal attention),
                # so the rows after it need not be computed.
                rows = slice(0, r + 1)
                cropped = None if features is None else features[:, :, rows]
                for c in range(w):
                    x = self._embed(codes[:, rows])
                    logits = self._logits(x, cropped, labels)[:, :, r, c]  # (n, K)
                    codes[:, r, c] = sample_logits(logits, temperature, top_k, top_p, generator)
            return codes
        finally:
            self.train(was_training)
