"""End to end: real training processes, exact resume, export, and loading in a fresh process."""

import importlib.util
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from training_helpers import ROOT, losses, make_shards, run, write_config

from tokenizer.training.checkpoint import latest_checkpoint, load_checkpoint_weights

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, str]:
    return make_shards(tmp_path_factory.mktemp("shards"))


# A gradient-trained codebook with k-means init and restarts, searched by faiss-ivf with
# one probe (so its cells matter) and rebuilt every 7 steps: the checkpoint at step 20
# falls mid-way between rebuilds (14 and 21).
IVF_TRAINED = (
    "quantizer.ema=false",
    "quantizer.init=kmeans",
    "quantizer.restart_unused_steps=4",
    "quantizer.search=faiss-ivf",
    "quantizer.ivf_nlist=8",
    "quantizer.ivf_nprobe=1",
    "quantizer.ivf_rebuild_every=7",
)


@pytest.mark.parametrize("recipe", [(), IVF_TRAINED], ids=["ema", "ivf-trained"])
def test_resume_reproduces_uninterrupted_run(tmp_path, shards, recipe):
    if recipe and importlib.util.find_spec("faiss") is None:
        pytest.skip("faiss is not installed")
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run("launch/train.py", "--config", str(write_config(tmp_path, shards, straight, *recipe)))
    cfg_b = write_config(tmp_path, shards, interrupted, *recipe)
    run("launch/train.py", "--config", str(cfg_b), "--stop-after", "20")
    assert latest_checkpoint(interrupted).name == "step_00000020"
    assert max(losses(interrupted)) == 20
    search_state = latest_checkpoint(interrupted) / "search_tokens_rank0.safetensors"
    assert search_state.is_file() == bool(recipe)  # the IVF's cells; exact search has none
    run("launch/train.py", "--config", str(cfg_b))

    a, b = losses(straight), losses(interrupted)
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
    kept = sorted(p.name for p in (straight / "checkpoints").iterdir())
    assert kept == ["step_00000030", "step_00000040"]  # every=10, keep_last=2, 40 steps
    assert (straight / "images" / "step_00000040.png").is_file()
    assert (straight / "config.yaml").is_file()
    if not recipe:
        _explicit_resume_keeps_the_newer_branch(straight, shards, tmp_path)


def _explicit_resume_keeps_the_newer_branch(run_dir, shards, tmp_path) -> None:
    """Resuming from an older checkpoint starts a branch: its pruning (keep_last=2)
    leaves the other branch's newer step 40 alone, and resume=auto then continues it."""
    older = run_dir / "checkpoints" / "step_00000030"
    cfg = write_config(tmp_path, shards, run_dir, f"resume={older}", "train.max_steps=35")
    proc = run("launch/train.py", "--config", str(cfg))
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["step_00000030", "step_00000035", "step_00000040"]
    assert "step_00000040" in proc.stderr and "another branch" in proc.stderr
    assert latest_checkpoint(run_dir).name == "step_00000035"


def test_export_then_load_in_fresh_process(tmp_path, shards):
    run_dir = tmp_path / "run"
    # Evaluations at steps 3 and 6 and at the end, each of logging.eval_batches batches.
    evals = ("logging.eval_every=3", "logging.eval_batches=1")
    cfg = write_config(tmp_path, shards, run_dir, "train.max_steps=6", "checkpoint.every=0", *evals)
    proc = run("launch/train.py", "--config", str(cfg))
    # One batch of 8 of the 16 held-out images each time.
    assert re.findall(r"on (\d+) held-out images", proc.stderr) == ["8", "8", "8"]
    release = tmp_path / "release"
    run("tools/export_tokenizer.py", "--run", str(run_dir), "--output", str(release))
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
    out = run("-c", script, str(release), str(tmp_path / "images.pt")).stdout.strip()
    assert [int(v) for v in out.split(",")] == codes.flatten().tolist()

    # The released weights are the checkpoint's weights.
    ckpt = load_checkpoint_weights(latest_checkpoint(run_dir))
    for name, tensor in tok.model.state_dict().items():
        torch.testing.assert_close(tensor, ckpt[name], rtol=0, atol=0, msg=name)


def test_missing_shard_stops_before_training(tmp_path, shards):
    run_dir = tmp_path / "missing"
    missing = str(tmp_path / "nowhere" / "000000.tar")
    cfg = write_config(tmp_path, shards, run_dir, f"data.train_shards=[{missing}]")
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
    cfg = write_config(tmp_path, shards, tmp_path / "typo")
    proc = subprocess.run(
        [sys.executable, "launch/train.py", "--config", str(cfg), "train.max_stepss=3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "train.max_stepss" in proc.stderr
