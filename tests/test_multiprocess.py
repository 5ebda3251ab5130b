"""Real multi-process training on CPU over gloo: DDP, DeepSpeed ZeRO-1/2/3, two 'nodes' on
loopback, a kill -9 mid-epoch, and ranks that die with their launcher. Every launch has a timeout, so a hang fails the test."""

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from process_helpers import descendants, kill_pids, kill_tree, wait_gone
from safetensors.torch import load_file
from training_helpers import (
    ENV,
    ROOT,
    accelerate,
    launch_args,
    losses,
    make_shards,
    run,
    write_config,
)

from tokenizer import Tokenizer, build_model, load_config
from tokenizer.training.checkpoint import latest_checkpoint

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
# Every stage runs in bf16, where the module's own weights are 16-bit copies.
@pytest.mark.parametrize(
    ("stage", "codebook"), [("zero1", "ema"), ("zero2", "ema"), ("zero3", "trained")]
)
def test_deepspeed_trains_checkpoints_resumes_exports(tmp_path, shards, stage, codebook):
    run_dir = tmp_path / stage
    ema = f"quantizer.ema={codebook == 'ema'}".lower()
    cfg = write_config(
        tmp_path, shards, run_dir, "train.max_steps=6", "checkpoint.every=3", *SYNC, ema
    )
    bf16 = ("--mixed_precision", "bf16")
    accelerate(f"{stage}.yaml", "launch/train.py", "--config", str(cfg), "--stop-after", "3",
               extra_launch=bf16)  # fmt: skip
    assert latest_checkpoint(run_dir).name == "step_00000003"
    dump = tmp_path / "dump"
    accelerate(f"{stage}.yaml", DUMP, "--dump", str(dump), "--config", str(cfg),
               extra_launch=bf16)  # fmt: skip
    assert sorted(losses(run_dir)) == list(range(1, 7))
    dumped = _assert_identical_ranks(dump)
    assert int(dumped["restart_count"]) > 0 and bool(dumped["initialized"])
    release = tmp_path / "release"
    run("tools/export_tokenizer.py", "--run", str(run_dir), "--output", str(release))
    tok = Tokenizer.from_pretrained(release)
    codes = tok.encode(torch.rand(2, 3, 32, 32))
    assert codes.shape == (2, 8, 8) and int(codes.max()) < 64

    # Every tensor of the release: parameters are DeepSpeed's fp32 master weights, read
    # here independently from the checkpoint's optimizer shards; buffers are the ranks'.
    checkpoint = latest_checkpoint(run_dir)
    masters = _fp32_masters(checkpoint)
    released = load_file(str(release / "model.safetensors"))
    model = build_model(load_config(cfg))
    params = {name for name, _ in model.named_parameters()}
    buffers = {name for name, _ in model.named_buffers()}
    assert set(released) == params | buffers == set(masters)
    for name in sorted(params):
        assert released[name].dtype == torch.float32, name
        assert torch.equal(released[name], masters[name].float()), f"{name}: not the fp32 master"
    for name in sorted(buffers):
        local = dumped[name.removeprefix("quantizer.")]
        assert released[name].dtype == local.dtype, name
        assert torch.equal(released[name], local), f"{name}: not the ranks' buffer"
    # The masters are not 16-bit values in disguise: bf16 weights would have lost bits.
    assert any(not torch.equal(masters[n], masters[n].bfloat16().float()) for n in params)


def _fp32_masters(checkpoint: Path) -> dict[str, torch.Tensor]:
    """DeepSpeed's own reading of a checkpoint's fp32 master weights (zero_to_fp32)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="pytorch_model")
    return {name: tensor.detach().cpu() for name, tensor in state.items()}


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
    cmd = [sys.executable, *launch_args("ddp.yaml"), "launch/train.py", "--config", str(cfg)]
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
            assert list((killed / "checkpoints").glob(f"*/search_tokens_rank{rank}.safetensors"))
        # The re-clustering schedule went on from the checkpoint, not from the restart.
        key = "search/rebuilds"
        assert losses(killed, key) == losses(straight, key)


def _checkpoint_files(run_dir: Path) -> list[tuple[str, int]]:
    root = run_dir / "checkpoints"
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*"))


def test_ranks_exit_when_only_their_launcher_is_killed(tmp_path, shards):
    run_dir = tmp_path / "orphans"
    cfg = write_config(tmp_path, shards, run_dir, "train.max_steps=100000", "checkpoint.every=2",
                       "logging.image_every=0")  # fmt: skip
    cmd = [sys.executable, *launch_args("ddp.yaml"), "launch/train.py", "--config", str(cfg)]
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    everything: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while latest_checkpoint(run_dir) is None:
            assert launcher.poll() is None, "the run ended before its launcher could be killed"
            assert time.monotonic() < deadline, "no checkpoint within the time limit"
            time.sleep(0.05)
        everything = descendants(launcher.pid)  # both ranks and their loader workers
        assert sum("launch/train.py" in _cmdline(pid) for pid in everything) >= 2
        os.kill(launcher.pid, signal.SIGKILL)  # the launcher alone, not its group or session
        launcher.wait(timeout=30)
        still = wait_gone(everything, timeout=15)
        assert not still, f"processes outlived their launcher: {[_cmdline(p) for p in still]}"
        # Nothing writes into the run directory any more.
        before = _checkpoint_files(run_dir)
        time.sleep(3)
        assert _checkpoint_files(run_dir) == before
    finally:
        kill_pids([launcher.pid, *everything])  # whatever a failed check left running
        launcher.wait(timeout=30)


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


# The tokenizer against a discriminator on 2 ranks: the tokenizer is the engine (DDP, or
# DeepSpeed ZeRO-2/3 in bf16), the discriminator a local part averaged by the task. A stop
# and resume gives the uninterrupted run's losses, both parts', on every stage.
GAN = (
    "loss.adversarial.weight=0.5",
    "loss.adversarial.start_step=2",
    "loss.adversarial.disc_ndf=8",
    "loss.adversarial.disc_layers=2",
    "loss.adversarial.lecam_weight=0.1",
    "loss.adversarial.lr=1e-3",
    "train.max_steps=6",
    "checkpoint.every=2",
    "logging.num_images=0",
)


# A small VQGAN with taming's adaptive weight, read through a tap on the decoder's last
# conv under ZeRO-3 (its weight is partitioned there) and from the weight under DDP.
ADAPTIVE_VQGAN = (
    "model.arch=vqgan", "model.ch=8", "model.ch_mult=[1,2,2]", "model.attn_resolutions=[8]",
    "model.z_channels=8", "model.num_res_blocks=1", "loss.adversarial.adaptive=true",
)  # fmt: skip


ADAPTIVE_VQVAE2 = ("model.arch=vqvae2", "loss.adversarial.adaptive=true")
# VQGAN blocks in the hierarchy: the decoder ends in a Conv2d, which the ZeRO-3 tap reads.
ADAPTIVE_VQVAE2_VQGAN = (
    *ADAPTIVE_VQVAE2, "model.blocks=vqgan", "model.ch=8", "model.ch_mult=[1,2,2]",
    "model.attn_resolutions=[4]", "model.z_channels=8", "model.num_res_blocks=1",
)  # fmt: skip


@pytest.mark.parametrize(
    ("stage", "model"),
    [
        ("ddp", ()),
        ("zero2", ()),
        ("zero3", ()),
        ("ddp", ADAPTIVE_VQGAN),
        ("zero3", ADAPTIVE_VQGAN),
        ("ddp", ADAPTIVE_VQVAE2),
        ("zero2", ("model.arch=vqvae2",)),
        ("zero3", ADAPTIVE_VQVAE2_VQGAN),
    ],
    ids=[
        "ddp",
        "zero2",
        "zero3",
        "ddp-vqgan-adaptive",
        "zero3-vqgan-adaptive",
        "ddp-vqvae2-adaptive",
        "zero2-vqvae2",
        "zero3-vqvae2-vqgan-blocks-adaptive",
    ],
)
def test_tokenizer_and_discriminator_resume_exactly_on_two_ranks(tmp_path, shards, stage, model):
    extra = () if stage == "ddp" else ("--mixed_precision", "bf16")
    launcher = f"{stage}.yaml"
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cfg_a = write_config(tmp_path, shards, straight, *GAN, *model)
    accelerate(launcher, "launch/train.py", "--config", str(cfg_a), extra_launch=extra)
    cfg_b = write_config(tmp_path, shards, resumed, *GAN, *model)
    accelerate(launcher, "launch/train.py", "--config", str(cfg_b), "--stop-after", "4",
               extra_launch=extra)  # fmt: skip
    accelerate(launcher, "launch/train.py", "--config", str(cfg_b), extra_launch=extra)
    for key in ("loss", "loss/generator", "loss/adaptive_weight", "disc/loss", "disc/logits_real"):
        a, b = losses(straight, key), losses(resumed, key)
        assert sorted(a) == sorted(b), key
        for step in a:
            assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (key, step)
    assert sorted(losses(straight, "disc/loss")) == [3, 4, 5, 6]  # idle before start_step
