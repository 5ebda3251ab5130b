"""Real multi-process training on CPU over gloo: DDP, DeepSpeed ZeRO-2/3, two 'nodes' on
loopback, and a kill -9 mid-epoch. Every launch has a timeout, so a hang fails the test."""

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from process_helpers import kill_tree
from safetensors.torch import load_file
from training_helpers import ENV, ROOT, accelerate, losses, make_shards, run, write_config

from tokenizer import Tokenizer
from tokenizer.checkpoint import latest_checkpoint

pytestmark = pytest.mark.slow
DUMP = "tests/scripts/train_and_dump.py"
# Codebook health machinery that must stay identical on every rank: EMA statistics,
# data-dependent init, restarts (codes idle for 3 steps are restarted, so they fire),
# and the low-dimensional, l2-normalised lookup with its projections.
SYNC = (
    "quantizer.init=data",
    "quantizer.restart_threshold=0.125",  # 2 hits per step of the 16 a code gets on average
    "quantizer.restart_unused_steps=3",
    "quantizer.lookup_dim=4",
    "quantizer.l2_normalize=true",
    "distributed.check_every=1",
)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, str]:
    return make_shards(tmp_path_factory.mktemp("shards"))


def _assert_identical_ranks(dump: Path, world: int = 2) -> dict[str, torch.Tensor]:
    states = [load_file(str(dump / f"quantizer_rank{r}.safetensors")) for r in range(world)]
    for name in states[0]:
        for other in states[1:]:
            assert torch.equal(states[0][name], other[name]), f"{name} differs between ranks"
    return states[0]


def test_ddp_codebook_bit_identical_on_both_ranks(tmp_path, shards):
    cfg = write_config(
        tmp_path, shards, tmp_path / "ddp", "train.max_steps=12", *SYNC, "quantizer.init=kmeans"
    )
    accelerate("ddp.yaml", DUMP, "--dump", str(tmp_path / "dump"), "--config", str(cfg))
    state = _assert_identical_ranks(tmp_path / "dump")
    assert bool(state["initialized"])
    # Restarts fired (codes were re-seeded), and the EMA statistics moved.
    assert not torch.equal(state["cluster_size"], torch.ones_like(state["cluster_size"]))
    assert int(state["restart_count"]) > 0


# ZeRO-3 trains the codebook by gradient: its data init and restarts live in a buffer
# (embed_offset), as DeepSpeed's partitioned master weights overwrite the parameter.
@pytest.mark.parametrize(("stage", "codebook"), [("zero2", "ema"), ("zero3", "trained")])
def test_deepspeed_trains_checkpoints_resumes_exports(tmp_path, shards, stage, codebook):
    run_dir = tmp_path / stage
    ema = f"quantizer.ema={codebook == 'ema'}".lower()
    cfg = write_config(
        tmp_path, shards, run_dir, "train.max_steps=6", "checkpoint.every=3", *SYNC, ema
    )
    accelerate(f"{stage}.yaml", "launch/train.py", "--config", str(cfg), "--stop-after", "3")
    assert latest_checkpoint(run_dir).name == "step_00000003"
    dump = tmp_path / "dump"
    accelerate(f"{stage}.yaml", DUMP, "--dump", str(dump), "--config", str(cfg))
    assert sorted(losses(run_dir)) == list(range(1, 7))
    _assert_identical_ranks(dump)
    release = tmp_path / "release"
    run("tools/export_tokenizer.py", "--run", str(run_dir), "--output", str(release))
    tok = Tokenizer.from_pretrained(release)
    codes = tok.encode(torch.rand(2, 3, 32, 32))
    assert codes.shape == (2, 8, 8) and int(codes.max()) < 64
    # The released codebook is the trained one (fp32), not the initial one. (A trained
    # codebook's parameter is partitioned under ZeRO-3: its dump holds the buffers.)
    released = tok.model.quantizer.state_dict()
    dumped = load_file(str(dump / "quantizer_rank0.safetensors"))
    name = "embed" if codebook == "ema" else "embed_offset"
    torch.testing.assert_close(released[name], dumped[name].to(released[name].dtype))
    assert int(dumped["restart_count"]) > 0 and bool(dumped["initialized"])


def test_two_nodes_on_loopback_end_identical(tmp_path, shards):
    cfg = write_config(tmp_path, shards, tmp_path / "nodes", "train.max_steps=8", *SYNC)
    port = str(29500 + os.getpid() % 1000)
    procs = []
    for machine_rank in (0, 1):
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", "launch/accelerate/multinode.yaml",
            "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(machine_rank),
            "--main_process_ip", "127.0.0.1", "--main_process_port", port,
            "--mixed_precision", "no",
            DUMP, "--dump", str(tmp_path / "dump"), "--config", str(cfg),
        ]  # fmt: skip
        procs.append(
            subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        )  # fmt: skip
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=300)[0])
        finally:
            proc.kill()
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output[-6000:]
    _assert_identical_ranks(tmp_path / "dump")


def _consumed(run_dir: Path, rank: int) -> list[tuple[int, str]]:
    """(step, key) in consumption order; a resumed run replaces what followed its checkpoint."""
    seq: list[tuple[int, str]] = []
    for line in (run_dir / "keys" / f"rank{rank}.tsv").read_text().splitlines():
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0].isdigit():
            continue  # a line cut by the kill
        step = int(parts[0])
        if seq and step < seq[-1][0]:
            seq = [entry for entry in seq if entry[0] < step]
        seq.append((step, parts[1]))
    return seq


def test_kill_9_mid_epoch_then_resume_consumes_the_same_keys(tmp_path, shards):
    # 96 training images, 2 ranks x 2 workers x batch 4: an epoch is about 12 steps per
    # rank, so 30 steps cross epoch boundaries and the kill lands mid-epoch.
    extra = ("train.max_steps=30", "train.batch_size=4", "checkpoint.every=4",
             "logging.log_keys=true", "logging.image_every=0")  # fmt: skip
    if importlib.util.find_spec("faiss") is not None:
        # Each rank's IVF cells come back from its checkpoint file, mid-way between the
        # re-clusterings (every 5 steps), next to restarts of a gradient-trained codebook.
        extra += ("quantizer.ema=false", "quantizer.init=kmeans",
                  "quantizer.restart_unused_steps=4", "quantizer.search=faiss-ivf",
                  "quantizer.ivf_nlist=8", "quantizer.ivf_nprobe=1",
                  "quantizer.ivf_rebuild_every=5")  # fmt: skip
    straight = tmp_path / "straight"
    accelerate("ddp.yaml", "launch/train.py", "--config",
               str(write_config(tmp_path, shards, straight, *extra)))  # fmt: skip

    killed = tmp_path / "killed"
    cfg = write_config(tmp_path, shards, killed, *extra)
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", "launch/accelerate/ddp.yaml", "launch/train.py", "--config", str(cfg)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            ckpt = latest_checkpoint(killed)
            if ckpt is not None and ckpt.name >= "step_00000014":
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint past step 14 within the time limit")
    finally:
        kill_tree(proc)  # the launcher and both ranks at once, no cleanup
    assert latest_checkpoint(killed).name < "step_00000030"

    accelerate("ddp.yaml", "launch/train.py", "--config", str(cfg))
    for rank in (0, 1):
        a, b = _consumed(straight, rank), _consumed(killed, rank)
        assert len(a) == 30 * 4 and [s for s, _ in a] == [s for s, _ in b]
        assert [k for _, k in a] == [k for _, k in b], f"rank {rank} consumed other keys"
        # More samples than one epoch of this rank's share: an epoch boundary was crossed.
        assert len(a) > 96 // 2
    # Same losses after the resume, and both ranks ran the same number of steps.
    la, lb = losses(straight), losses(killed)
    assert sorted(la) == sorted(lb) == list(range(1, 31))
    for step in range(1, 31):
        assert lb[step] == pytest.approx(la[step], rel=1e-5, abs=1e-6), f"step {step}"
    if "quantizer.search=faiss-ivf" in extra:
        for rank in (0, 1):
            assert list((killed / "checkpoints").glob(f"*/search_rank{rank}.safetensors"))
        # The re-clustering schedule went on from the checkpoint, not from the restart.
        key = "search/rebuilds"
        assert losses(killed, key) == losses(straight, key)
