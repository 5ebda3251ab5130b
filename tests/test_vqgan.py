"""VQGAN (model.arch: vqgan): shapes from 64 to 1024 px, gradient checkpointing, gradient
flow, bf16 autocast, LlamaGen VQ-16's size, config rules and a release round trip."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tokenizer import Tokenizer, build_model, load_config
from tokenizer.config import Config, ConfigError
from tokenizer.models import VQGAN
from tokenizer.nn.vqgan import AttnBlock, Downsample, ResnetBlock, Upsample
from tokenizer.quantize import SearchResult, TorchSearch

REPO = Path(__file__).resolve().parents[1]


def _cfg(resolution: int = 16, *overrides: str, **model: object) -> Config:
    """A narrow VQGAN: ch 8, two levels (f=2), attention in the first, K=32, d=4."""
    values = {
        "ch": 8,
        "ch_mult": "[1,2]",
        "num_res_blocks": 1,
        "attn_resolutions": f"[{resolution}]",
    }
    values.update(model)
    return load_config(
        overrides=[
            "model.arch=vqgan",
            "model.z_channels=16",
            *(f"model.{k}={v}" for k, v in values.items()),
            "quantizer.codebook_size=32",
            "quantizer.code_dim=4",
            f"data.resolution={resolution}",
            *overrides,
        ]
    )


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth images in [-1, 1]: (n, 3, size, size)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    ("resolution", "ch", "ch_mult", "attn", "factor"),
    [
        (64, 16, "[1,1,2,2,4]", "[4]", 16),
        (64, 16, "[1,2,2,4]", "[8]", 8),
        (256, 8, "[1,1,2,2,4]", "[16]", 16),
        (256, 8, "[1,2,2,4]", "[32]", 8),
        (512, 8, "[1,1,2,2,2]", "[32]", 16),
        (1024, 8, "[1,1,1,2,2]", "[]", 16),  # the mid block still attends, over 64x64
    ],
)
def test_codes_and_reconstruction_shapes(resolution, ch, ch_mult, attn, factor):
    torch.manual_seed(0)
    cfg = _cfg(resolution, ch=ch, ch_mult=ch_mult, attn_resolutions=attn)
    model = build_model(cfg)
    assert isinstance(model, VQGAN)
    assert model.downsample_factor == factor and model.downsample_factors() == {"tokens": factor}
    grid = resolution // factor
    x = torch.rand(1, 3, resolution, resolution) * 2 - 1
    with torch.no_grad():
        z_e = model.encode(x)
        out = model(x)
        codes = model.encode_codes(x)
        images = model.decode_codes(codes)
    assert z_e.shape == (1, 4, grid, grid)
    assert out.reconstruction.shape == x.shape
    assert out.grids["tokens"].indices.shape == (1, grid, grid)
    assert codes["tokens"].shape == (1, grid, grid) and codes["tokens"].dtype == torch.int64
    assert images.shape == x.shape
    assert torch.equal(codes["tokens"], out.grids["tokens"].indices)
    # (The images are not compared: a random network sends every position to one code,
    # and GroupNorm over a near-constant map magnifies the rounding of the straight-through
    # sum z + (e - z) against e itself.)


def test_attention_sits_where_attn_resolutions_say():
    model = build_model(_cfg(64, ch_mult="[1,1,2]", attn_resolutions="[32]"))
    # Encoder levels at 64, 32, 16 px: attention after each residual block of the 32 one.
    assert [len(level.attn) for level in model.encoder.conv_blocks] == [0, 1, 0]
    # The decoder runs coarsest first, with one more residual block per level.
    assert [len(level.attn) for level in model.decoder.conv_blocks] == [0, 2, 0]
    for mid in (model.encoder.mid, model.decoder.mid):
        assert isinstance(mid[1], AttnBlock)


def test_blocks():
    x = torch.randn(2, 8, 6, 6)
    assert ResnetBlock(8, 16)(x).shape == (2, 16, 6, 6)
    assert ResnetBlock(8, 8).nin_shortcut is None
    assert AttnBlock(8)(x).shape == x.shape
    assert Downsample(8)(x).shape == (2, 8, 3, 3)
    assert Upsample(8)(x).shape == (2, 8, 12, 12)


def test_attention_matches_the_explicit_softmax():
    torch.manual_seed(0)
    block = AttnBlock(8)
    x = torch.randn(2, 8, 3, 5)
    h = block.norm(x)
    q, k, v = (conv(h).flatten(2) for conv in (block.q, block.k, block.v))  # (B, C, N)
    weights = torch.softmax(q.transpose(1, 2) @ k / 8**0.5, dim=-1)  # (B, N, N)
    expected = x + block.proj_out((v @ weights.transpose(1, 2)).reshape(2, 8, 3, 5))
    torch.testing.assert_close(block(x), expected)


# ---------------------------------------------------------------------- gradients


class _Calls:
    """Counts the forwards of a module (a recomputation under checkpoint counts too)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.n = 0
        # A pre-hook: a recomputation may stop early (non-reentrant checkpoints do) and
        # never reach the forward hooks.
        module.register_forward_pre_hook(lambda *_: setattr(self, "n", self.n + 1))


def _step(model: VQGAN, x: torch.Tensor) -> None:
    out = model(x)
    (F.mse_loss(out.reconstruction, x) + out.quantizer_loss).backward()


@pytest.mark.parametrize("ema", [False, True])
def test_checkpointing_gives_the_same_gradients_and_quantizes_once(ema):
    # Dropout on: the recomputation must replay the RNG to draw the same masks.
    overrides = [f"quantizer.ema={str(ema).lower()}", "quantizer.init=data"]
    plain_cfg = _cfg(16, *overrides, dropout=0.1)
    ckpt_cfg = _cfg(16, *overrides, dropout=0.1, grad_checkpointing="true")
    torch.manual_seed(0)
    plain = build_model(plain_cfg).train()
    ckpt = build_model(ckpt_cfg).train()
    ckpt.load_state_dict(plain.state_dict())
    x = _images(2, 16)

    quantized = _Calls(ckpt.quantizer)
    level = _Calls(ckpt.decoder.conv_blocks[0])
    torch.manual_seed(1)
    _step(plain, x)
    torch.manual_seed(1)
    _step(ckpt, x)

    assert quantized.n == 1, "the quantizer ran again in the backward pass"
    assert level.n == 2, "the decoder level was not recomputed: no checkpointing happened"
    grads = {n: p.grad for n, p in ckpt.named_parameters()}
    for name, p in plain.named_parameters():
        assert p.grad is not None and grads[name] is not None, name
        torch.testing.assert_close(grads[name], p.grad, msg=name)
    # The EMA codebook and the usage statistics were updated once, alike.
    for (name, a), b in zip(plain.named_buffers(), ckpt.buffers(), strict=True):
        torch.testing.assert_close(b, a, msg=name)


def test_checkpointing_is_off_outside_training():
    model = build_model(_cfg(16, grad_checkpointing="true")).eval()
    level = _Calls(model.encoder.conv_blocks[0])
    x = _images(1, 16).requires_grad_()
    model(x).reconstruction.sum().backward()  # eval mode: plain forward, plain backward
    assert level.n == 1


def test_straight_through_gradient_reaches_the_encoder():
    torch.manual_seed(0)
    model = build_model(_cfg(16))
    x = _images(2, 16)
    # The reconstruction term alone: the encoder gets it only through the straight-through copy.
    F.mse_loss(model(x).reconstruction, x).backward()
    for name, module in (("encoder", model.encoder), ("quant_conv", model.quant_conv)):
        for pname, p in module.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}.{pname}"
    last = model.last_layer()
    assert last is model.decoder.conv_out.weight and last.shape == (3, 8, 3, 3)
    assert last.grad is not None and last.grad.abs().sum() > 0


def test_bf16_autocast_forward_keeps_distances_fp32():
    torch.manual_seed(0)
    model = build_model(_cfg(16))
    seen: list[SearchResult] = []

    class Spy(TorchSearch):
        def __call__(self, queries: torch.Tensor, codebook: torch.Tensor) -> SearchResult:
            assert queries.dtype == torch.float32 and codebook.dtype == torch.float32
            assert not torch.is_autocast_enabled("cpu")
            seen.append(super().__call__(queries, codebook))
            return seen[-1]

    model.quantizer.search = Spy()
    x = _images(2, 16, seed=2)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = F.mse_loss(out.reconstruction.float(), x) + out.quantizer_loss
    loss.backward()
    assert out.reconstruction.dtype == torch.bfloat16  # the convs did run in bf16
    assert len(seen) == 1 and seen[0].distances.dtype == torch.float32
    assert out.grids["tokens"].loss.dtype == torch.float32
    assert torch.isfinite(loss)
    assert model.quantizer.embed.dtype == torch.float32


def test_adam_steps_reduce_the_reconstruction_loss():
    torch.manual_seed(0)
    model = build_model(_cfg(16, "quantizer.codebook_size=64", "quantizer.init=data"))
    x = _images(4, 16, seed=1)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        out = model(x)
        reconstruction = F.mse_loss(out.reconstruction, x)
        optimiser.zero_grad()
        (reconstruction + out.quantizer_loss).backward()
        optimiser.step()
        losses.append(reconstruction.item())
    assert losses[-1] < 0.5 * losses[0], losses


# ---------------------------------------------------------------------- size, config


def test_llamagen_vq16_widths_have_its_parameter_count():
    # LlamaGen's VQ_16(codebook_size=16384, codebook_embed_dim=8) has 71,883,403
    # parameters (its "71.9M"); its state dict loads into this model key for key, bar the
    # codebook (theirs `quantize.embedding.weight`, here `quantizer.embed`).
    cfg = load_config(
        overrides=[
            "model.arch=vqgan",
            "data.resolution=256",
            "quantizer.codebook_size=16384",
            "quantizer.code_dim=8",
            "quantizer.l2_normalize=true",
        ]
    )
    model = build_model(cfg)
    assert model.downsample_factor == 16
    assert sum(p.numel() for p in model.parameters()) == 71_883_403
    assert sum(p.numel() for p in model.quantizer.parameters()) == 16384 * 8


def test_config_rules_are_those_of_the_arch():
    with pytest.raises(ConfigError, match=r"2\*\*\(len\(model\.ch_mult\) - 1\) = 16, got 72"):
        load_config(overrides=["model.arch=vqgan", "data.resolution=72"])
    with pytest.raises(ConfigError, match=r"model\.attn_resolutions \[16\]: \[16\] is no level"):
        load_config(overrides=["model.arch=vqgan", "data.resolution=512"])
    load_config(
        overrides=["model.arch=vqgan", "data.resolution=512", "model.attn_resolutions=[32]"]
    )
    # The VQ-VAE's rule (2 ** len(model.channels) = 32 here) is not a VQGAN's.
    cfg = _cfg(16, "model.channels=[8,8,8,8,8]")
    assert build_model(cfg).downsample_factor == 2
    with pytest.raises(ConfigError, match=r"2\*\*len\(model\.channels\) = 32, got 16"):
        load_config(overrides=["model.channels=[8,8,8,8,8]", "data.resolution=16"])
    with pytest.raises(ConfigError, match="model.grad_checkpointing is not implemented"):
        load_config(overrides=["model.grad_checkpointing=true"])
    for override, key in [
        ("model.ch_mult=[]", "model.ch_mult"),
        ("model.ch=0", "model.ch"),
        ("model.dropout=1.0", "model.dropout"),
        ("model.z_channels=0", "model.z_channels"),
    ]:
        with pytest.raises(ConfigError, match=key):
            load_config(overrides=["model.arch=vqgan", override])


# ---------------------------------------------------------------------- release

_ENCODE_IN_A_FRESH_PROCESS = """
import sys
import torch
from tokenizer import Tokenizer
tok = Tokenizer.from_pretrained(sys.argv[1])
images = torch.load(sys.argv[2])
torch.save({"codes": tok.encode(images), "fingerprint": tok.fingerprint}, sys.argv[3])
"""


def test_a_release_gives_identical_codes_in_a_fresh_process(tmp_path):
    torch.manual_seed(0)
    cfg = _cfg(32, "quantizer.init=data", ch_mult="[1,2,2]", attn_resolutions="[8]")
    model = build_model(cfg).train()
    model(_images(8, 32, seed=3))  # init=data: codes on encoder outputs, so codes differ
    tok = Tokenizer(model, cfg)
    images = torch.rand(4, 3, 32, 32)
    want = tok.encode(images)  # (4, 8, 8)
    assert len(set(want.flatten().tolist())) > 4
    release = tok.save_pretrained(tmp_path / "rel")
    written = json.loads((release / "config.json").read_text())
    assert written["model"]["arch"] == "vqgan" and written["downsample_factor"] == 4
    # Its architecture's keys alone: neither the VQ-VAE's nor the training-only one.
    assert set(written["model"]) == set(VQGAN.RELEASE_KEYS)

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
    assert torch.equal(got["codes"], want)
    assert got["fingerprint"] == tok.fingerprint
