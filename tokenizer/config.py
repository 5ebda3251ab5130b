"""The one typed configuration object, built from YAML files plus `key=value` overrides.

Users script against these key names; renaming one is a breaking change.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException


class ConfigError(ValueError):
    """A config file or override names an unknown key or gives a value of the wrong type."""


@dataclass
class RunConfig:
    dir: str = "runs/default"
    seed: int = 0


@dataclass
class ModelConfig:
    arch: str = "vqvae"
    in_channels: int = 3
    # One entry per stride-2 downsampling: the encoder's widths, mirrored by the decoder.
    # The downsampling factor is 2 ** len(channels).
    channels: list[int] = field(default_factory=lambda: [128, 256])
    num_res_blocks: int = 2
    # Width inside each residual block (ReLU, 3x3 conv, ReLU, 1x1 conv).
    res_channels: int = 64


@dataclass
class QuantizerConfig:
    codebook_size: int = 512
    # Dimension of the encoder output the quantizer receives (and the decoder takes back).
    code_dim: int = 64
    # Project code_dim -> lookup_dim before the search and back after it (ViT-VQGAN,
    # LlamaGen, VQGAN-LC: 8 or 32); the codebook then holds lookup_dim vectors. 0: no projection.
    lookup_dim: int = 0
    # Compare l2-normalised vectors (cosine similarity), as in ViT-VQGAN and LlamaGen.
    l2_normalize: bool = False
    beta: float = 0.25
    ema: bool = False
    ema_decay: float = 0.99
    ema_epsilon: float = 1e-5
    # "random" (the paper), "data" (codes set to encoder outputs of the first training
    # batch) or "kmeans" (k-means over the first encoder outputs).
    init: str = "random"
    kmeans_iters: int = 20
    # A code whose EMA usage (assignments per step, decayed with ema_decay) falls under
    # restart_threshold, or that no vector chose for restart_unused_steps steps, is
    # restarted at a random recent encoder output; 0 disables each rule.
    restart_threshold: float = 0.0
    restart_unused_steps: int = 0
    # Nearest-neighbour backend: "torch" (exact, chunked), "faiss" (exact; GPU when the
    # faiss build has it), "faiss-ivf" (approximate, for huge K) or "auto".
    search: str = "torch"
    # Query rows per search chunk; 0 sizes chunks so a distance tile stays near 4M floats
    # on CPU (it stays in cache) and 64M on a GPU.
    search_chunk: int = 0
    # faiss-ivf: inverted lists (0: about 4 * sqrt(K)), lists probed per query, training
    # forwards between index rebuilds as the codebook moves (evaluation does not count),
    # and queries sampled to measure recall.
    ivf_nlist: int = 0
    ivf_nprobe: int = 8
    ivf_rebuild_every: int = 100
    ivf_recall_samples: int = 1024


@dataclass
class ColorJitterConfig:
    # Per training crop: hue rotated by a uniform draw in [-hue, hue] turns (at most 0.5),
    # saturation scaled by a uniform draw in [1 - saturation, 1 + saturation] (at most 1).
    # 0 and 0: off.
    hue: float = 0.0
    saturation: float = 0.0


@dataclass
class DataConfig:
    # A brace pattern ("data/{000000..000099}.tar") or a list of paths/patterns.
    train_shards: Any = None
    eval_shards: Any = None
    resolution: int = 64
    num_workers: int = 1
    shuffle_buffer: int = 256
    random_flip: bool = True
    color_jitter: ColorJitterConfig = field(default_factory=ColorJitterConfig)
    # Batches each worker prepares ahead of the training step.
    prefetch_factor: int = 2


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 16  # per rank, per micro-step
    grad_accum_steps: int = 1
    lr: float = 2e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 disables clipping
    # "auto": what the launcher says (accelerate config or --mixed_precision), else "no" or "bf16".
    mixed_precision: str = "auto"


@dataclass
class LossConfig:
    reconstruction: str = "mse"  # "mse" (the paper) or "l1"


@dataclass
class LoggingConfig:
    every: int = 10
    image_every: int = 200
    num_images: int = 8
    tensorboard: bool = True
    eval_every: int = 0  # 0: evaluate only at the end
    eval_batches: int = 4
    # Append every consumed sample key with its step to run.dir/keys/rank{r}.tsv: a
    # record of the exact data order, for checking resumes and debugging.
    log_keys: bool = False


@dataclass
class CheckpointConfig:
    every: int = 500
    keep_last: int = 2


@dataclass
class DistributedConfig:
    # Every N steps all ranks compare a hash of the codebook and its EMA state; 0 disables.
    check_every: int = 100
    # On a mismatch: "strict" raises naming the ranks and the step; "repair" re-broadcasts
    # rank 0's codebook state and warns.
    on_mismatch: str = "strict"


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    # "auto" (newest checkpoint in run.dir, if any), a checkpoint path, or None.
    resume: str | None = None


def _explain(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or getattr(err, "key", None) or "?"
    first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
    kind = "unknown key" if isinstance(err, ConfigKeyError) else "invalid value"
    return ConfigError(f"{source}: {kind} '{key}': {first_line}")


def load_config(*yaml_files: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """Merge YAML files (later wins) then `a.b=value` overrides onto the defaults.

    An unknown key or a value of the wrong type raises ConfigError naming the key and
    the file or override it came from.
    """
    merged: DictConfig = OmegaConf.structured(Config)
    for path in yaml_files:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = OmegaConf.load(path)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        try:
            merged = OmegaConf.merge(merged, loaded)
        except OmegaConfBaseException as err:
            raise _explain(err, str(path)) from None
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise _explain(err, f"override {item!r}") from None
    cfg = OmegaConf.to_object(merged)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Checks that types alone cannot express."""
    checks = [
        (
            cfg.train.mixed_precision in ("auto", "no", "bf16"),
            "train.mixed_precision must be 'auto', 'no' or 'bf16'",
        ),
        (
            cfg.distributed.on_mismatch in ("strict", "repair"),
            "distributed.on_mismatch must be 'strict' or 'repair'",
        ),
        (cfg.loss.reconstruction in ("mse", "l1"), "loss.reconstruction must be 'mse' or 'l1'"),
        (cfg.quantizer.codebook_size > 0, "quantizer.codebook_size must be positive"),
        (cfg.quantizer.code_dim > 0, "quantizer.code_dim must be positive"),
        (
            cfg.quantizer.init in ("random", "data", "kmeans"),
            "quantizer.init must be 'random', 'data' or 'kmeans'",
        ),
        (
            cfg.quantizer.search in ("torch", "faiss", "faiss-ivf", "auto"),
            "quantizer.search must be 'torch', 'faiss', 'faiss-ivf' or 'auto'",
        ),
        (cfg.quantizer.restart_threshold >= 0, "quantizer.restart_threshold must be >= 0"),
        (cfg.quantizer.lookup_dim >= 0, "quantizer.lookup_dim must be >= 0 (0: no projection)"),
        (0.0 < cfg.quantizer.ema_decay < 1.0, "quantizer.ema_decay must be in (0, 1)"),
        (
            0.0 <= cfg.data.color_jitter.hue <= 0.5,
            f"data.color_jitter.hue must be in [0, 0.5] turns, got {cfg.data.color_jitter.hue}",
        ),
        (
            0.0 <= cfg.data.color_jitter.saturation <= 1.0,
            "data.color_jitter.saturation must be in [0, 1], got "
            f"{cfg.data.color_jitter.saturation}",
        ),
        (len(cfg.model.channels) >= 1, "model.channels needs at least one entry"),
        (cfg.train.batch_size > 0, "train.batch_size must be positive"),
        (cfg.train.grad_accum_steps > 0, "train.grad_accum_steps must be positive"),
        (
            cfg.data.resolution % 2 ** len(cfg.model.channels) == 0,
            "data.resolution must be divisible by the downsampling factor 2**len(model.channels)",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_dict(data: dict) -> Config:
    """Rebuild a Config from a plain dict (a saved run's config), refusing unknown keys."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(data))
    except OmegaConfBaseException as err:
        raise _explain(err, "saved config") from None
    return OmegaConf.to_object(merged)


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))
