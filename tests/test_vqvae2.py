"""VQ-VAE-2: grid shapes at 64 and 256 px, the straight-through path into every encoder,
rosinality's wiring and size, three levels, per-grid K and D, config rules, and a release
that gives the same codes for every grid in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tokenizer import Tokenizer, build_model
from tokenizer.config import Config, ConfigError, load_config
from tokenizer.models import VQVAE2
from tokenizer.models.vqvae2 import level_names, release_keys

REPO = Path(__file__).resolve().parents[1]


def _cfg(resolution: int = 32, *overrides: str) -> Config:
    return load_config(
        overrides=[
            "model.arch=vqvae2",
            "model.channels=[8,16]",
            "model.res_channels=8",
            "model.num_res_blocks=1",
            "quantizer.codebook_size=32",
            "quantizer.code_dim=8",
            f"data.resolution={resolution}",
            *overrides,
        ]
    )


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


@pytest.mark.parametrize(("resolution", "top", "bottom"), [(64, 8, 16), (256, 32, 64)])
def test_both_grids_have_their_shapes(resolution, top, bottom):
    torch.manual_seed(0)
    model = build_model(_cfg(resolution))
    assert isinstance(model, VQVAE2)
    assert list(model.quantizers()) == ["top", "bottom"]  # coarsest first
    assert model.downsample_factors() == {"top": resolution // top, "bottom": resolution // bottom}
    x = _images(2, resolution)
    out = model(x)
    assert out.reconstruction.shape == x.shape
    assert out.grids["top"].indices.shape == (2, top, top)
    assert out.grids["bottom"].indices.shape == (2, bottom, bottom)
    assert out.grids["top"].quantized.shape == (2, 8, top, top)
    assert torch.isfinite(out.quantizer_loss)


def test_straight_through_gradients_reach_both_encoders():
    torch.manual_seed(0)
    # EMA codebooks and beta 0: no loss term but the reconstruction reaches an encoder,
    # so every encoder gradient came through a straight-through copy.
    model = build_model(_cfg(32, "quantizer.beta=0", "quantizer.ema=true"))
    x = _images(2, 32)
    F.mse_loss(model(x).reconstruction, x).backward()
    for name in ("top", "bottom"):
        for module in (model.encoders[name], model.pre_quant[name]):
            for pname, p in module.named_parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: {pname}"
    # The bottom grid is conditioned on the top codes: that decoder learns too.
    assert model.conditions["bottom"].net[0].weight.grad.abs().sum() > 0
    assert list(model.conditions) == ["bottom"] and list(model.upsamplers) == ["bottom"]
    assert model.last_layer() is model.decoder.net[-1].weight


def test_the_top_codes_change_the_bottom_codes_and_the_image():
    """The bottom grid reads the top one (the conditioning), and the decoder reads both."""
    torch.manual_seed(0)
    model = build_model(_cfg(32, "quantizer.init=data")).train()
    x = _images(8, 32)
    model(x)  # init=data: codebooks on encoder outputs
    model.eval()
    codes = model.encode_codes(x)
    with torch.no_grad():
        images = model.decode_codes(codes)
        # Equal up to the straight-through sum z + (q - z) the forward decodes.
        assert torch.allclose(images, model(x).reconstruction, atol=1e-6)
        other_top = {**codes, "top": (codes["top"] + 1) % 32}
        assert not torch.allclose(model.decode_codes(other_top), images)
        # Conditioning: other top codes, and the bottom grid picks other codes too.
        model.pre_quant["top"].bias.data += 10.0
        assert not torch.equal(model.encode_codes(x)["bottom"], codes["bottom"])


def test_rosinality_defaults_build_the_same_network():
    """channel 128, n_res_block 2, n_res_channel 32, embed_dim 64, n_embed 512: the same
    modules as rosinality's VQVAE but for its top encoder's two convs before the residual
    blocks, which go 128 -> 64 (4x4, stride 2) -> 128 (3x3) where ours stay at 128."""
    cfg = load_config(
        overrides=[
            "model.arch=vqvae2",
            "model.channels=[64,128]",
            "model.res_channels=32",
            "model.num_res_blocks=2",
            "quantizer.codebook_size=512",
            "quantizer.code_dim=64",
            "quantizer.ema=true",
        ]
    )
    model = build_model(cfg)
    params = sum(p.numel() for p in model.parameters())
    top_conv_extra = 16 * (128 * 128 - 128 * 64) + 64  # the 4x4 conv, weights + bias
    top_3x3_extra = 9 * (128 - 64) * 128  # the 3x3 conv's wider input
    rosinality = 1_388_867  # its VQVAE()'s parameters (codebooks are buffers in both)
    assert params == rosinality + top_conv_extra + top_3x3_extra


def test_three_levels_build_and_train_a_step_with_their_own_k_and_d():
    torch.manual_seed(0)
    cfg = _cfg(
        64,
        "model.levels=3",
        "model.channels=[8,16,16]",  # bottom f=8: 8x8, then 4x4 and 2x2 at 64 px
        "model.level_codebook_sizes=[16,32,64]",
        "model.level_code_dims=[4,6,8]",
        "quantizer.init=kmeans",
    )
    model = build_model(cfg)
    assert level_names(3) == ["top", "middle", "bottom"]
    assert {n: q.codebook_size for n, q in model.quantizers().items()} == {
        "top": 16,
        "middle": 32,
        "bottom": 64,
    }
    assert model.downsample_factors() == {"top": 32, "middle": 16, "bottom": 8}
    x = _images(4, 64)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    out = model(x)
    assert {n: q.quantized.shape[1] for n, q in out.grids.items()} == {
        "top": 4,
        "middle": 6,
        "bottom": 8,
    }
    assert {n: tuple(q.indices.shape) for n, q in out.grids.items()} == {
        "top": (4, 2, 2),
        "middle": (4, 4, 4),
        "bottom": (4, 8, 8),
    }
    loss = F.mse_loss(out.reconstruction, x) + out.quantizer_loss
    loss.backward()
    before = model.encoders["top"].net[0].weight.detach().clone()
    optimiser.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before, model.encoders["top"].net[0].weight)
    assert all(bool(q.initialized) for q in model.quantizers().values())  # k-means, per grid
    assert level_names(4) == ["top", "middle_1", "middle_2", "bottom"]


def test_config_rules():
    with pytest.raises(ConfigError, match=r"model\.levels must be >= 2 .*model\.arch: vqvae"):
        _cfg(32, "model.levels=1")
    with pytest.raises(ConfigError, match=r"model\.level_codebook_sizes needs one entry per level"):
        _cfg(32, "model.level_codebook_sizes=[16]")
    with pytest.raises(ConfigError, match=r"model\.level_code_dims needs one entry per level"):
        _cfg(32, "model.level_code_dims=[4,4,4]")
    with pytest.raises(ConfigError, match=r"model\.level_codebook_sizes must be sizes >= 1"):
        _cfg(32, "model.level_codebook_sizes=[16,0]")
    # The top grid of two levels at f=4 is at f=8: 36 px does not divide.
    with pytest.raises(ConfigError, match=r"divisible by the downsampling factor .* = 8, got 36"):
        _cfg(36)
    with pytest.raises(ConfigError, match="grad_checkpointing needs model.blocks: vqgan"):
        _cfg(32, "model.grad_checkpointing=true")


_ENCODE_IN_A_FRESH_PROCESS = """
import sys, torch
from tokenizer import Tokenizer
tok = Tokenizer.from_pretrained(sys.argv[1])
images = torch.load(sys.argv[2])
torch.save({"codes": tok.encode_grids(images), "fingerprint": tok.fingerprint}, sys.argv[3])
"""


def test_a_release_gives_identical_codes_for_both_grids_in_a_fresh_process(tmp_path):
    torch.manual_seed(0)
    cfg = _cfg(32, "quantizer.init=data", "model.level_codebook_sizes=[16,32]")
    model = build_model(cfg).train()
    model(_images(8, 32, seed=3))  # init=data: codes on encoder outputs, so codes differ
    tok = Tokenizer(model, cfg)
    assert tok.codebook_sizes == {"top": 16, "bottom": 32}
    assert tok.grid_shapes(32, 32) == {"top": (4, 4), "bottom": (8, 8)}
    with pytest.raises(ValueError, match="use encode_grids"):
        tok.encode(torch.rand(1, 3, 32, 32))
    images = torch.rand(4, 3, 32, 32)
    want = tok.encode_grids(images)
    assert len(set(want["bottom"].flatten().tolist())) > 4
    release = tok.save_pretrained(tmp_path / "rel")
    written = json.loads((release / "config.json").read_text())
    assert written["model"]["arch"] == "vqvae2"
    assert set(written["model"]) == set(release_keys(cfg.model))
    assert {"blocks", "channels", "res_channels"} <= set(written["model"])
    assert "ch_mult" not in written["model"]  # a VQGAN-blocks key this model does not read

    torch.save(images, tmp_path / "images.pt")
    subprocess.run(
        [
            sys.executable,
            "-c",
            _ENCODE_IN_A_FRESH_PROCESS,
            str(release),
            *(str(tmp_path / name) for name in ("images.pt", "out.pt")),
        ],
        check=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    got = torch.load(tmp_path / "out.pt")
    assert set(got["codes"]) == {"top", "bottom"}
    for name in ("top", "bottom"):
        assert torch.equal(got["codes"][name], want[name]), name
    assert got["fingerprint"] == tok.fingerprint
    decoded = Tokenizer.from_pretrained(release).decode_grids(want)
    assert torch.allclose(decoded, tok.decode_grids(want), atol=1e-6)


VQGAN_BLOCKS = (
    "model.blocks=vqgan",
    "model.ch=8",
    "model.ch_mult=[1,2,2]",  # bottom grid at f=4
    "model.z_channels=16",
    "model.attn_resolutions=[4]",  # the top grid's stage at 32 px
)


def test_vqgan_blocks_build_the_hierarchy_with_attention_where_asked():
    torch.manual_seed(0)
    model = build_model(_cfg(32, *VQGAN_BLOCKS))
    assert model.downsample_factors() == {"top": 8, "bottom": 4}
    x = _images(2, 32)
    out = model(x)
    assert out.reconstruction.shape == x.shape
    assert out.grids["top"].indices.shape == (2, 4, 4)
    assert out.grids["bottom"].indices.shape == (2, 8, 8)
    top = model.encoders["top"]  # VQGAN levels at 8 and 4: the 4x4 one attends
    assert [len(level.attn) for level in top.conv_blocks] == [0, 1]
    assert [len(level.attn) for level in model.encoders["bottom"].conv_blocks] == [0, 0, 0]
    last = model.last_layer()
    assert last is model.decoder.conv_out.weight and last.shape == (3, 8, 3, 3)
    F.mse_loss(out.reconstruction, x).backward()
    for name in ("top", "bottom"):
        grad = model.encoders[name].conv_in.weight.grad
        assert grad is not None and grad.abs().sum() > 0, name
    with pytest.raises(ConfigError, match=r"\[2\] is no stage's feature resolution"):
        _cfg(32, *VQGAN_BLOCKS[:-1], "model.attn_resolutions=[2]")


def test_vqgan_blocks_checkpoint_with_the_same_gradients():
    x = _images(2, 32, seed=4)
    grads = []
    for checkpointing in ("false", "true"):
        torch.manual_seed(0)
        cfg = _cfg(32, *VQGAN_BLOCKS, f"model.grad_checkpointing={checkpointing}")
        model = build_model(cfg)
        out = model(x)
        (F.mse_loss(out.reconstruction, x) + out.quantizer_loss).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_release_keys_follow_the_blocks():
    keys = set(release_keys(_cfg(32, *VQGAN_BLOCKS).model))
    assert {"blocks", "ch", "ch_mult", "attn_resolutions", "z_channels", "levels"} <= keys
    assert not keys & {"channels", "res_channels", "grad_checkpointing"}


def test_the_demo_config_looks_every_grid_up_as_unit_vectors_in_8_dimensions():
    # The demo's top grid carries its information only with this lookup (README, VQ-VAE-2).
    torch.manual_seed(0)
    model = build_model(load_config(REPO / "configs" / "demo_vqvae2.yaml")).train()
    out = model(_images(4, 64))
    for name, q in model.quantizers().items():
        assert (q.code_dim, q.lookup_dim, q.l2_normalize) == (64, 8, True), name
        norms = q.codebook.norm(dim=1)  # (K,): data-initialised, then EMA-updated
        torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)
        assert out.grids[name].quantized.shape[1] == 64  # projected back to D
