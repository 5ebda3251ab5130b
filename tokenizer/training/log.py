"""What the training loop reports: console lines, metrics.jsonl, TensorBoard (through
Accelerate's trackers), reconstruction previews and, on request, the consumed keys."""

from __future__ import annotations

import json
import logging
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from tokenizer.config import Config
from tokenizer.evaluation.image_grid import image_grid
from tokenizer.models.base import SINGLE_GRID
from tokenizer.quantize.codebook import perplexity, usage
from tokenizer.training.collapse import CollapseWatch
from tokenizer.training.task import StepOutput

logger = logging.getLogger("tokenizer.training.loop")


def grid_key(grid: str, name: str) -> str:
    """The metric name of a code grid's statistic: `codebook/usage` for a single-grid model
    (its grid is SINGLE_GRID), `codebook/top/usage` for a grid of a hierarchy."""
    return f"codebook/{name}" if grid == SINGLE_GRID else f"codebook/{grid}/{name}"


class MetricWindow:
    """Sums of what the micro-steps report (StepOutput), by name, between two log lines;
    reduced across ranks on read. Whatever a task reports is logged: no fixed slots.
    A scalar is averaged over the micro-steps that report it, a per-image value over the
    images."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.scalars: dict[str, torch.Tensor] = {}  # name -> (sum, count) over micro-steps
        self.per_image: dict[str, torch.Tensor] = {}  # name -> (sum, count) over images
        self.counts: dict[str, torch.Tensor] = {}  # grid -> (K,) code hits
        self.micro_steps = 0
        self.samples = 0
        self.started = time.perf_counter()
        self.reduced_counts: dict[str, torch.Tensor] = {}  # grid -> (K,) all ranks, last read

    def add(self, out: StepOutput) -> None:
        for name, value in out.scalars.items():
            # (sum, count): a term a task reports only on some steps (a discriminator idle
            # before its start) averages over the steps that have it.
            pair = torch.stack(
                [value.detach().float().reshape(()), value.new_ones((), dtype=torch.float32)]
            )
            self._accumulate(self.scalars, name, pair.to(self.device))
        for name, values in out.per_image.items():
            pair = torch.stack([values.detach().float().sum(), torch.tensor(float(values.numel()))])
            self._accumulate(self.per_image, name, pair.to(self.device))
        for grid, counts in out.code_counts.items():
            self._accumulate(self.counts, grid, counts.detach().float())
        self.micro_steps += 1
        self.samples += out.num_samples

    def _accumulate(self, sums: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
        value = value.to(self.device)
        sums[name] = sums[name] + value if name in sums else value.clone()

    def read(self, accelerator: Accelerator) -> dict[str, float]:
        """Every rank calls this: one all-reduce of every name's sums, in sorted order."""
        scalar_names, image_names, grids = (
            sorted(self.scalars),
            sorted(self.per_image),
            sorted(self.counts),
        )
        _check_same_names(accelerator, [*scalar_names, "|", *image_names, "|", *grids])
        flat = [self.scalars[n] for n in scalar_names]
        flat += [self.per_image[n] for n in image_names]
        flat += [self.counts[g] for g in grids]
        flat.append(
            torch.tensor([self.micro_steps, self.samples], dtype=torch.float32, device=self.device)
        )
        total = accelerator.reduce(torch.cat(flat), reduction="sum")
        samples = total[-1].item()
        values = iter(total[:-2].split([t.numel() for t in flat[:-1]]))
        metrics = {}
        for name in [*scalar_names, *image_names]:
            pair = next(values)
            metrics[name] = (pair[0] / pair[1].clamp_min(1)).item()
        self.reduced_counts = {}
        for grid in grids:
            counts = next(values)
            self.reduced_counts[grid] = counts
            metrics[grid_key(grid, "usage")] = usage(counts).item()
            metrics[grid_key(grid, "perplexity")] = perplexity(counts).item()
        metrics["images_per_s"] = samples / max(time.perf_counter() - self.started, 1e-9)
        return metrics


def _check_same_names(accelerator: Accelerator, names: list[str]) -> None:
    """The reduce adds rank-wise by position: every rank must report the same names."""
    if accelerator.num_processes == 1:
        return
    digest = zlib.crc32("\n".join(names).encode()) & 0x7FFFFFFF
    mine = torch.tensor([digest], dtype=torch.int64, device=accelerator.device)
    everyone = accelerator.gather(mine).cpu().tolist()
    if len(set(everyone)) > 1:
        raise RuntimeError(
            f"ranks logged different metric names (rank {accelerator.process_index}: "
            f"{', '.join(n for n in names if n != '|')}); every rank's step must report "
            "the same scalars, per-image values and grids"
        )


class EtaClock:
    """Time left to `end_step` at the step rate measured since this process started
    training: a resumed run does not count the steps it jumped over, and a run that
    only started has no rate yet (None)."""

    def __init__(
        self, start_step: int, end_step: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.start_step, self.end_step, self.clock = start_step, end_step, clock
        self.started = clock()

    def seconds_left(self, step: int) -> float | None:
        done = step - self.start_step
        if done <= 0:
            return None
        per_step = (self.clock() - self.started) / done
        return per_step * max(self.end_step - step, 0)


def format_duration(seconds: float) -> str:
    """'45s', '1m23s', '2h05m', '3d04h': two units at most, as a reader wants an ETA."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


# Short console labels of common metrics; any other metric shows under its own name.
_LABELS = {
    "loss/reconstruction": "recon",
    "loss/commitment": "commit",
    "loss/codebook": "codebook",
    "codebook/usage": "usage",
    "codebook/perplexity": "ppl",
    "images_per_s": "img/s",
    "data/bad_samples": "bad",
}
# The console line's order for the metrics that are there; others follow in their order.
_FIRST = ["loss", "loss/reconstruction", "loss/commitment", "psnr", "codebook/usage",
          "codebook/perplexity", "images_per_s", "lr", "data/bad_samples"]  # fmt: skip
# In metrics.jsonl and TensorBoard only: noisy on a console, or shown another way (eta).
_OFF_CONSOLE = {"eta_s", "loss/codebook", "codebook/window_usage", "codebook/restarts"}


def _format(name: str, value: float) -> str:
    last = name.rsplit("/", 1)[-1]
    if last in ("usage", "window_usage"):
        return f"{100 * value:.1f}%"
    if name == "lr" or name.startswith("lr/"):
        return f"{value:.2e}"
    if last in ("bad_samples", "restarts", "skipped_steps"):
        return str(int(value))
    if last in ("psnr", "perplexity", "images_per_s"):
        return f"{value:.2f}" if last == "psnr" else f"{value:.1f}"
    return f"{value:.4f}"


def console_line(step: int, max_steps: int, metrics: dict[str, float]) -> str:
    """`step s/N`, then every metric there is (common ones first, short labels), then
    the ETA."""
    names = [n for n in _FIRST if n in metrics]
    names += [n for n in metrics if n not in _FIRST and n not in _OFF_CONSOLE]
    shown = " ".join(f"{_LABELS.get(n, n)} {_format(n, metrics[n])}" for n in names)
    eta = metrics.get("eta_s")
    return f"step {step}/{max_steps} {shown} eta {'?' if eta is None else format_duration(eta)}"


class TrainLog:
    def __init__(
        self,
        cfg: Config,
        accelerator: Accelerator,
        start_step: int = 0,
        end_step: int | None = None,
    ) -> None:
        """start_step: the step this process resumes from; end_step: where it stops
        (default train.max_steps). The ETA in each log line runs between the two."""
        self.cfg, self.accelerator = cfg, accelerator
        self.run_dir = Path(cfg.run.dir)
        self.window = MetricWindow(accelerator.device)
        self.collapse = CollapseWatch(cfg.logging.collapse_usage, cfg.logging.every)
        self.eta = EtaClock(start_step, cfg.train.max_steps if end_step is None else end_step)
        self.keys_file = None
        if cfg.logging.log_keys:
            (self.run_dir / "keys").mkdir(parents=True, exist_ok=True)
            path = self.run_dir / "keys" / f"rank{accelerator.process_index}.tsv"
            self.keys_file = path.open("a")
        if cfg.logging.tensorboard:
            accelerator.init_trackers("tensorboard")

    def consumed(self, step: int, keys: list[str]) -> None:
        if self.keys_file is not None:
            self.keys_file.writelines(f"{step}\t{key}\n" for key in keys)

    def metrics(self, step: int, extra: dict[str, float]) -> dict[str, float]:
        """Every rank calls this (it reduces); the main process writes."""
        metrics = {**self.window.read(self.accelerator), **extra}
        warnings, recoveries = self.collapse.check(step, self.window.reduced_counts)
        self.window.reset()
        eta = self.eta.seconds_left(step)
        if eta is not None:
            metrics["eta_s"] = eta
        if self.accelerator.is_main_process:
            logger.info(console_line(step, self.cfg.train.max_steps, metrics))
            for line in warnings:
                logger.warning(line)
            for line in recoveries:
                logger.info(line)
            with (self.run_dir / "metrics.jsonl").open("a") as fh:
                fh.write(json.dumps({"step": step, **metrics}) + "\n")
        self.accelerator.log(metrics, step=step)
        return metrics

    def evaluation(self, step: int, metrics: dict[str, float] | None) -> None:
        """Held-out metrics (every rank has them): `eval/<name>` in metrics.jsonl and
        TensorBoard."""
        if not metrics:
            return
        row = {f"eval/{k}": v for k, v in metrics.items()}
        if self.accelerator.is_main_process:
            with (self.run_dir / "metrics.jsonl").open("a") as fh:
                fh.write(json.dumps({"step": step, **row}) + "\n")
        self.accelerator.log(row, step=step)

    def preview(self, rows: list[torch.Tensor], step: int) -> None:
        """Image rows (B, 3, H, W) in [-1, 1] as one grid: images/step_N.png and, with
        TensorBoard on, its `preview` image at that step. The main process writes."""
        if not self.accelerator.is_main_process:
            return
        picture = image_grid(rows)
        path = self.run_dir / "images" / f"step_{step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        picture.save(path)
        if self.cfg.logging.tensorboard:
            pixels = np.asarray(picture)[None]  # (1, H, W, 3) uint8
            tracker = self.accelerator.get_tracker("tensorboard")
            tracker.log_images({"preview": pixels}, step=step, dataformats="NHWC")

    def flush(self) -> None:
        if self.keys_file is not None:
            self.keys_file.flush()

    def close(self) -> None:
        if self.keys_file is not None:
            self.keys_file.close()
        self.accelerator.end_training()
