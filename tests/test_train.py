"""End to end: real training processes, exact resume, export, and loading in a fresh process."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokenizer.checkpoint import latest_checkpoint, load_checkpoint_weights
from tokenizer.config import load_config, to_yaml
from tokenizer.data.shard_writer import brace_pattern, write_shards

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _png(rng: np.random.Generator, size: int) -> bytes:
    # Smooth colour ramps plus a bright square: structure a tiny model can learn quickly.
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([xx, yy, (xx + yy) / 2], -1) * rng.uniform(0.3, 1.0, 3)
    top, left = rng.integers(0, size // 2, 2)
    base[top : top + size // 4, left : left + size // 4] = rng.uniform(0, 1, 3)
    buf = io.BytesIO()
    Image.fromarray((base * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    train = (
        {"__key__": f"img{i:04d}", "png": _png(rng, 32), "txt": f"image {i}"} for i in range(96)
    )
    evals = ({"__key__": f"eval{i:03d}", "png": _png(rng, 32)} for i in range(16))
    n_train = len(write_shards(train, out / "train", samples_per_shard=24))
    n_eval = len(write_shards(evals, out / "eval", samples_per_shard=16))
    return {
        "train": brace_pattern(out / "train", n_train),
        "eval": brace_pattern(out / "eval", n_eval),
    }


def _write_config(tmp_path: Path, shards: dict[str, str], run_dir: Path, *extra: str) -> Path:
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
    path = tmp_path / f"{run_dir.name}.yaml"
    path.write_text(to_yaml(cfg))
    return path


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {row["step"]: row["loss"] for row in map(json.loads, lines)}


def test_resume_reproduces_uninterrupted_run(tmp_path, shards):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    _run("launch/train.py", "--config", str(_write_config(tmp_path, shards, straight)))
    cfg_b = _write_config(tmp_path, shards, interrupted)
    _run("launch/train.py", "--config", str(cfg_b), "--stop-after", "20")
    assert latest_checkpoint(interrupted).name == "step_00000020"
    assert max(_losses(interrupted)) == 20
    _run("launch/train.py", "--config", str(cfg_b))

    a, b = _losses(straight), _losses(interrupted)
    assert sorted(a) == sorted(b) == list(range(1, 41))
    for step in range(1, 41):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), f"step {step}"
    # Training made progress, and the end states are the same weights and EMA buffers.
    assert np.mean([a[s] for s in range(36, 41)]) < 0.7 * np.mean([a[s] for s in range(1, 6)])
    wa = load_checkpoint_weights(latest_checkpoint(straight))
    wb = load_checkpoint_weights(latest_checkpoint(interrupted))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-6, atol=1e-7, msg=name)
    # keep_last=2 prunes older checkpoints; reconstructions are written as PNG.
    assert [p.name for p in (straight / "checkpoints").iterdir()] != []
    assert len(list((straight / "checkpoints").iterdir())) == 2
    assert (straight / "images" / "step_00000040.png").is_file()
    assert (straight / "config.yaml").is_file()


def test_export_then_load_in_fresh_process(tmp_path, shards):
    run_dir = tmp_path / "run"
    cfg = _write_config(tmp_path, shards, run_dir, "train.max_steps=6", "checkpoint.every=0")
    _run("launch/train.py", "--config", str(cfg))
    release = tmp_path / "release"
    _run("tools/export_tokenizer.py", "--run", str(run_dir), "--output", str(release))
    assert sorted(p.name for p in release.iterdir()) == ["config.json", "model.safetensors"]

    from tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(release)
    assert (tok.codebook_size, tok.downsample_factor) == (64, 4)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.save(images, tmp_path / "images.pt")
    codes = tok.encode(images)
    assert codes.shape == (3, 8, 8) and codes.dtype == torch.int64
    assert tok.decode(codes).shape == (3, 3, 32, 32)

    script = (
        "import sys, torch; from tokenizer import Tokenizer\n"
        "tok = Tokenizer.from_pretrained(sys.argv[1])\n"
        "codes = tok.encode(torch.load(sys.argv[2]))\n"
        "print(','.join(map(str, codes.flatten().tolist())))\n"
    )
    out = _run("-c", script, str(release), str(tmp_path / "images.pt")).stdout.strip()
    assert [int(v) for v in out.split(",")] == codes.flatten().tolist()

    # The released weights are the checkpoint's weights.
    ckpt = load_checkpoint_weights(latest_checkpoint(run_dir))
    for name, tensor in tok.model.state_dict().items():
        torch.testing.assert_close(tensor, ckpt[name], rtol=0, atol=0, msg=name)


def test_missing_shard_stops_before_training(tmp_path, shards):
    run_dir = tmp_path / "missing"
    missing = str(tmp_path / "nowhere" / "000000.tar")
    cfg = _write_config(tmp_path, shards, run_dir, f"data.train_shards=[{missing}]")
    proc = subprocess.run(
        [sys.executable, "launch/train.py", "--config", str(cfg)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert missing in proc.stderr
    assert not (run_dir / "checkpoints").exists()


def test_config_typo_is_refused_by_the_cli(tmp_path, shards):
    cfg = _write_config(tmp_path, shards, tmp_path / "typo")
    proc = subprocess.run(
        [sys.executable, "launch/train.py", "--config", str(cfg), "train.max_stepss=3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "train.max_stepss" in proc.stderr
