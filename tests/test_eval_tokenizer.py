"""tools/eval_tokenizer.py as a user runs it: globs, progress on stderr, clear errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tokenize_helpers import save_tiny_release, write_sources

pytestmark = pytest.mark.slow  # each test starts the tool in a fresh process

ROOT = Path(__file__).resolve().parents[1]


def eval_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "tools/eval_tokenizer.py", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_progress_counts_images_against_the_tar_headers(tmp_path):
    release = save_tiny_release(tmp_path / "release")
    sources = write_sources(tmp_path / "eval", num_shards=2, per_shard=6)
    # 12 samples: one without an image (not counted), one whose png cannot be decoded.
    done = eval_tool("--tokenizer", str(release), "--shards", f"{tmp_path}/eval/*.tar",
                     "--batch-size", "4")  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["num_images"] == len(sources.good_keys) == 10
    bar = done.stderr.replace("\r", "\n").strip().splitlines()
    final = [line for line in bar if line.startswith("eval:")][-1]
    assert "10/10" in final and "img/s" in final and "1 unreadable" in final, final


def test_no_progress_writes_no_bar(tmp_path):
    release = save_tiny_release(tmp_path / "release")
    sources = write_sources(tmp_path / "eval", num_shards=1, per_shard=4)
    done = eval_tool("--tokenizer", str(release), "--shards", sources.pattern, "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "eval:" not in done.stderr and "img/s" not in done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["num_images"] == 4


def test_shards_matching_nothing_are_refused_naming_the_option(tmp_path):
    done = eval_tool("--tokenizer", str(tmp_path), "--shards", f"{tmp_path}/none/*.tar")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"error: --shards: '{tmp_path}/none/*.tar' matches no file (no folder {tmp_path}/none)"
    )


def test_missing_weights_are_refused_naming_the_option(tmp_path):
    release = save_tiny_release(tmp_path / "release")
    sources = write_sources(tmp_path / "eval", num_shards=1, per_shard=2)
    done = eval_tool("--tokenizer", str(release), "--input", sources.pattern,
                     "--inception", str(tmp_path / "inception-2015-12-05.pt"))  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"error: --inception: {tmp_path}/inception-2015-12-05.pt: no such file"
    )
    torch_file = tmp_path / "not_vgg.pth"
    torch_file.write_bytes(b"not a state dict")
    done = eval_tool("--tokenizer", str(release), "--input", sources.pattern,
                     "--lpips-backbone", str(torch_file))  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: --lpips-backbone: {torch_file}: not a readable")
    assert "vgg16-397923af.pth" in done.stderr
