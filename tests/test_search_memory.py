"""A 65536 x 262144 lookup must never hold the (N, K) distance matrix (64 GiB in fp32)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tokenizer.quantize.faiss_support import faiss_available

ROOT = Path(__file__).resolve().parents[1]
N, K, D = 65536, 262144, 8

# Runs in a fresh interpreter so that the peak RSS belongs to this lookup alone.
SCRIPT = f"""
import sys
import torch
from tokenizer.cli.memory import peak_rss_bytes, reset_peak_rss, rss_bytes
from tokenizer.quantize.backends import build_search

g = torch.Generator().manual_seed(0)
x = torch.randn({N}, {D}, generator=g)  # (N, D)
e = torch.randn({K}, {D}, generator=g)  # (K, D)
search = build_search(sys.argv[1])
search(x[:64], e[:1024])  # warm-up: thread pools and lazy library state
# This process's own high-water mark (VmHWM, reset here). Not ru_maxrss: Linux carries
# the parent's over fork and exec, so a large pytest process would look like growth.
before = rss_bytes()
reset_peak_rss()
result = search(x, e)
growth = peak_rss_bytes() - before
rows = torch.arange(0, {N}, {N} // 32)  # (32,) spot checks against float64
ref = torch.cdist(x[rows].double(), e.double()).pow(2)  # (32, K)
assert torch.equal(result.indices[rows], ref.argmin(1)), "wrong nearest code"
print(growth)
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend",
    [
        "torch",
        pytest.param("faiss", marks=pytest.mark.skipif(not faiss_available(), reason="no faiss")),
    ],
)
def test_huge_lookup_never_allocates_n_by_k(backend: str) -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, backend],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    growth = int(done.stdout.strip().splitlines()[-1])
    full_matrix = N * K * 4  # 64 GiB
    # The torch search holds one 16 MiB distance tile on CPU (and its row minima); faiss's
    # blocks are smaller. 1 GiB is 1/64 of the matrix and well above either.
    assert growth < 1 << 30, f"{backend}: peak RSS grew by {growth / 2**20:.0f} MiB"
    assert growth < full_matrix // 64
