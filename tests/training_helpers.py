"""Shared by the tests that launch real training processes: tiny shards, tiny configs,
and subprocess launches that fail loudly (with their output) and never hang."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from tokenizer.config import load_config, to_yaml
from tokenizer.data.writer import brace_pattern, write_shards

ROOT = Path(__file__).resolve().parents[1]
# Two CPU ranks on two cores: one thread each. DeepSpeed's JIT-built shared-memory
# all-reduce op is cached beside the venv so only the first run on a machine builds it.
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "PYTHONHASHSEED": "0",
    "TORCH_EXTENSIONS_DIR": str(Path(sys.prefix) / "torch_extensions"),
}


def png(rng: np.random.Generator, size: int) -> bytes:
    # Smooth colour ramps plus a bright square: structure a tiny model learns quickly.
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([xx, yy, (xx + yy) / 2], -1) * rng.uniform(0.3, 1.0, 3)
    top, left = rng.integers(0, size // 2, 2)
    base[top : top + size // 4, left : left + size // 4] = rng.uniform(0, 1, 3)
    buf = io.BytesIO()
    Image.fromarray((base * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def make_shards(out: Path, n_train: int = 96, per_shard: int = 24) -> dict[str, str]:
    """Train and eval shards of 32x32 images; returns their brace patterns."""
    rng = np.random.default_rng(0)
    train = (
        {"__key__": f"img{i:04d}", "png": png(rng, 32), "txt": f"image {i}"} for i in range(n_train)
    )
    evals = ({"__key__": f"eval{i:03d}", "png": png(rng, 32)} for i in range(16))
    n_t = len(write_shards(train, out / "train", samples_per_shard=per_shard))
    n_e = len(write_shards(evals, out / "eval", samples_per_shard=16))
    return {"train": brace_pattern(out / "train", n_t), "eval": brace_pattern(out / "eval", n_e)}


def write_config(directory: Path, shards: dict[str, str], run_dir: Path, *extra: str) -> Path:
    """A tiny EMA VQ-VAE on 32x32 images (f=4, K=64), logging every step."""
    cfg = load_config(
        overrides=[
            f"run.dir={run_dir}",
            "run.seed=1",
            "model.channels=[16,32]",
            "model.res_channels=16",
            "quantizer.codebook_size=64",
            "quantizer.code_dim=8",
            "quantizer.ema=true",
            f"data.train_shards={shards['train']}",
            f"data.eval_shards={shards['eval']}",
            "data.resolution=32",
            "data.num_workers=2",
            "data.shuffle_buffer=16",
            "train.max_steps=40",
            "train.batch_size=8",
            "train.warmup_steps=5",
            "train.lr=2e-3",
            "logging.every=1",
            "logging.image_every=20",
            "logging.num_images=4",
            "logging.tensorboard=false",
            "checkpoint.every=10",
            "checkpoint.keep_last=2",
            "resume=auto",
            *extra,
        ]
    )
    path = directory / f"{run_dir.name}.yaml"
    path.write_text(to_yaml(cfg))
    return path


def run(*args: str, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run `python args...` from the repository root."""
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout
    )
    if check:
        assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def free_port() -> int:
    """A port no process listens on now: each launch gets its own rendezvous port, so a
    killed job's lingering socket or a launch running beside it is never joined."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_args(config_file: str) -> list[str]:
    """`-m accelerate.commands.launch --config_file ... --main_process_port P`."""
    return ["-m", "accelerate.commands.launch", "--config_file",
            f"launch/accelerate/{config_file}", "--main_process_port", str(free_port())]  # fmt: skip


def accelerate(config_file: str, *args: str, timeout: int = 300, extra_launch: tuple = ()) -> None:
    """`accelerate launch --config_file launch/accelerate/<config_file> args...`."""
    launch = launch_args(config_file)
    run(*launch, *extra_launch, *args, timeout=timeout)


def metric_rows(run_dir: Path) -> dict[int, dict]:
    """step -> every metric metrics.jsonl gives for it (its lines merged, later ones
    winning: a step's training line, then its eval line)."""
    rows: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["step"], {}).update(row)
    return rows


def losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    """step -> a logged metric (the loss by default), for the steps that logged it."""
    return {step: row[key] for step, row in metric_rows(run_dir).items() if key in row}
