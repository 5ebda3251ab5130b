"""tools/tokenize_dataset.py in real processes: 2 ranks, a SIGKILL mid-run and a rerun,
and the CLI's --verify. Every launch has a timeout, so a hang fails the test."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from process_helpers import kill_tree
from tokenize_helpers import (
    Sources,
    expected_codes,
    image_bytes,
    plain_tar_samples,
    save_tiny_release,
    tree_bytes,
    write_sources,
)

from tokenizer import Tokenizer
from tokenizer.data.index.format import read_manifest
from tokenizer.data.index.verify import verify_index
from tokenizer.data.tars import IMAGE_EXTENSIONS
from tokenizer.data.writer import write_shards

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
RES = 16
NUM_SHARDS, PER_SHARD = 6, 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(release: Path, pattern: str, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
        "tools/tokenize_dataset.py", "--tokenizer", str(release), "--input", pattern,
        "--output", str(out), "--batch-size", "8", "--num-workers", "1", "--no-progress",
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _run(command: list[str], timeout: int = 120, rc: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == rc, (
        f"rc {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    return proc


def _big_sources(directory: Path) -> Sources:
    """write_sources' bad samples and odd captions, with 1024x768 images (about 10 ms to
    decode each) so a run lasts long enough to be killed in the middle."""
    small = write_sources(directory / "small", num_shards=2, per_shard=5)
    rng = np.random.default_rng(1)
    pool = [image_bytes(rng, 1024, 768) for _ in range(6)]  # distinct images, reused bytes
    samples: dict[str, dict[str, bytes]] = {}
    order = []
    for shard in range(NUM_SHARDS):
        for j in range(PER_SHARD):
            key = f"big{shard}_{j:03d}"
            fields = {"png": pool[(shard + j) % len(pool)], "txt": f"big {key}".encode()}
            if j < 5 and shard < 2:  # carry over the odd samples of the small set
                old = f"img{shard}_{j:03d}"
                fields = small.samples[old]
                if old in small.bad:
                    key = old
            samples[key] = fields
            order.append({"__key__": key, **fields})
    infos = write_shards(order, directory / "big", samples_per_shard=PER_SHARD)
    bad = {k: v for k, v in small.bad.items() if k in samples}
    return Sources([i.path for i in infos], samples, bad)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tokenize")
    release = save_tiny_release(root / "release")
    sources = _big_sources(root / "src")
    clean = root / "clean"
    proc = _run(_command(release, sources.pattern, clean))
    return {"root": root, "release": release, "sources": sources, "clean": clean, "proc": proc}


def _tool_main():
    spec = importlib.util.spec_from_file_location("tok_ds", ROOT / "tools" / "tokenize_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_two_ranks_write_every_key_once_with_captions_and_the_api_codes(setup, capsys):
    sources: Sources = setup["sources"]
    clean: Path = setup["clean"]
    assert "samples: 358 in the index, 2 failed" in setup["proc"].stdout
    manifest = read_manifest(clean)
    assert manifest.num_samples == len(sources.good_keys) == NUM_SHARDS * PER_SHARD - 2
    assert {f.key: f.reason.split(":")[0] for _, f in manifest.failed} == {
        "img1_002": "cannot decode png",
        "img1_003": f"no image field (one of {', '.join(IMAGE_EXTENSIONS)})",
    }

    found: dict[str, dict[str, bytes]] = {}
    for shard in manifest.shards:
        for key, fields in plain_tar_samples(clean / shard.path).items():
            assert key not in found, f"{key} twice"
            found[key] = fields
    assert sorted(found) == sorted(sources.good_keys)
    for key, fields in found.items():
        source = sources.samples[key]
        assert {e: fields[e] for e in fields if e != "tokens.npy"} == {
            e: source[e] for e in ("txt", "json", "cls") if e in source
        }

    tok = Tokenizer.from_pretrained(setup["release"])
    for shard_keys in (list(found)[:PER_SHARD], list(found)[-20:]):
        codes = np.stack([np.load(io.BytesIO(found[k]["tokens.npy"])) for k in shard_keys])
        want = expected_codes(tok, [sources.samples[k] for k in shard_keys], RES)
        np.testing.assert_array_equal(codes, want)

    assert _tool_main()(["--verify", str(clean)]) == 0
    assert "OK: 358 samples in 6 shards, 2 failed" in capsys.readouterr().out


def test_sigkill_mid_run_then_rerun_equals_a_clean_run(setup, capsys):
    out = setup["root"] / "killed"
    command = _command(setup["release"], setup["sources"].pattern, out)
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    try:
        while not list((out / "records").glob("*.json")):
            assert proc.poll() is None, "the run ended before any shard completed"
            assert time.monotonic() < deadline, "no shard completed in 120 s"
            time.sleep(0.02)
    finally:
        kill_tree(proc)  # the launcher, both ranks and their loader workers at once
    done = len(list((out / "records").glob("*.json")))
    assert 0 < done < NUM_SHARDS, f"killed with {done} of {NUM_SHARDS} shards done"
    assert not (out / "manifest.json").exists()
    assert _tool_main()(["--verify", str(out)]) == 1  # incomplete output is reported
    capsys.readouterr()

    _run(command)
    assert tree_bytes(out) == tree_bytes(setup["clean"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == NUM_SHARDS * PER_SHARD - 2


def test_two_ranks_stop_together_on_keys_in_two_shards(setup, tmp_path):
    # Shards 000000.tar of two sets hold the same keys; each rank encodes one of them.
    first = write_sources(tmp_path / "a", num_shards=2, per_shard=6)
    dup = write_sources(tmp_path / "d", num_shards=1, per_shard=6, prefix="d", seed=3)
    out = tmp_path / "out"
    command = _command(setup["release"], first.pattern, out)
    command[command.index(first.pattern) + 1 : command.index(first.pattern) + 1] = dup.paths
    proc = _run(command, rc=1)  # the launcher's status when its ranks fail
    a, d = first.paths[0], dup.paths[0]
    assert f"error: 6 keys appear in more than one shard: 'img0_000' in {a} and {d}" in (
        proc.stderr
    )
    assert "rank 0 found keys in more than one shard" in proc.stderr  # rank 1 stopped too
    assert not (out / "manifest.json").exists() and not verify_index(out).ok
