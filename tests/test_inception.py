"""The FID Inception-v3 and its two weight files: pytorch-fid's key names and shapes,
its input handling and TensorFlow's pooling, and both formats read from the file."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from eval_helpers import (
    STAND_IN_FEATURES,
    StandInInception,
    random_fid_inception,
    write_state_dict_inception,
    write_torchscript_inception,
)
from safetensors.torch import save_file

from tokenizer.evaluation.inception import FIDInceptionE, FIDInceptionV3
from tokenizer.evaluation.networks import (
    STATE_DICT,
    TORCHSCRIPT,
    is_torchscript,
    load_inception,
)
from tokenizer.losses.weight_files import WeightsFileError

# From pytorch-fid's fid_inception_v3() (torchvision's Inception3 names): a few keys of
# each kind of block, with their shapes.
PYTORCH_FID_KEYS = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_4a_3x3.bn.running_var": (192,),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5d.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6b.branch7x7dbl_2.conv.weight": (128, 128, 7, 1),
    "Mixed_6e.branch7x7_3.conv.weight": (192, 192, 7, 1),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7b.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
}


@pytest.fixture(scope="module")
def network() -> FIDInceptionV3:
    return random_fid_inception(seed=3)


def _images(n: int = 2, size: int = 20, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def test_state_dict_has_pytorch_fid_names_and_size() -> None:
    state = FIDInceptionV3().state_dict()
    for key, shape in PYTORCH_FID_KEYS.items():
        assert tuple(state[key].shape) == shape, key
    weights = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    # torchvision's inception_v3 less its classifier and AuxLogits: 21,785,568 weights
    # in 282 tensors, and 34,432 BatchNorm running statistics in 188.
    assert len(weights) == 470
    assert sum(v.numel() for v in weights.values()) == 21_820_000


def test_input_is_resized_bilinearly_to_299_and_scaled_to_minus_one_one(network) -> None:
    seen = {}
    hook = network.Conv2d_1a_3x3.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    images = _images()
    features = network(images)
    hook.remove()
    expected = F.interpolate(images.float() / 255, size=(299, 299), mode="bilinear") * 2 - 1
    torch.testing.assert_close(seen["x"], expected)
    assert features.shape == (2, 2048) and features.dtype == torch.float32
    assert features.std(0).max() > 0  # the features depend on the image
    with pytest.raises(TypeError, match="uint8"):
        network(images.float())


def test_pool_branches_follow_tensorflow() -> None:
    torch.manual_seed(0)
    x = torch.rand(1, 4, 5, 5) + 1.0
    # The average pool leaves the zero padding out: a corner is the mean of 4 pixels.
    averaged = {}
    block = FIDInceptionE(4, max_pool=False)
    block.branch_pool.register_forward_pre_hook(lambda m, a: averaged.update(x=a[0]))
    block.eval()(x)
    assert averaged["x"][0, 0, 0, 0].item() == pytest.approx(x[0, 0, :2, :2].mean().item())
    maxed = {}
    last = FIDInceptionE(4, max_pool=True)  # Mixed_7c: the FID graph max-pools
    last.branch_pool.register_forward_pre_hook(lambda m, a: maxed.update(x=a[0]))
    last.eval()(x)
    assert maxed["x"][0, 0, 0, 0].item() == pytest.approx(x[0, 0, :2, :2].max().item())


def test_pytorch_fid_state_dict_loads_in_either_container(tmp_path, network) -> None:
    path = write_state_dict_inception(tmp_path / "pt_inception.pth", seed=3)
    assert not is_torchscript(path)
    loaded = load_inception(str(path))
    assert loaded.format == STATE_DICT and len(loaded.sha256) == 64
    images = _images(seed=1)
    torch.testing.assert_close(loaded(images), network(images))
    state = {k: v for k, v in network.state_dict().items() if "num_batches" not in k}
    save_file(state, str(tmp_path / "inception.safetensors"))
    again = load_inception(str(tmp_path / "inception.safetensors"))
    torch.testing.assert_close(again(images), network(images))


def test_torchscript_is_called_with_uint8_and_return_features(tmp_path) -> None:
    path = write_torchscript_inception(tmp_path / "inception-2015-12-05.pt", seed=4)
    assert is_torchscript(path)
    loaded = load_inception(str(path))
    assert loaded.format == TORCHSCRIPT
    torch.manual_seed(4)
    reference = StandInInception().eval()
    images = _images(n=3, size=16)
    features = loaded(images)
    assert features.shape == (3, STAND_IN_FEATURES)
    torch.testing.assert_close(features, reference(images, return_features=True))


def test_other_files_are_refused_naming_the_file(tmp_path) -> None:
    with pytest.raises(WeightsFileError, match="no such file"):
        load_inception(str(tmp_path / "missing.pt"))
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "vgg.pth")
    with pytest.raises(WeightsFileError, match=r"vgg\.pth: not the pytorch-fid Inception"):
        load_inception(str(tmp_path / "vgg.pth"))
