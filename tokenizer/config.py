"""The one typed configuration object, built from YAML files plus `key=value` overrides.

Users script against these key names; renaming one is a breaking change.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

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
    # "vqvae" (the paper's network: channels, res_channels), "vqvae2" (that network's
    # blocks in a hierarchy of code grids: levels, level_*) or "vqgan" (taming / LlamaGen:
    # ch, ch_mult, attn_resolutions, z_channels, dropout); num_res_blocks serves all.
    arch: str = "vqvae"
    in_channels: int = 3
    # vqvae, vqvae2: one entry per stride-2 downsampling: the encoder's widths, mirrored
    # by the decoder. The (bottom grid's) downsampling factor is 2 ** len(channels).
    channels: list[int] = field(default_factory=lambda: [128, 256])
    # Residual blocks per stage (vqvae) or per resolution level (vqgan; its decoder has
    # one more per level, as in taming).
    num_res_blocks: int = 2
    # vqvae: width inside each residual block (ReLU, 3x3 conv, ReLU, 1x1 conv).
    res_channels: int = 64
    # vqgan (defaults: LlamaGen VQ-16 = taming's f16 VQGAN): base width `ch`, one level of
    # width ch * mult per entry of ch_mult, a stride-2 downsampling between levels, so the
    # downsampling factor is 2 ** (len(ch_mult) - 1); LlamaGen VQ-8 is [1, 2, 2, 4].
    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    # Feature resolutions, at data.resolution pixels in, whose levels add self-attention
    # after each residual block (the mid block always attends). [16] at 256 px attends in
    # the coarsest f16 level, as LlamaGen VQ-16 does; the levels are fixed when the model
    # is built, so a change of data.resolution must move these with it.
    attn_resolutions: list[int] = field(default_factory=lambda: [16])
    # Encoder output / decoder input width, around the 1x1 convs to quantizer.code_dim.
    z_channels: int = 256
    dropout: float = 0.0
    # vqvae2 (VQ-VAE-2, the paper's blocks and widths above): the number of code grids,
    # coarsest first `top` .. `bottom` (2: top, bottom; 3: top, middle, bottom). The
    # bottom grid is at 2 ** len(channels), each grid above halves the one below it.
    levels: int = 2
    # vqvae2: the blocks of every stage: "paper" (the VQ-VAE's: channels, res_channels;
    # rosinality's VQ-VAE-2) or "vqgan" (ch, ch_mult, attn_resolutions, z_channels,
    # dropout, grad_checkpointing; the bottom grid at 2 ** (len(ch_mult) - 1)).
    blocks: str = "paper"
    # vqvae2: each grid's codebook size and code dimension, coarsest first; [] gives
    # every grid quantizer.codebook_size / quantizer.code_dim. The other quantizer.*
    # options (EMA, init, restarts, lookup_dim, search) apply to every grid.
    level_codebook_sizes: list[int] = field(default_factory=list)
    level_code_dims: list[int] = field(default_factory=list)
    # vqgan: recompute each level's activations in the backward pass instead of keeping
    # them (less memory at 512-1024 px, about one more forward of compute). Training only;
    # never around the quantizer, whose EMA update and collectives must run once a step.
    grad_checkpointing: bool = False


# The values of quantizer.search (tokenizer/quantize/backends.py builds each one).
SEARCH_BACKENDS = ("torch", "faiss", "faiss-ivf", "auto")


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
    # Dead-code restarts: a code is moved onto a random recent encoder output when
    # - restart_threshold, in [0, 1): its EMA usage (decayed with ema_decay every forward)
    #   falls under this fraction of the uniform rate, the N / K hits a code gets when all
    #   K codes share the N vectors of all ranks evenly. Relative, so one value means the
    #   same on 1 or 64 ranks and at any batch size: 0.03 restarts codes used at under 3%
    #   of the average rate;
    # - restart_unused_steps: no vector of any rank chose it for this many training
    #   (optimiser) steps, each of train.grad_accum_steps forwards. Scale it with the
    #   vectors per step: a uniformly used code gets N / K hits per forward.
    # 0 disables each rule. A new or restarted code starts at twice the threshold.
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
    # train.task prior: the index shards to learn (a folder tools/tokenize_dataset.py
    # wrote, or its manifest.json) and, optionally, held-out ones of the same tokenizer.
    train_index: str | None = None
    eval_index: str | None = None


# The training tasks (tokenizer/training/tasks/): what one step computes.
TASKS = ("tokenizer", "prior")


@dataclass
class TrainConfig:
    # What a step trains: "tokenizer" (the tokenizer on reconstruction + VQ terms, and
    # the perceptual and adversarial terms when their weights are > 0) or "prior" (a
    # prior over the codes of data.train_index: the prior section).
    task: str = "tokenizer"
    max_steps: int = 1000
    batch_size: int = 16  # per rank, per micro-step
    grad_accum_steps: int = 1
    lr: float = 2e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    # AdamW's decoupled weight decay, applied to convolution and linear weights only
    # (the quantizer's projections included); never to the codebook, biases, norm
    # weights or any other 1-D parameter.
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 disables clipping
    # Keep an exponential moving average of the tokenizer's weights (0: off; MaskBit and
    # Open-MAGVIT2 use 0.999 or more), checkpointed and released instead of the raw weights.
    ema_decay: float = 0.0
    # Steps skipped for a non-finite loss (on any rank) before the run stops; each is
    # logged (train/skipped_steps). 0: stop at the first.
    max_bad_steps: int = 20
    # "auto": what the launcher says (accelerate config or --mixed_precision), else "no" or "bf16".
    mixed_precision: str = "auto"


# The values of loss.adversarial.loss and loss.adversarial.disc_norm.
GAN_LOSSES = ("hinge", "non_saturating")
DISC_NORMS = ("batch", "group", "none")


@dataclass
class AdversarialConfig:
    """The adversarial half of the VQGAN objective: a PatchGAN discriminator trained
    against the decoder (tokenizer/nn/discriminator.py, tokenizer/losses/adversarial.py)."""

    # The generator's adversarial term's weight; 0: no discriminator at all.
    weight: float = 0.0
    # Optimiser steps before the discriminator trains and the generator sees its term
    # (LlamaGen and MaskBit: 20k): reconstructions must be decent first, or the GAN
    # onset ruins them (taming#44, #93).
    start_step: int = 0
    loss: str = "hinge"  # "hinge" (taming, LlamaGen) or "non_saturating"
    # taming's adaptive weight: weight x ||grad rec|| / ||grad gan|| at the decoder's last
    # layer, recomputed every step. false: the fixed `weight` (LlamaGen, MaskBit).
    adaptive: bool = False
    disc_ndf: int = 64  # width of the first layer; doubled per layer, capped at 8x
    disc_layers: int = 3  # stride-2 layers: 256 px -> 30x30 patch logits at 3
    # "batch" (taming: per-rank batch statistics), "group" (no batch coupling) or "none".
    disc_norm: str = "batch"
    # LeCam regularisation (Tseng et al. 2021) of the discriminator; 0: off.
    lecam_weight: float = 0.0
    lecam_decay: float = 0.999
    # The discriminator's own AdamW. Its LR is 0 before start_step, then rises linearly
    # over warmup_steps to lr and stays constant (taming, LlamaGen: constant): it does not
    # follow train.lr's cosine, which would already be part-decayed when it starts.
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    weight_decay: float = 0.0
    warmup_steps: int = 0


@dataclass
class PerceptualConfig:
    # LPIPS (VGG16 trunk, lpips v0.1 linear heads) in the tokenizer's loss, times this
    # weight; 0: off. Its weights are the loss's, never the model's: no release holds them.
    weight: float = 0.0
    # torchvision's VGG16 weights (vgg16-397923af.pth) or a .safetensors with the same
    # `features.N.weight` / `features.N.bias` keys. Never downloaded: give the file.
    backbone: str | None = None
    # The lpips v0.1 VGG heads (vgg.pth, 7 KB); None: the copy that an installed
    # torchmetrics or lpips package ships.
    heads: str | None = None


@dataclass
class LossConfig:
    reconstruction: str = "mse"  # "mse" (the paper) or "l1"
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)


# The values of prior.arch (tokenizer/priors/).
PRIOR_ARCHS = ("pixelcnn", "transformer")


@dataclass
class PriorConfig:
    """An autoregressive prior over a tokenizer's code grids (train.task: prior). With
    several grids (VQ-VAE-2) there is one prior per grid, coarsest first, each below the
    first conditioned on the grid above it; all train together, one loss per grid."""

    # "pixelcnn": the gated PixelCNN (van den Oord et al. 2016); "transformer": a
    # decoder-only transformer over raster-ordered codes.
    arch: str = "pixelcnn"
    dim: int = 64
    layers: int = 15
    kernel_size: int = 7  # pixelcnn: the first (masked) layer's kernel; the gated layers use 3
    heads: int = 4  # transformer heads; pixelcnn: heads of its attention blocks
    # pixelcnn: causal self-attention after every N gated layers (0: none), in the prior of
    # the coarsest grid only when there are several (VQ-VAE-2's top prior has it).
    attention_every: int = 0
    mlp_ratio: float = 4.0  # transformer
    dropout: float = 0.0
    # > 0: class-conditional, on each sample's `cls` field (its class index as text, the
    # webdataset convention; tokenize_dataset carries it into the index) in [0, N).
    num_classes: int = 0
    # A tokenizer release of the index's fingerprint: training previews decode samples
    # with it (none: no previews; tools/sample_prior.py takes one too).
    tokenizer: str | None = None
    # Training samples whose codes give the unigram baseline (eval/unigram_bits).
    unigram_samples: int = 100_000


@dataclass
class LoggingConfig:
    every: int = 10
    image_every: int = 200
    num_images: int = 8
    tensorboard: bool = True
    eval_every: int = 0  # 0: evaluate only at the end
    eval_batches: int = 4
    # Warn, naming the grid, when a logging window's vectors choose fewer than this fraction
    # of the codes they could reach (min(K, vectors)); 0: never.
    collapse_usage: float = 0.1
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
    prior: PriorConfig = field(default_factory=PriorConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    # "auto" (newest checkpoint in run.dir, if any), a checkpoint path, or None.
    resume: str | None = None


def _explain(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or getattr(err, "key", None) or "?"
    first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
    kind = "unknown key" if isinstance(err, ConfigKeyError) else "invalid value"
    return ConfigError(f"{source}: {kind} '{key}': {first_line}")


def _string_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Dotted names of every str-valued key (str or str | None)."""
    keys: list[str] = []
    for name, hint in get_type_hints(cls).items():
        if is_dataclass(hint):
            keys.extend(_string_keys(hint, f"{prefix}{name}."))
        elif hint is str or hint == (str | None):
            keys.append(f"{prefix}{name}")
    return keys


# YAML 1.1 reads yes/no/on/off/true/false as booleans, in files and in `key=value`
# overrides alike (`train.mixed_precision=no` arrives as False). Where a boolean has an
# obvious meaning it is translated; anywhere else a string is expected it is refused
# rather than silently becoming the string "False".
_BOOLEAN_MEANINGS: dict[str, dict[bool, str | None]] = {
    "train.mixed_precision": {False: "no"},
    "resume": {False: None},
    "data.eval_shards": {False: None},
}
# Shard specs are typed Any (a string or a list), but a boolean is never one.
_STRING_KEYS = [*_string_keys(), "data.train_shards", "data.eval_shards"]


def _translate_booleans(loaded: DictConfig, source: str) -> DictConfig:
    for key in _STRING_KEYS:
        try:
            value = OmegaConf.select(loaded, key, default=None)
        except OmegaConfBaseException:
            continue  # a malformed section: the merge reports it with its key
        if not isinstance(value, bool):
            continue
        meanings = _BOOLEAN_MEANINGS.get(key, {})
        if value not in meanings:
            raise ConfigError(
                f"{source}: '{key}' takes a string, but YAML read the value as the boolean "
                f"{value} (yes/no/on/off/true/false are booleans in YAML): quote it "
                f"(in a file: '...'; on the command line: {key}=\"'...'\")"
            )
        OmegaConf.update(loaded, key, meanings[value], merge=False)
    return loaded


def load_config(*yaml_files: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """Merge YAML files (later wins) then `a.b=value` overrides onto the defaults.

    An unknown key, a value of the wrong type or out of its range raises ConfigError
    naming the key (and, for the first two, the file or override it came from).
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
        if isinstance(loaded, DictConfig):
            loaded = _translate_booleans(loaded, str(path))
        try:
            merged = OmegaConf.merge(merged, loaded)
        except OmegaConfBaseException as err:
            raise _explain(err, str(path)) from None
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        source = f"override {item!r}"
        try:
            loaded = _translate_booleans(OmegaConf.from_dotlist([item]), source)
            merged = OmegaConf.merge(merged, loaded)
        except OmegaConfBaseException as err:
            raise _explain(err, source) from None
    cfg = OmegaConf.to_object(merged)
    validate(cfg)
    return cfg


@dataclass(frozen=True)
class _Rule:
    key: str  # dotted, as the user types it
    ok: Callable[[Any], bool]
    requirement: str  # completes "<key> must be ..."


def _at_least(least: float, note: str = "") -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= least), f">= {least}{note}"


def _one_of(*choices: str) -> tuple[Callable[[Any], bool], str]:
    names = [repr(c) for c in choices]
    return (lambda v: v in choices), "one of " + ", ".join(names)


def _rule(key: str, check: tuple[Callable[[Any], bool], str]) -> _Rule:
    return _Rule(key, *check)


_RULES = [
    _rule("run.seed", _at_least(0)),
    _rule("model.in_channels", _at_least(1)),
    _rule(
        "model.channels",
        ((lambda v: len(v) >= 1 and min(v) >= 1), "a non-empty list of widths >= 1"),
    ),
    _rule("model.num_res_blocks", _at_least(0)),
    _rule("model.res_channels", _at_least(1)),
    _rule("model.ch", _at_least(1)),
    _rule(
        "model.ch_mult",
        ((lambda v: len(v) >= 1 and min(v) >= 1), "a non-empty list of multipliers >= 1"),
    ),
    _rule(
        "model.attn_resolutions",
        ((lambda v: all(r >= 1 for r in v)), "a list of feature resolutions >= 1"),
    ),
    _rule("model.z_channels", _at_least(1)),
    _rule("model.levels", _at_least(1)),
    _rule("model.blocks", _one_of("paper", "vqgan")),
    _rule("model.level_codebook_sizes", ((lambda v: all(k >= 1 for k in v)), "sizes >= 1")),
    _rule("model.level_code_dims", ((lambda v: all(d >= 1 for d in v)), "dimensions >= 1")),
    _rule("model.dropout", ((lambda v: 0.0 <= v < 1.0), "in [0, 1)")),
    _rule("quantizer.codebook_size", _at_least(1)),
    _rule("quantizer.code_dim", _at_least(1)),
    _rule("quantizer.lookup_dim", _at_least(0, " (0: no projection)")),
    _rule("quantizer.beta", _at_least(0)),
    _rule("quantizer.ema_decay", ((lambda v: 0.0 < v < 1.0), "in (0, 1)")),
    _rule("quantizer.ema_epsilon", ((lambda v: v > 0), "> 0")),
    _rule("quantizer.init", _one_of("random", "data", "kmeans")),
    _rule("quantizer.kmeans_iters", _at_least(1)),
    _rule(
        "quantizer.restart_threshold",
        ((lambda v: 0 <= v < 1), "in [0, 1): a fraction of the uniform rate N/K (0: off)"),
    ),
    _rule("quantizer.restart_unused_steps", _at_least(0, " (0: off)")),
    _rule("quantizer.search", _one_of(*SEARCH_BACKENDS)),
    _rule("quantizer.search_chunk", _at_least(0, " (0: automatic)")),
    _rule("quantizer.ivf_nlist", _at_least(0, " (0: about 4 sqrt(K))")),
    _rule("quantizer.ivf_nprobe", _at_least(1)),
    _rule("quantizer.ivf_rebuild_every", _at_least(0, " (0: never rebuild)")),
    _rule("quantizer.ivf_recall_samples", _at_least(0, " (0: recall not measured)")),
    _rule("data.resolution", _at_least(1)),
    _rule("data.num_workers", _at_least(0, " (0: load in the training process)")),
    _rule("data.shuffle_buffer", _at_least(0, " (0 or 1: no shuffle)")),
    _rule("data.prefetch_factor", _at_least(1)),
    _rule("data.color_jitter.hue", ((lambda v: 0.0 <= v <= 0.5), "in [0, 0.5] turns")),
    _rule("data.color_jitter.saturation", ((lambda v: 0.0 <= v <= 1.0), "in [0, 1]")),
    _rule("train.max_steps", _at_least(1)),
    _rule("train.batch_size", _at_least(1)),
    _rule("train.grad_accum_steps", _at_least(1)),
    _rule("train.lr", ((lambda v: v > 0), "> 0")),
    _rule("train.min_lr_ratio", ((lambda v: 0.0 <= v <= 1.0), "in [0, 1]")),
    _rule("train.warmup_steps", _at_least(0)),
    _rule(
        "train.betas",
        ((lambda v: len(v) == 2 and all(0.0 <= b < 1.0 for b in v)), "two values in [0, 1)"),
    ),
    _rule("train.weight_decay", _at_least(0)),
    _rule("train.grad_clip", _at_least(0, " (0: no clipping)")),
    _rule("train.max_bad_steps", _at_least(0)),
    _rule("train.ema_decay", ((lambda v: 0.0 <= v < 1.0), "in [0, 1) (0: no weight EMA)")),
    # fp16 is not offered: it needs loss scaling, which nothing here has been tested
    # with; bf16 keeps fp32's range.
    _rule("train.mixed_precision", _one_of("auto", "no", "bf16")),
    _rule("train.task", _one_of(*TASKS)),
    _rule("loss.reconstruction", _one_of("mse", "l1")),
    _rule("loss.perceptual.weight", _at_least(0, " (0: off)")),
    _rule("loss.adversarial.weight", _at_least(0, " (0: off)")),
    _rule("loss.adversarial.start_step", _at_least(0)),
    _rule("loss.adversarial.loss", _one_of(*GAN_LOSSES)),
    _rule("loss.adversarial.disc_ndf", _at_least(1)),
    _rule("loss.adversarial.disc_layers", _at_least(1)),
    _rule("loss.adversarial.disc_norm", _one_of(*DISC_NORMS)),
    _rule("loss.adversarial.lecam_weight", _at_least(0, " (0: off)")),
    _rule("loss.adversarial.lecam_decay", ((lambda v: 0.0 < v < 1.0), "in (0, 1)")),
    _rule("loss.adversarial.lr", ((lambda v: v > 0), "> 0")),
    _rule(
        "loss.adversarial.betas",
        ((lambda v: len(v) == 2 and all(0.0 <= b < 1.0 for b in v)), "two values in [0, 1)"),
    ),
    _rule("loss.adversarial.weight_decay", _at_least(0)),
    _rule("loss.adversarial.warmup_steps", _at_least(0)),
    _rule("prior.arch", _one_of(*PRIOR_ARCHS)),
    _rule("prior.dim", _at_least(1)),
    _rule("prior.layers", _at_least(1)),
    _rule("prior.kernel_size", ((lambda v: v >= 3 and v % 2 == 1), "an odd size >= 3")),
    _rule("prior.heads", _at_least(1)),
    _rule("prior.attention_every", _at_least(0, " (0: no attention)")),
    _rule("prior.mlp_ratio", ((lambda v: v > 0), "> 0")),
    _rule("prior.dropout", ((lambda v: 0.0 <= v < 1.0), "in [0, 1)")),
    _rule("prior.unigram_samples", _at_least(1)),
    _rule("prior.num_classes", _at_least(0, " (0: unconditional)")),
    _rule("logging.every", _at_least(1)),
    _rule("logging.image_every", _at_least(0, " (0: no previews)")),
    _rule("logging.num_images", _at_least(0)),
    _rule("logging.eval_every", _at_least(0, " (0: evaluate only at the end)")),
    _rule("logging.eval_batches", _at_least(0, " (0: the whole eval set)")),
    _rule("logging.collapse_usage", ((lambda v: 0.0 <= v < 1.0), "in [0, 1) (0: no warning)")),
    _rule("checkpoint.every", _at_least(0, " (0: only at the end)")),
    _rule("checkpoint.keep_last", _at_least(0, " (0: keep all)")),
    _rule("distributed.check_every", _at_least(0, " (0: off)")),
    _rule("distributed.on_mismatch", _one_of("strict", "repair")),
]


def _get(cfg: Config, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def validate(cfg: Config) -> None:
    """Range checks that types alone cannot express, one message per key."""
    for rule in _RULES:
        value = _get(cfg, rule.key)
        if not rule.ok(value):
            raise ConfigError(f"{rule.key} must be {rule.requirement}, got {value!r}")
    # Architectures register themselves (models/registry.py), so the choices and their
    # own rules (the downsampling factor data.resolution must be divisible by, which keys
    # they read) are known only at run time; imported here because the models import
    # this module.
    from tokenizer.models.registry import check_arch_config

    check_arch_config(cfg)
    _check_discriminator_fits(cfg)


def _check_discriminator_fits(cfg: Config) -> None:
    # Each stride-2 layer halves the side (rounding down), the two stride-1 4x4 convs
    # take 1 each: at least 3 rows must be left after the halvings for one logit.
    adv = cfg.loss.adversarial
    if adv.weight > 0 and cfg.data.resolution >> adv.disc_layers < 3:
        raise ConfigError(
            f"loss.adversarial.disc_layers must leave the discriminator at least 3x3 "
            f"features: data.resolution / 2**disc_layers >= 3, got data.resolution = "
            f"{cfg.data.resolution} with disc_layers = {adv.disc_layers}"
        )


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
