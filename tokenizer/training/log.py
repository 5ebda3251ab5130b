"""What the training loop reports: console lines, metrics.jsonl, TensorBoard (through
Accelerate's trackers), reconstruction previews and, on request, the consumed keys."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator

from tokenizer.config import Config
from tokenizer.evaluation.image_grid import save_image_grid
from tokenizer.losses.reconstruction import LossTerms
from tokenizer.models import VQVAE
from tokenizer.quantize.codebook import perplexity, usage

logger = logging.getLogger("tokenizer.training.loop")


class MetricWindow:
    """Sums of per-micro-step quantities between two log lines, reduced across ranks on read."""

    def __init__(self, codebook_size: int, device: torch.device) -> None:
        self.codebook_size, self.device = codebook_size, device
        self.reset()

    def reset(self) -> None:
        self.counts = torch.zeros(self.codebook_size, device=self.device)  # (K,)
        # loss, reconstruction, codebook, commitment, psnr sum, images, micro-steps
        self.sums = torch.zeros(7, device=self.device)
        self.started = time.perf_counter()

    def add(self, terms: LossTerms, psnr: torch.Tensor, counts: torch.Tensor) -> None:
        values = [terms.total, terms.reconstruction, terms.codebook, terms.commitment]
        self.sums[:4] += torch.stack([v.detach().float() for v in values])
        self.sums[4] += psnr.sum()
        self.sums[5] += psnr.numel()
        self.sums[6] += 1
        self.counts += counts.detach().float()

    def read(self, accelerator: Accelerator) -> dict[str, float]:
        sums = accelerator.reduce(self.sums, reduction="sum")
        counts = accelerator.reduce(self.counts, reduction="sum")
        micro = sums[6].clamp_min(1)
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        return {
            "loss": (sums[0] / micro).item(),
            "loss/reconstruction": (sums[1] / micro).item(),
            "loss/codebook": (sums[2] / micro).item(),
            "loss/commitment": (sums[3] / micro).item(),
            "psnr": (sums[4] / sums[5].clamp_min(1)).item(),
            "codebook/usage": usage(counts).item(),
            "codebook/perplexity": perplexity(counts).item(),
            "images_per_s": sums[5].item() / elapsed,
        }


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


def console_line(step: int, max_steps: int, metrics: dict[str, float]) -> str:
    eta = metrics.get("eta_s")
    return (
        f"step {step}/{max_steps} loss {metrics['loss']:.4f} "
        f"recon {metrics['loss/reconstruction']:.4f} commit {metrics['loss/commitment']:.4f} "
        f"psnr {metrics['psnr']:.2f} usage {100 * metrics['codebook/usage']:.1f}% "
        f"ppl {metrics['codebook/perplexity']:.1f} img/s {metrics['images_per_s']:.1f} "
        f"lr {metrics['lr']:.2e} bad {int(metrics['data/bad_samples'])} "
        f"eta {'?' if eta is None else format_duration(eta)}"
    )


class TrainLog:
    def __init__(
        self,
        cfg: Config,
        accelerator: Accelerator,
        codebook_size: int,
        start_step: int = 0,
        end_step: int | None = None,
    ) -> None:
        """start_step: the step this process resumes from; end_step: where it stops
        (default train.max_steps). The ETA in each log line runs between the two."""
        self.cfg, self.accelerator = cfg, accelerator
        self.run_dir = Path(cfg.run.dir)
        self.window = MetricWindow(codebook_size, accelerator.device)
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
        self.window.reset()
        eta = self.eta.seconds_left(step)
        if eta is not None:
            metrics["eta_s"] = eta
        if self.accelerator.is_main_process:
            logger.info(console_line(step, self.cfg.train.max_steps, metrics))
            with (self.run_dir / "metrics.jsonl").open("a") as fh:
                fh.write(json.dumps({"step": step, **metrics}) + "\n")
        self.accelerator.log(metrics, step=step)
        return metrics

    @torch.no_grad()
    def preview(self, core: VQVAE, images: torch.Tensor, step: int) -> None:
        """Every rank runs the forward (ZeRO-3 gathers weights collectively); rank 0 saves."""
        was_training = core.training
        core.eval()
        recon = core(images.to(self.accelerator.device)).reconstruction
        core.train(was_training)
        if self.accelerator.is_main_process:
            save_image_grid([images, recon], self.run_dir / "images" / f"step_{step:08d}.png")

    def flush(self) -> None:
        if self.keys_file is not None:
            self.keys_file.flush()

    def close(self) -> None:
        if self.keys_file is not None:
            self.keys_file.close()
        self.accelerator.end_training()
