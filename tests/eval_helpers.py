"""Shared by the evaluation-report tests: random weights in the files users bring (FID
Inception in both formats, LPIPS' VGG16 trunk and heads) and the tool run in-process or
under accelerate launch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from test_perceptual import _random_heads, _random_trunk
from torch import Tensor, nn

from tokenizer.evaluation.inception import FIDInceptionV3

ROOT = Path(__file__).resolve().parents[1]
STAND_IN_FEATURES = 8  # fewer than the test's images: a well-conditioned covariance


class StandInInception(nn.Module):
    """The call signature of StyleGAN2-ADA's TorchScript Inception (uint8 NCHW of any
    size, resized inside; return_features=True -> (N, D)), with a tiny random network."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.proj = nn.Linear(16, STAND_IN_FEATURES)
        self.head = nn.Linear(STAND_IN_FEATURES, 10)

    def forward(self, img: Tensor, return_features: bool = False) -> Tensor:
        x = img.to(torch.float32) / 127.5 - 1.0  # (N, 3, H, W)
        x = F.interpolate(x, size=(24, 24), mode="bilinear", align_corners=False)
        features = self.proj(F.relu(self.conv(x)).mean(dim=(2, 3)))  # (N, D)
        if return_features:
            return features
        return self.head(features)


def write_torchscript_inception(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript in torch 2.13
        torch.jit.script(StandInInception().eval()).save(str(path))
    return path


def random_fid_inception(seed: int = 0) -> FIDInceptionV3:
    """The FID architecture with random weights and BatchNorm statistics."""
    torch.manual_seed(seed)
    network = FIDInceptionV3()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        _randomise(network, g)
    return network


def _randomise(network: nn.Module, g: torch.Generator) -> None:
    for module in network.modules():
        if isinstance(module, nn.Conv2d):
            # He-scaled: features that still vary with the image after 40-odd layers.
            fan_in = module.weight[0].numel()
            module.weight.copy_(torch.randn(module.weight.shape, generator=g) * (2 / fan_in) ** 0.5)
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=g) + 0.5)


def write_state_dict_inception(path: Path, seed: int = 0) -> Path:
    """As pytorch-fid's 2019 file: no BatchNorm counters, the 1008-class classifier kept."""
    state = {
        k: v for k, v in random_fid_inception(seed).state_dict().items()
        if not k.endswith("num_batches_tracked")
    }  # fmt: skip
    state["fc.weight"] = torch.zeros(1008, 2048)
    state["fc.bias"] = torch.zeros(1008)
    torch.save(state, path)
    return path


def write_lpips_files(directory: Path) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    backbone, heads = directory / "vgg16.pth", directory / "vgg_heads.pth"
    torch.save(_random_trunk(1), backbone)
    torch.save(_random_heads(2), heads)
    return backbone, heads


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def eval_tool(*args: str, processes: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    """tools/eval_tokenizer.py in a fresh process, or under accelerate launch with
    `processes` CPU ranks; fails with its output unless it exits 0."""
    launch = [sys.executable]
    if processes > 1:
        launch = [
            sys.executable, "-m", "accelerate.commands.launch",
            "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()),
        ]  # fmt: skip
    done = subprocess.run(
        [*launch, "tools/eval_tokenizer.py", *args],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert done.returncode == 0, (
        f"rc {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    )
    return done
