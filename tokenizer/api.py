"""`Tokenizer`: the inference face of a trained model, for other codebases.

tok = Tokenizer.from_pretrained("runs/demo/release", device="cuda")
codes = tok.encode(images)      # images -> (B, H/f, W/f) int64 in [0, K)
images = tok.decode(codes)      # -> (B, 3, H, W) float in [0, 1]
vectors = tok.embed(codes)      # -> (B, H/f, W/f, D) codebook vectors, for priors
tok.fingerprint                 # sha256 of what decides the codes: index manifests record it

`encode` takes float tensors in [0, 1], uint8 tensors, numpy arrays, PIL images or lists
of them (see tokenizer/data/images/pixels.py); `preprocess` gives the evaluation crops that
tools/tokenize_dataset.py feeds it.

A Tokenizer always finds the nearest code exactly: a release trained with the approximate
"faiss-ivf" search encodes with exact faiss (its IVF cells are not part of the release,
and codes that depend on cells re-clustered at load would differ between machines).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from tokenizer.config import Config, ConfigError, ModelConfig, QuantizerConfig, from_dict, validate
from tokenizer.data.images.modes import as_rgb
from tokenizer.data.images.pixels import ImageInput, as_pixel_batch
from tokenizer.data.images.transforms import eval_crop, to_uint8_tensor, uint8_to_model_range
from tokenizer.fingerprint import weights_fingerprint  # (re-exported)
from tokenizer.models import TokenizerModel, build_model

# The grid name of single-grid models; a hierarchical model (VQ-VAE-2) names its grids
# ("top", "bottom") and encode_grids returns one entry per grid.
from tokenizer.models.base import SINGLE_GRID  # noqa: E402  (re-exported)
from tokenizer.models.registry import release_model_config
from tokenizer.quantize import search_from_config
from tokenizer.quantize.faiss_support import faiss_available
from tokenizer.release import (
    RELEASE_CONFIG,
    check_weights_match,
    read_release,
    release_fingerprint,
    write_release,
)

# The exact search a Tokenizer runs for each training backend (see the module docstring).
EXACT_SEARCH = {"torch": "torch", "faiss": "faiss", "faiss-ivf": "faiss", "auto": "auto"}

__all__ = ["SINGLE_GRID", "Tokenizer", "weights_fingerprint"]


def exact_search_name(trained: str, override: str | None = None) -> str:
    """The backend a Tokenizer searches with: `override` ("torch", "faiss" or "auto"),
    else the exact counterpart of the backend the model was trained with."""
    if override is not None:
        if override not in ("torch", "faiss", "auto"):
            raise ValueError(
                f"search={override!r}: a Tokenizer searches exactly; choose 'torch', "
                "'faiss' or 'auto'"
            )
        return override
    if trained not in EXACT_SEARCH:
        raise ValueError(
            f"quantizer.search {trained!r} is not a search backend ({', '.join(EXACT_SEARCH)})"
        )
    exact = EXACT_SEARCH[trained]
    # The release's own choice is a default, not a demand: without faiss the exact torch
    # search gives the same codes. Only an explicit search="faiss" insists on faiss.
    if exact == "faiss" and not faiss_available():
        return "torch"
    return exact


class Tokenizer:
    def __init__(self, model: TokenizerModel, config: Config, search: str | None = None) -> None:
        """Wrap a built model; `search` ("torch", "faiss", "auto") replaces the exact
        counterpart of config.quantizer.search as the backend (the codes stay the
        nearest ones, so the fingerprint does not change)."""
        self.model = model.eval()
        self.config = config
        self.search_backend = exact_search_name(config.quantizer.search, search)
        search_cfg = replace(config.quantizer, search=self.search_backend)
        # A plain attribute of each quantizer (no state): swapping it changes nothing else.
        # One backend per grid: a backend may cache its index of one codebook.
        for quantizer in self.model.quantizers().values():
            try:
                quantizer.search = search_from_config(search_cfg)
            except ImportError as err:
                raise ImportError(
                    f"{err}; or pass search='torch' (exact too: the same codes, slower on CPU)"
                ) from err
        self._fingerprint: str | None = None

    # ------------------------------------------------------------------ loading, saving

    @classmethod
    def from_config(
        cls,
        config: Config,
        state: dict[str, torch.Tensor],
        source: str,
        search: str | None = None,
    ) -> Tokenizer:
        # Built with the torch search, which needs nothing installed; __init__ installs
        # the one this Tokenizer runs (export passes search="torch": it never encodes).
        model = build_model(replace(config, quantizer=replace(config.quantizer, search="torch")))
        check_weights_match(model.state_dict(), state, source)
        model.load_state_dict(state, strict=True)
        return cls(model, config, search)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        search: str | None = None,
    ) -> Tokenizer:
        """Load a release directory (config.json + model.safetensors); never unpickles.
        `search` ("torch", "faiss", "auto") overrides the release's exact backend."""
        release = read_release(directory)
        raw = release.config
        source = str(Path(directory) / RELEASE_CONFIG)
        try:
            config = from_dict({k: raw[k] for k in ("model", "quantizer", "data") if k in raw})
            validate(config)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
        tok = cls.from_config(config, release.weights, str(directory), search)
        # Derived values the file repeats for readers without this package: a hand edit
        # of one of them alone must not pass unnoticed.
        for key, built in tok._derived().items():
            if key in raw and raw[key] != built:
                raise ValueError(
                    f"{source}: {key} is {raw[key]!r} but the model its config builds has {built}"
                )
        return tok.to(device, dtype)

    def _derived(self) -> dict[str, Any]:
        """What config.json repeats about the built model. A single grid keeps the keys
        releases have always had (`codebook_size`, `downsample_factor`: the fingerprint of
        an existing release stays as it was); several grids list each under `grids`."""
        factors = self.model.downsample_factors()
        if len(factors) == 1:
            return {
                "codebook_size": self.codebook_size,
                "downsample_factor": self.downsample_factor,
            }
        sizes = self.codebook_sizes
        grids = {n: {"codebook_size": sizes[n], "downsample_factor": f} for n, f in factors.items()}
        return {"grids": grids}

    def release_config(self) -> dict[str, Any]:
        """The release's config.json body (index manifests embed it)."""
        return {
            # The keys its architecture reads (models/registry.py): a VQ-VAE release, its
            # fingerprint with it, stays as it was when keys for other models were added.
            "model": release_model_config(self.config.model),
            "quantizer": asdict(self.config.quantizer),
            # Preprocessing the tokenizer was trained with, for tools that feed it images.
            "data": {"resolution": self.config.data.resolution},
            **self._derived(),
        }

    def save_pretrained(self, directory: str | Path) -> Path:
        return write_release(directory, self.release_config(), self.model.state_dict())

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> Tokenizer:
        """Move the model; a dtype (e.g. torch.bfloat16) casts the weights, and with them
        the fingerprint (the EMA codebook and quantizer distances stay fp32 inside)."""
        if device is not None:
            self.model.to(device)
        if dtype is not None and dtype != self.dtype:
            self.model.to(dtype)
            self._fingerprint = None
        return self

    # ------------------------------------------------------------------ properties

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _single_grid(self, per_grid: str) -> str:
        """The one grid's name; a multi-grid tokenizer points at the per-grid method."""
        names = self.grid_names
        if len(names) != 1:
            raise ValueError(f"this tokenizer has grids {', '.join(names)}: use {per_grid}")
        return names[0]

    @property
    def codebook_size(self) -> int:
        return self.codebook_sizes[self._single_grid("codebook_sizes")]

    @property
    def downsample_factor(self) -> int:
        return self.model.downsample_factors()[self._single_grid("downsample_factors")]

    @property
    def downsample_factors(self) -> dict[str, int]:
        """Pixels per code along each side, of every grid."""
        return dict(self.model.downsample_factors())

    @property
    def code_dim(self) -> int:
        return int(self.codebook.shape[1])

    @property
    def codebook(self) -> torch.Tensor:
        """(K, D): the vectors the nearest-neighbour search compares against."""
        grid = self._single_grid("model.quantizers()[grid].codebook")
        return self.model.quantizers()[grid].codebook

    @property
    def resolution(self) -> int:
        """The square training resolution: the default crop of preprocess()."""
        return self.config.data.resolution

    @property
    def grid_names(self) -> tuple[str, ...]:
        return tuple(self.model.quantizers())

    @property
    def codebook_sizes(self) -> dict[str, int]:
        """K of every grid's codebook."""
        return {name: q.codebook_size for name, q in self.model.quantizers().items()}

    def grid_shapes(self, height: int, width: int) -> dict[str, tuple[int, int]]:
        """(h, w) of every grid for an image of (height, width) pixels."""
        self._check_image_size(height, width)
        return {
            name: (height // f, width // f) for name, f in self.model.downsample_factors().items()
        }

    def _check_image_size(self, height: int, width: int) -> None:
        for f in self.model.downsample_factors().values():
            self._grid_shape(height, width, f)

    @property
    def fingerprint(self) -> str:
        """sha256 of everything that decides the codes (release.release_fingerprint): the
        weights, their dtype, and every config value but those that cannot change a code
        (release.INFERENCE_NEUTRAL_KEYS), so editing l2_normalize in a config.json
        changes it. Computed once."""
        if self._fingerprint is None:
            self._fingerprint = release_fingerprint(
                self.release_config(), weights_fingerprint(self.model.state_dict())
            )
        return self._fingerprint

    @property
    def model_config(self) -> ModelConfig:
        return self.config.model

    @property
    def quantizer_config(self) -> QuantizerConfig:
        return self.config.quantizer

    def grid_shape(self, height: int, width: int) -> tuple[int, int]:
        """Code grid (h, w) of an image of (height, width) pixels."""
        grid = self._single_grid("grid_shapes")
        return self._grid_shape(height, width, self.model.downsample_factors()[grid])

    def _grid_shape(self, height: int, width: int, f: int) -> tuple[int, int]:
        if height % f or width % f:
            crop = (height // f * f, width // f * f)
            example = f" (here {crop})" if min(crop) > 0 else ""
            raise ValueError(
                f"image size (height, width) {(height, width)} is not divisible by the "
                f"downsampling factor {f}: crop it to a multiple of {f} on each side"
                f"{example}, or use tok.preprocess(images), which resizes and centre-crops "
                f"to {self.resolution}x{self.resolution}"
            )
        return height // f, width // f

    # ------------------------------------------------------------------ images <-> codes

    def preprocess(
        self, images: Image.Image | Sequence[Image.Image], resolution: int | None = None
    ) -> torch.Tensor:
        """PIL images of any mode -> (B, 3, R, R) uint8: upright 8-bit RGB as training
        reads files (image_modes.as_rgb: EXIF orientation, 16-bit by /257, alpha onto
        white), shorter side to R, centre crop. The same crops tools/tokenize_dataset.py
        makes (JPEGs not yet loaded decode at reduced scale there too), so codes of a new
        image match codes in an index."""
        resolution = resolution or self.resolution
        items = [images] if isinstance(images, Image.Image) else list(images)
        crops = []
        for image in items:
            image.draft("RGB", (resolution, resolution))  # no-op once an image is loaded
            crops.append(to_uint8_tensor(eval_crop(as_rgb(image), resolution)))
        return torch.stack(crops)  # (B, 3, R, R)

    @torch.no_grad()
    def encode_grids(self, images: ImageInput) -> dict[str, torch.Tensor]:
        """Every code grid of the model: grid name -> (B, h, w) int64."""
        pixels = as_pixel_batch(images)  # (B, 3, H, W) uint8 or float in [0, 1]
        self._check_image_size(pixels.shape[2], pixels.shape[3])
        pixels = pixels.to(self.device, non_blocking=True)
        if pixels.dtype == torch.uint8:
            x = uint8_to_model_range(pixels)  # (B, 3, H, W) in [-1, 1]
        else:
            x = pixels.float() * 2.0 - 1.0
        # encode() casts to the weights' dtype itself.
        return self.model.encode_codes(x)  # grid -> (B, h, w)

    def encode(self, images: ImageInput) -> torch.Tensor:
        """Images -> codes (B, H/f, W/f) int64, on the tokenizer's device. A single image
        (PIL, (3, H, W) tensor, (H, W, 3) array) is a batch of one."""
        grid = self._single_grid("encode_grids")
        return self.encode_grids(images)[grid]

    def _check_codes(
        self, codes: torch.Tensor, k: int | None = None, grid: str | None = None
    ) -> torch.Tensor:
        k = self.codebook_size if k is None else k
        where = f"grid {grid!r}: " if grid is not None else ""
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError(f"{where}codes must be integers, got {codes.dtype}")
        codes = codes.to(self.device, torch.long)
        if codes.numel() and (codes.min() < 0 or codes.max() >= k):
            raise ValueError(
                f"{where}codes outside [0, {k}): min {codes.min().item()}, max {codes.max().item()}"
            )
        return codes

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) integer (int64, int32, uint16 ...) -> images (B, 3, h*f, w*f)
        float in [0, 1]. One grid (h, w), as an index shard stores a sample, gives one
        image (3, h*f, w*f), as encode takes one image."""
        grid = self._single_grid("decode_grids")
        codes = torch.as_tensor(codes)
        if codes.ndim not in (2, 3):
            raise ValueError(
                f"decode expects integer codes (B, h, w) or one grid (h, w), "
                f"got {tuple(codes.shape)}"
            )
        single = codes.ndim == 2
        codes = self._check_codes(codes[None] if single else codes)  # (B, h, w)
        images = self.decode_grids({grid: codes})  # (B, 3, H, W)
        return images[0] if single else images  # (3, H, W) or (B, 3, H, W)

    @torch.no_grad()
    def decode_grids(self, codes: dict[str, torch.Tensor]) -> torch.Tensor:
        """Every grid's integer codes (B, h, w) -> images (B, 3, H, W) float in [0, 1].
        Each grid is checked against its own K, and all against one image size."""
        if set(codes) != set(self.grid_names):
            raise ValueError(f"decode_grids needs grids {self.grid_names}, got {tuple(codes)}")
        factors = self.model.downsample_factors()
        checked, sizes = {}, set()
        for name, grid in codes.items():
            grid = torch.as_tensor(grid)
            if grid.ndim != 3:
                raise ValueError(f"grid {name!r}: expected (B, h, w), got {tuple(grid.shape)}")
            checked[name] = self._check_codes(grid, self.codebook_sizes[name], name)
            f = factors[name]
            sizes.add((grid.shape[0], grid.shape[1] * f, grid.shape[2] * f))
        if len(sizes) != 1:
            raise ValueError(f"grids disagree on (B, H, W): {sorted(sizes)}")
        images = self.model.decode_codes(checked)  # (B, 3, H, W) in [-1, 1]
        return ((images + 1.0) / 2.0).clamp(0.0, 1.0).float()

    @torch.no_grad()
    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes of any shape (..., ) -> their codebook vectors (..., D) float32, e.g.
        (B, h, w) -> (B, h, w, D) or flattened sequences (B, L) -> (B, L, D)."""
        codes = self._check_codes(torch.as_tensor(codes))
        return F.embedding(codes, self.codebook.float())
