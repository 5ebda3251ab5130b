"""The prior task: an autoregressive prior over the code grids of an index
(tools/tokenize_dataset.py's output), one prior per grid (tokenizer/priors/grids.py),
trained on the resumable index-shard stream by the one loop.

Held-out evaluation gives bits per code beside two baselines measured on the same codes:
log2 K (a uniform guess) and the cross-entropy of the training codes' unigram
distribution (what a prior that ignores context would reach)."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from tokenizer.atomic import write_text
from tokenizer.config import Config, ConfigError
from tokenizer.data.index.format import IndexManifest, read_manifest
from tokenizer.data.index.labels import LabelError, class_labels
from tokenizer.data.index.reader import IndexShards, TokenBatch, collate_tokens
from tokenizer.priors.grids import GridPriors, GridShape, build_grid_priors
from tokenizer.training.engine import deepspeed_requested
from tokenizer.training.optim import build_optimizer
from tokenizer.training.task import NonFiniteGuard, Part, StepOutput, TrainingTask

logger = logging.getLogger("tokenizer.training.loop")

PRIOR = "prior"  # the part's name in checkpoints
PRIOR_JSON = "prior.json"  # beside the run's checkpoints: what tools/sample_prior.py needs
LN2 = math.log(2.0)


def index_grids(manifest: IndexManifest) -> list[GridShape]:
    """The grids of an index, coarsest first, as the priors see them."""
    return [GridShape(g.name, g.codebook_size, (g.shape[0], g.shape[1])) for g in manifest.grids]


def resolve_indexes(cfg: Config) -> tuple[list[str], list[str]]:
    """data.train_index (required) and data.eval_index as manifest paths, after checking
    that both exist and that their codes come from one tokenizer: ([train], [eval] or [])."""
    if not cfg.data.train_index:
        raise ConfigError(
            "train.task prior needs data.train_index: an index folder written by "
            "tools/tokenize_dataset.py"
        )
    train, a = _manifest(cfg.data.train_index, "data.train_index")
    if not cfg.data.eval_index:
        return [train], []
    held_out, b = _manifest(cfg.data.eval_index, "data.eval_index")
    if a.tokenizer_sha256 != b.tokenizer_sha256:
        raise ConfigError(
            f"data.eval_index {cfg.data.eval_index} holds codes of tokenizer "
            f"{b.tokenizer_sha256[:12]}..., data.train_index {cfg.data.train_index} those of "
            f"{a.tokenizer_sha256[:12]}...: a prior learns one tokenizer's codes"
        )
    return [train], [held_out]


def _manifest(spec: str, key: str) -> tuple[str, IndexManifest]:
    """The manifest file `spec` names (an index folder or the file) and its contents."""
    try:
        manifest = read_manifest(spec)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"{key}={spec}: {err}") from None
    path = Path(spec)
    return str(path / "manifest.json" if path.is_dir() else path), manifest


class _IndexStream:
    """The loop's stream tracker over an IndexShards reader (its bad samples: none, as a
    damaged index shard stops the run)."""

    bad_samples = 0

    def __init__(self, data: IndexShards) -> None:
        self.data = data

    def update(self, batch: TokenBatch) -> None:
        self.data.update(batch)

    def state_dict(self) -> dict[str, Any]:
        return self.data.state_dict()


class PriorTask(TrainingTask):
    def __init__(self, cfg: Config, accelerator: Accelerator) -> None:
        self.cfg, self.accelerator = cfg, accelerator
        # The loop checked data.train_index (resolve_indexes) before building the task.
        self.manifest = read_manifest(cfg.data.train_index)
        self.grids = index_grids(self.manifest)
        model = build_grid_priors(cfg.prior, self.grids)
        optimizer, scheduler = build_optimizer(model, cfg.train)
        self.prior = Part(PRIOR, model, optimizer, scheduler)
        self.guard = NonFiniteGuard(accelerator, deepspeed_requested())
        self._unigram: dict[str, torch.Tensor] | None = None
        if cfg.prior.num_classes:
            self._check_first_label()
        if accelerator.is_main_process:
            self._write_prior_json()

    def _check_first_label(self) -> None:
        """A class-conditional prior on an index without labels stops here, not at step 1."""
        data = IndexShards(self.cfg.data.train_index, rank=0, world_size=1)
        data.set_epoch(0)
        first = next(iter(data), None)
        if first is None:
            return
        try:
            class_labels(collate_tokens([first]), self.cfg.prior.num_classes,
                         str(self.cfg.data.train_index))  # fmt: skip
        except LabelError as err:
            raise ConfigError(str(err)) from None

    def _write_prior_json(self) -> None:
        """What sampling needs without the index: the grids and the tokenizer they need."""
        run_dir = Path(self.cfg.run.dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "tokenizer_sha256": self.manifest.tokenizer_sha256,
            "grids": [
                {"name": g.name, "codebook_size": g.codebook_size, "shape": list(g.shape)}
                for g in self.grids
            ],
            "train_index": str(self.cfg.data.train_index),
        }
        write_text(run_dir / PRIOR_JSON, json.dumps(record, indent=2) + "\n")

    def description(self) -> str:
        grids = ", ".join(
            f"{g.name} {g.shape[0]}x{g.shape[1]} K={g.codebook_size}" for g in self.grids
        )
        return f"prior {self.cfg.prior.arch} over {grids}"

    def parts(self) -> list[Part]:
        return [self.prior]

    @property
    def release_part(self) -> str:
        return PRIOR

    @property
    def model(self) -> GridPriors:
        return self.prior.core

    def batches(
        self, shards: list[str], rank: int, world_size: int, state: dict | None
    ) -> tuple[Iterator[TokenBatch], _IndexStream]:
        data = IndexShards(
            shards[0],
            shuffle=True,
            seed=self.cfg.run.seed,
            shuffle_buffer=self.cfg.data.shuffle_buffer,
            rank=rank,
            world_size=world_size,
        )
        if state is not None:
            data.load_state_dict(state)
        else:
            data.set_epoch(0)
        return self._endless(data, resumed=state is not None), _IndexStream(data)

    def _endless(self, data: IndexShards, resumed: bool) -> Iterator[TokenBatch]:
        workers = self.cfg.data.num_workers
        while True:
            loader = DataLoader(
                data,
                batch_size=self.cfg.train.batch_size,
                num_workers=workers,
                collate_fn=collate_tokens,
                prefetch_factor=self.cfg.data.prefetch_factor if workers else None,
                drop_last=True,
            )
            # Worker seeding draws from torch's RNG: kept out of the training stream.
            with torch.random.fork_rng(devices=[]):
                batches = iter(loader)
            empty = True
            for batch in batches:
                empty = False
                yield batch
            # The rest of a resumed epoch may hold less than a batch; a whole one may not.
            if empty and not resumed:
                raise ValueError(
                    f"{self.cfg.data.train_index}: an epoch gives this rank no batch of "
                    f"{self.cfg.train.batch_size} (the index has {data.num_samples} samples)"
                )
            data.set_epoch(data.epoch + 1)
            resumed = False

    def _labels(self, batch: TokenBatch, index: str) -> torch.Tensor | None:
        """(B,) class labels on the device for a class-conditional prior, else None."""
        if not self.cfg.prior.num_classes:
            return None
        return class_labels(batch, self.cfg.prior.num_classes, index).to(self.accelerator.device)

    def train_step(self, batch: TokenBatch, step: int) -> StepOutput:
        codes = {name: c.to(self.accelerator.device) for name, c in batch.grids.items()}
        out = self.prior.module(codes, self._labels(batch, str(self.cfg.data.train_index)))
        skipped = self.guard.backward(out.loss, self.prior, self.cfg.train.grad_clip)
        scalars = {"loss": out.loss.detach()}
        scalars.update(_bits(out.nats, out.codes))
        return StepOutput(
            scalars=scalars, num_samples=next(iter(codes.values())).shape[0], skipped=skipped
        )

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, shards: list[str], accelerator: Accelerator) -> dict[str, float] | None:
        if not shards:
            return None
        unigram = {n: lp.to(accelerator.device) for n, lp in self._unigram_log_probs().items()}
        # Equal shares per rank (a few samples unscored with several ranks): every rank
        # runs as many forwards, which ZeRO-3's parameter gathers need.
        data = IndexShards(
            shards[0], rank=accelerator.process_index, world_size=accelerator.num_processes
        )
        data.set_epoch(0)
        names = [g.name for g in self.grids]
        # Sums over this rank's held-out codes: prior nats, unigram nats, codes; per grid.
        sums = torch.zeros(len(names), 3, dtype=torch.float64, device=accelerator.device)
        model = self.model
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for i, batch in enumerate(
                DataLoader(data, batch_size=self.cfg.train.batch_size, collate_fn=collate_tokens)
            ):
                if self.cfg.logging.eval_batches and i >= self.cfg.logging.eval_batches:
                    break
                codes = {n: c.to(accelerator.device) for n, c in batch.grids.items()}
                out = model(codes, self._labels(batch, str(self.cfg.data.eval_index)))
                for g, name in enumerate(names):
                    count = codes[name].numel()
                    sums[g, 0] += out.nats[name].double() * count
                    sums[g, 1] -= unigram[name][codes[name]].double().sum()
                    sums[g, 2] += count
        model.train(was_training)
        sums = accelerator.reduce(sums, reduction="sum")
        if float(sums[:, 2].sum()) == 0:
            return None
        metrics = _eval_metrics(names, sums.cpu(), [g.codebook_size for g in self.grids])
        logger.info(
            "eval: %.3f bits per code (uniform %.3f, unigram %.3f) on %d held-out codes",
            metrics["bits_per_code"], metrics["uniform_bits"], metrics["unigram_bits"],
            int(sums[:, 2].sum()),
        )  # fmt: skip
        return metrics

    def _unigram_log_probs(self) -> dict[str, torch.Tensor]:
        """Grid name -> (K,) log-probabilities of the codes of the first
        prior.unigram_samples training samples, add-one smoothed (every code possible)."""
        if self._unigram is None:
            counts = {g.name: torch.ones(g.codebook_size, dtype=torch.float64) for g in self.grids}
            data = IndexShards(self.cfg.data.train_index, rank=0, world_size=1)
            data.set_epoch(0)
            seen, limit = 0, self.cfg.prior.unigram_samples
            for batch in DataLoader(data, batch_size=256, collate_fn=collate_tokens):
                take = min(len(batch.keys), limit - seen)
                for name, grid in batch.grids.items():  # (B, h, w) int64
                    hits = torch.bincount(grid[:take].flatten(), minlength=len(counts[name]))
                    counts[name] += hits.double()
                seen += take
                if seen >= limit:
                    break
            self._unigram = {n: (c / c.sum()).log() for n, c in counts.items()}
        return self._unigram

    # ------------------------------------------------------------------ previews

    def preview(self, shards: list[str]) -> Callable[[], list[torch.Tensor]] | None:
        if not self.cfg.prior.tokenizer or not self.cfg.logging.num_images:
            return None
        from tokenizer.api import Tokenizer

        tok = Tokenizer.from_pretrained(self.cfg.prior.tokenizer, device=self.accelerator.device)
        if tok.fingerprint != self.manifest.tokenizer_sha256:
            raise ConfigError(
                f"prior.tokenizer {self.cfg.prior.tokenizer} is not the tokenizer of "
                f"data.train_index ({self.manifest.tokenizer_sha256[:12]}...)"
            )
        n = self.cfg.logging.num_images

        def rows() -> list[torch.Tensor]:
            model = self.model
            was_training = model.training
            model.eval()
            generator = torch.Generator(device=self.accelerator.device).manual_seed(
                self.cfg.run.seed
            )
            classes = self.cfg.prior.num_classes
            # A class-conditional prior shows classes 0, 1, ... in turn.
            labels = torch.arange(n, device=self.accelerator.device) % classes if classes else None
            codes = model.sample(n, generator=generator, class_labels=labels)
            model.train(was_training)
            return [tok.decode_grids(codes) * 2 - 1]  # (n, 3, H, W) in [-1, 1]

        return rows


def _bits(nats: dict[str, torch.Tensor], codes: dict[str, int]) -> dict[str, torch.Tensor]:
    """bits per code over all grids (weighted by their codes), and per grid if several."""
    total = sum(codes.values())
    out = {"bits_per_code": sum(nats[n].detach() * codes[n] for n in nats) / total / LN2}
    if len(nats) > 1:
        out.update({f"bits_per_code/{n}": v.detach() / LN2 for n, v in nats.items()})
    return out


def _eval_metrics(names: list[str], sums: torch.Tensor, sizes: list[int]) -> dict[str, float]:
    """sums: (grids, 3) prior nats, unigram nats, codes -> bits per code and baselines."""
    codes = sums[:, 2]
    total = float(codes.sum())
    metrics = {
        "bits_per_code": float(sums[:, 0].sum()) / total / LN2,
        "unigram_bits": float(sums[:, 1].sum()) / total / LN2,
        "uniform_bits": sum(float(c) * math.log2(k) for c, k in zip(codes, sizes, strict=True))
        / total,
    }
    if len(names) > 1:
        for g, name in enumerate(names):
            n = float(codes[g])
            metrics[f"bits_per_code/{name}"] = float(sums[g, 0]) / n / LN2
            metrics[f"unigram_bits/{name}"] = float(sums[g, 1]) / n / LN2
            metrics[f"uniform_bits/{name}"] = math.log2(sizes[g])
    return metrics
