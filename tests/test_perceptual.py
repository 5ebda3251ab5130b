"""LPIPS (VGG16 + lpips v0.1 heads): the formula, its loading and its errors.

Real weights cannot be downloaded here: random ones are written in the users' formats
(torchvision's .pth state dict, a .safetensors, lpips' heads .pth) and the distance is
checked against a float64 reference written from the formula with functional ops.
"""

import importlib.util
import sys
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tokenizer.config import Config, ConfigError, PerceptualConfig, load_config
from tokenizer.losses import perceptual_setup
from tokenizer.losses.lpips_heads import installed_heads
from tokenizer.losses.perceptual import LPIPS
from tokenizer.losses.perceptual_setup import build_perceptual, check_perceptual

CHANNELS = (64, 128, 256, 512, 512)
# torchvision's features.N indices of VGG16's convs, one tuple per LPIPS tap.
CONV_BLOCKS = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))


def _random_trunk(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state, in_ch = {}, 3
    for block, out_ch in zip(CONV_BLOCKS, CHANNELS, strict=True):
        for index in block:
            # He-scaled so activations keep their size through 13 layers.
            std = (2.0 / (in_ch * 9)) ** 0.5
            state[f"features.{index}.weight"] = torch.randn(out_ch, in_ch, 3, 3, generator=g) * std
            state[f"features.{index}.bias"] = torch.randn(out_ch, generator=g) * 0.1
            in_ch = out_ch
    return state


def _random_heads(seed: int) -> OrderedDict:
    g = torch.Generator().manual_seed(seed)
    # Non-negative, as lpips' trained heads are (it clamps them), so distances are >= 0.
    return OrderedDict(
        (f"lin{i}.model.1.weight", torch.rand(1, c, 1, 1, generator=g))
        for i, c in enumerate(CHANNELS)
    )


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("lpips_weights")
    trunk, heads = _random_trunk(1), _random_heads(2)
    # torchvision's file also holds the classifier, which LPIPS ignores (a small stand-in).
    torch.save({**trunk, "classifier.0.weight": torch.zeros(4, 4)}, root / "vgg16.pth")
    save_file(trunk, str(root / "vgg16.safetensors"))
    torch.save(heads, root / "vgg_heads.pth")
    return {
        "trunk": trunk,
        "heads": heads,
        "pth": str(root / "vgg16.pth"),
        "safetensors": str(root / "vgg16.safetensors"),
        "heads_path": str(root / "vgg_heads.pth"),
        "root": root,
    }


@pytest.fixture(scope="module")
def lpips(weights) -> LPIPS:
    return build_perceptual(
        PerceptualConfig(weight=1.0, backbone=weights["pth"], heads=weights["heads_path"])
    )


def _images(seed: int, batch: int = 2, size: int = 16) -> torch.Tensor:
    # 16 px: the smallest VGG16 takes (relu5_3 at 1x1), to keep the CPU tests quick.
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1  # (B, 3, H, W) in [-1, 1]


def _reference(x, y, trunk, heads) -> torch.Tensor:
    """LPIPS in float64, from the formula, with no code of the package."""
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)

    def taps(img):
        h, out = (img.double() - shift) / scale, []
        for block in CONV_BLOCKS:
            if out:
                h = F.max_pool2d(h, 2)
            for i in block:
                w, b = trunk[f"features.{i}.weight"], trunk[f"features.{i}.bias"]
                h = F.relu(F.conv2d(h, w.double(), b.double(), padding=1))
            out.append(h)
        return out

    total = torch.zeros(x.shape[0], dtype=torch.float64)
    for layer, (a, b) in enumerate(zip(taps(x), taps(y), strict=True)):
        a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
        b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
        w = heads[f"lin{layer}.model.1.weight"].double().flatten()  # (C,)
        total += torch.einsum("bchw,c->bhw", (a - b) ** 2, w).mean(dim=(1, 2))
    return total


def test_zero_for_identical_images_positive_otherwise_and_symmetric(lpips):
    x, y = _images(0), _images(1)
    assert torch.equal(lpips(x, x), torch.zeros(2))
    d = lpips(x, y)
    assert d.shape == (2,) and d.dtype == torch.float32
    assert (d > 0).all()
    torch.testing.assert_close(lpips(y, x), d, rtol=0, atol=0)


def test_matches_a_float64_reference_of_the_formula(lpips, weights):
    x = _images(2, batch=3, size=32)
    y = (x + 0.2 * torch.randn_like(x)).clamp(-1, 1)
    expected = _reference(x, y, weights["trunk"], weights["heads"])
    torch.testing.assert_close(lpips(x, y).double(), expected, rtol=1e-4, atol=1e-7)


def test_gradients_reach_the_input_and_never_the_weights(lpips):
    parent = torch.nn.ModuleDict({"loss": lpips}).train()  # a task switching all to train
    assert not lpips.training and not any(m.training for m in lpips.modules())
    x = _images(3).requires_grad_(True)
    lpips(x, _images(4)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in parent.named_parameters():
        assert not p.requires_grad and p.grad is None, name


def test_pth_and_safetensors_backbones_give_equal_results(lpips, weights):
    from_safetensors = build_perceptual(
        PerceptualConfig(weight=1.0, backbone=weights["safetensors"], heads=weights["heads_path"])
    )
    x, y = _images(5), _images(6)
    assert torch.equal(from_safetensors(x, y), lpips(x, y))


def test_the_state_dict_holds_only_the_loaded_weights(lpips, weights):
    # The ScalingLayer constants are the formula's, not weights: nothing else to save.
    keys = set(lpips.state_dict())
    assert keys == {f"backbone.{k}" for k in weights["trunk"]} | {
        f"heads.{i}.weight" for i in range(5)
    }


def test_bf16_autocast_still_computes_in_fp32(lpips):
    x, y = _images(7), _images(8)
    fp32 = lpips(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = lpips(x, y)
        # A bf16 decoder output arrives as bf16: the distance is still fp32.
        from_bf16 = lpips(x.bfloat16(), y.bfloat16())
    assert under_autocast.dtype == torch.float32 and from_bf16.dtype == torch.float32
    torch.testing.assert_close(under_autocast, fp32, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(from_bf16, fp32, rtol=2e-2, atol=1e-4)


def test_heads_found_in_the_installed_torchmetrics_wheel():
    spec = importlib.util.find_spec("torchmetrics")
    if spec is None:
        pytest.skip("torchmetrics is not installed")
    path = installed_heads()
    assert path is not None and path.name == "vgg.pth"
    heads = torch.load(path, map_location="cpu", weights_only=True)
    assert [tuple(heads[f"lin{i}.model.1.weight"].shape) for i in range(5)] == [
        (1, c, 1, 1) for c in CHANNELS
    ]
    LPIPS().load_heads(heads, str(path))


def test_heads_are_located_without_importing_the_package(tmp_path, monkeypatch, weights):
    # A stand-in torchmetrics whose import fails: finding the file must not import it.
    package = tmp_path / "torchmetrics"
    (package / "functional/image/lpips_models").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('torchmetrics must not be imported')\n")
    shipped = package / "functional/image/lpips_models/vgg.pth"
    shipped.write_bytes((weights["root"] / "vgg_heads.pth").read_bytes())
    monkeypatch.delitem(sys.modules, "torchmetrics", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert installed_heads() == shipped
    assert "torchmetrics" not in sys.modules
    found = build_perceptual(PerceptualConfig(weight=1.0, backbone=weights["pth"]))
    given = build_perceptual(
        PerceptualConfig(weight=1.0, backbone=weights["pth"], heads=weights["heads_path"])
    )
    x, y = _images(9), _images(10)
    assert torch.equal(found(x, y), given(x, y))


def _config(**perceptual) -> Config:
    cfg = Config()
    cfg.loss.perceptual = PerceptualConfig(**perceptual)
    return cfg


def test_missing_files_raise_config_errors_naming_the_key(weights, tmp_path, monkeypatch):
    check_perceptual(_config(weight=0.0))  # off: nothing is needed
    with pytest.raises(ConfigError, match=r"loss\.perceptual\.backbone: not set.*vgg16-397923af"):
        check_perceptual(_config(weight=1.0, heads=weights["heads_path"]))
    absent = tmp_path / "vgg16-397923af.pth"
    with pytest.raises(ConfigError, match=r"loss\.perceptual\.backbone: .*no such file"):
        check_perceptual(_config(weight=1.0, backbone=str(absent), heads=weights["heads_path"]))
    with pytest.raises(ConfigError, match=r"loss\.perceptual\.heads: .*no such file.*vgg\.pth"):
        check_perceptual(_config(weight=1.0, backbone=weights["pth"], heads=str(absent)))
    monkeypatch.setattr(perceptual_setup, "installed_heads", lambda: None)
    with pytest.raises(ConfigError, match=r"loss\.perceptual\.heads: not set.*torchmetrics"):
        check_perceptual(_config(weight=1.0, backbone=weights["pth"]))


class _NotATensor:
    pass


def test_wrong_files_are_refused_with_their_keys(weights, tmp_path):
    heads = weights["heads_path"]

    def refused(backbone_state, match):
        path = tmp_path / "backbone.pth"
        torch.save(backbone_state, path)
        with pytest.raises(ConfigError, match=match):
            check_perceptual(_config(weight=1.0, backbone=str(path), heads=heads))

    trunk = weights["trunk"]
    refused(weights["heads"], r"backbone: .*missing keys: features\.0\.weight")
    refused(
        {**trunk, "features.0.weight": torch.zeros(64, 3, 5, 5)},
        r"mismatched shapes: features\.0\.weight \(64, 3, 5, 5\)",
    )
    # vgg16_bn's batch-norm statistics: another layout, not silently ignored.
    refused(
        {**trunk, "features.1.running_mean": torch.zeros(64)},
        r"unexpected keys: features\.1\.running_mean",
    )
    # A pickled object other than tensors: weights_only refuses to build it.
    refused({"features.0.weight": _NotATensor()}, r"not a readable state dict")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match=r"backbone: .*garbage\.safetensors: not a readable"):
        check_perceptual(_config(weight=1.0, backbone=str(garbage), heads=heads))
    with pytest.raises(ConfigError, match=r"heads: .*not the lpips v0\.1 VGG heads; missing keys"):
        check_perceptual(_config(weight=1.0, backbone=weights["pth"], heads=weights["pth"]))


def test_config_keys_and_range():
    cfg = load_config(
        overrides=[
            "loss.perceptual.weight=0.5",
            "loss.perceptual.backbone=/w/vgg16-397923af.pth",
            "loss.perceptual.heads=/w/vgg.pth",
        ]
    )
    assert cfg.loss.perceptual == PerceptualConfig(0.5, "/w/vgg16-397923af.pth", "/w/vgg.pth")
    assert load_config().loss.perceptual.weight == 0.0  # off by default
    with pytest.raises(ConfigError, match=r"loss\.perceptual\.weight must be >= 0"):
        load_config(overrides=["loss.perceptual.weight=-1"])
