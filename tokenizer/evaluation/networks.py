"""The FID Inception-v3 an evaluation reads from a file the user brings (nothing is
downloaded; LPIPS' files load through tokenizer/losses/perceptual_setup.load_lpips), in
either of the two files FID implementations use:

- TorchScript, inception-2015-12-05.pt (StyleGAN2-ADA, clean-fid): called as
  `model(images_uint8, return_features=True)` -> (N, 2048); it resizes to 299 itself.
  Loading TorchScript runs the module's own TorchScript code (no Python pickle): give
  only files from a source you trust, as with any model file.
- pytorch-fid's state dict, pt_inception-2015-12-05-6726825d.pth (or a .safetensors of
  the same keys), loaded into tokenizer/evaluation/inception.py with weights_only.

The format is read from the file itself: a TorchScript archive holds a code/ folder.
"""

from __future__ import annotations

import hashlib
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tokenizer.evaluation.inception import FIDInceptionV3
from tokenizer.losses.weight_files import WeightsFileError, read_state_dict, select_weights

TORCHSCRIPT = "torchscript"
STATE_DICT = "pytorch-fid state dict"

INCEPTION_HINT = (
    "give the FID Inception-v3 weights with --inception: the TorchScript "
    "inception-2015-12-05.pt that StyleGAN2-ADA and clean-fid use (https://nvlabs-fi-cdn."
    "nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt) or "
    "pytorch-fid's state dict (https://github.com/mseitzer/pytorch-fid/releases/download/"
    "fid_weights/pt_inception-2015-12-05-6726825d.pth); nothing is downloaded here"
)
# Keys of pytorch-fid's file that the features do not use: the 1008-class classifier, and
# BatchNorm step counters (absent from the 2019 file, present in one re-saved since).
_UNUSED_SUFFIXES = ("num_batches_tracked",)
_UNUSED_PREFIXES = ("fc.", "AuxLogits.")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class InceptionFeatures:
    """uint8 images (B, 3, H, W) -> (B, D) float features, D = 2048 for the FID graph."""

    extract: Callable[[torch.Tensor], torch.Tensor]
    format: str  # TORCHSCRIPT or STATE_DICT
    path: str
    sha256: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        features = self.extract(images)
        if features.ndim != 2 or features.shape[0] != images.shape[0]:
            raise ValueError(
                f"{self.path}: the Inception returned {tuple(features.shape)} for "
                f"{images.shape[0]} images, not (N, features)"
            )
        return features


def is_torchscript(path: str | Path) -> bool:
    """torch.jit.save writes a zip with <name>/code/ and constants.pkl; torch.save's zip
    (or its legacy pickle, or a safetensors) has neither."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(
            "/code/" in name or name.endswith("constants.pkl") for name in archive.namelist()
        )


def _state_dict_inception(path: str) -> FIDInceptionV3:
    network = FIDInceptionV3()
    found = {
        k: v
        for k, v in read_state_dict(path).items()
        if not k.endswith(_UNUSED_SUFFIXES) and not k.startswith(_UNUSED_PREFIXES)
    }
    own = {k: v for k, v in network.state_dict().items() if not k.endswith(_UNUSED_SUFFIXES)}
    expected = {k: v.shape for k, v in own.items()}
    weights = select_weights(found, expected, path, "", "pytorch-fid Inception-v3 weights")
    network.load_state_dict(weights, strict=False)  # only the BatchNorm counters stay
    return network


def load_inception(path: str, device: torch.device | str = "cpu") -> InceptionFeatures:
    """The FID feature extractor in `path`, either format; WeightsFileError otherwise."""
    if not Path(path).is_file():
        raise WeightsFileError(f"{path}: no such file")
    if is_torchscript(path):
        try:
            with warnings.catch_warnings():
                # torch 2.13 deprecates TorchScript, but it is the format of the file.
                warnings.simplefilter("ignore", DeprecationWarning)
                module = torch.jit.load(path, map_location=device).eval()
        except Exception as err:  # a damaged archive fails in many ways; all mean one thing
            raise WeightsFileError(f"{path}: not a loadable TorchScript module ({err})") from None

        def extract(images: torch.Tensor) -> torch.Tensor:
            return module(images, return_features=True)

        return InceptionFeatures(extract, TORCHSCRIPT, path, file_sha256(path))
    network = _state_dict_inception(path).to(device)
    return InceptionFeatures(network, STATE_DICT, path, file_sha256(path))
