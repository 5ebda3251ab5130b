"""VQVAE: shapes, gradient flow, a short fit, bf16 autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenizer.config import Config, ConfigError, ModelConfig, QuantizerConfig
from tokenizer.models import VQVAE, TokenizerOutput, build_model
from tokenizer.nn.paper import Decoder, Encoder, ResidualBlock
from tokenizer.quantize import SearchResult, TorchSearch


def _model(channels: list[int], ema: bool = False, codebook_size: int = 32) -> VQVAE:
    return VQVAE(
        ModelConfig(channels=channels, num_res_blocks=1, res_channels=8),
        QuantizerConfig(codebook_size=codebook_size, code_dim=8, ema=ema),
    )


def _smooth_images(n: int, size: int, seed: int) -> torch.Tensor:
    """Images in [-1, 1] with structure a small autoencoder can learn quickly."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


@pytest.mark.parametrize("channels,factor", [([32, 64], 4), ([32], 2)])
def test_shapes(channels: list[int], factor: int) -> None:
    torch.manual_seed(0)
    model = _model(channels)
    assert model.downsample_factor == factor
    assert model.codebook_size == 32
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z_e = model.encode(x)
    assert z_e.shape == (2, 8, 16 // factor, 16 // factor)
    out = model(x)
    assert isinstance(out, TokenizerOutput)
    assert out.reconstruction.shape == x.shape
    assert out.grids["tokens"].indices.shape == (2, 16 // factor, 16 // factor)
    assert out.grids["tokens"].quantized.shape == z_e.shape
    assert out.grids["tokens"].counts.shape == (32,)


@pytest.mark.parametrize("channels", [[32, 64], [32]])
def test_decode_indices_round_trip(channels: list[int]) -> None:
    torch.manual_seed(0)
    model = _model(channels).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        out = model(x)
        indices = model.quantize(model.encode(x)).indices
        images = model.decode_indices(indices)
    assert indices.dtype == torch.int64
    assert images.shape == x.shape
    torch.testing.assert_close(images, out.reconstruction)


@pytest.mark.parametrize("ema", [False, True])
def test_gradients_reach_encoder_and_decoder(ema: bool) -> None:
    torch.manual_seed(0)
    model = _model([16, 32], ema=ema)
    x = _smooth_images(2, 16, seed=0)
    out = model(x)
    (F.mse_loss(out.reconstruction, x) + out.grids["tokens"].loss).backward()
    for name, module in (("encoder", model.encoder), ("decoder", model.decoder)):
        for pname, p in module.named_parameters():
            assert p.grad is not None, f"{name}.{pname} got no gradient"
            assert p.grad.abs().sum() > 0, f"{name}.{pname} got a zero gradient"
    if ema:
        assert list(model.quantizer.parameters()) == []
    else:
        assert model.quantizer.embed.grad is not None


def test_adam_steps_reduce_reconstruction_loss() -> None:
    torch.manual_seed(0)
    model = _model([16, 32], codebook_size=64)
    x = _smooth_images(4, 16, seed=1)
    optimiser = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(40):
        out = model(x)
        reconstruction = F.mse_loss(out.reconstruction, x)
        optimiser.zero_grad()
        (reconstruction + out.grids["tokens"].loss).backward()
        optimiser.step()
        losses.append(reconstruction.item())
    assert losses[-1] < 0.6 * losses[0], losses
    # Better than the best constant image (the per-pixel mean): the codes carry content.
    assert losses[-1] < 0.7 * x.var().item()


def test_bf16_autocast_forward_keeps_distances_fp32() -> None:
    torch.manual_seed(0)
    model = _model([16, 32])
    seen: list[SearchResult] = []

    class Spy(TorchSearch):
        def __call__(self, queries: torch.Tensor, codebook: torch.Tensor) -> SearchResult:
            assert queries.dtype == torch.float32 and codebook.dtype == torch.float32
            assert not torch.is_autocast_enabled("cpu")
            seen.append(super().__call__(queries, codebook))
            return seen[-1]

    model.quantizer.search = Spy()
    x = _smooth_images(2, 16, seed=2)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = F.mse_loss(out.reconstruction.float(), x) + out.grids["tokens"].loss
    loss.backward()
    assert len(seen) == 1 and seen[0].distances.dtype == torch.float32
    assert out.reconstruction.shape == x.shape
    assert out.grids["tokens"].loss.dtype == torch.float32
    assert torch.isfinite(loss)
    assert model.quantizer.embed.dtype == torch.float32


def test_build_model() -> None:
    cfg = Config()
    cfg.model.channels = [16]
    cfg.quantizer.codebook_size = 16
    model = build_model(cfg)
    assert isinstance(model, VQVAE) and model.downsample_factor == 2
    cfg.model.arch = "vqgan-9000"
    with pytest.raises(ConfigError, match="vqgan-9000"):
        build_model(cfg)


def test_building_blocks() -> None:
    block = ResidualBlock(8, 4)
    x = torch.randn(1, 8, 5, 5)
    assert block(x).shape == x.shape
    encoder = Encoder(3, [8, 16, 16], num_res_blocks=2, res_channels=4, code_dim=5)
    decoder = Decoder(3, [8, 16, 16], num_res_blocks=2, res_channels=4, code_dim=5)
    z = encoder(torch.randn(1, 3, 32, 32))
    assert z.shape == (1, 5, 4, 4)
    assert decoder(z).shape == (1, 3, 32, 32)


def test_vqvae_loss_names_its_terms_and_weights_commitment_by_beta() -> None:
    from tokenizer.losses.reconstruction import vqvae_loss

    torch.manual_seed(0)
    model = _model([16])
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    out = model(x)
    terms = vqvae_loss(x, out, "l1")
    assert sorted(terms.terms) == ["codebook", "commitment", "reconstruction"]
    by_hand = (out.reconstruction - x).abs().mean()
    torch.testing.assert_close(terms.terms["reconstruction"], by_hand)
    q = out.grids["tokens"]
    torch.testing.assert_close(terms.terms["commitment"], q.commitment_loss)
    beta = model.quantizer.beta
    expected = by_hand + q.codebook_loss + beta * q.commitment_loss
    torch.testing.assert_close(terms.total, expected)
