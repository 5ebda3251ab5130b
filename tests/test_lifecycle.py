"""A launched rank exits when its launcher dies, even in a session of its own (as torchrun
starts ranks); a process not started by a launcher is left alone."""

import os
import signal
import subprocess
import sys
import time

import pytest
from process_helpers import alive, kill_pids, wait_gone
from training_helpers import ENV, ROOT

from tokenizer.cli.lifecycle import exit_with_launcher

# A stand-in launcher: starts one "rank" in a new session (as torchrun does), prints its
# pid, then waits to be killed. The rank arms exit_with_launcher and sleeps.
LAUNCHER = """
import subprocess, sys, time
rank = subprocess.Popen([sys.executable, "-c", *sys.argv[1:]], start_new_session=True)
print(rank.pid, flush=True)
time.sleep(600)
"""
RANK = """
import pathlib, sys, time
from tokenizer.cli.lifecycle import exit_with_launcher
assert exit_with_launcher()
pathlib.Path(sys.argv[1]).write_text("armed")
time.sleep(600)
"""


@pytest.mark.parametrize("marker", [{"LOCAL_RANK": "0"}, {"TORCHELASTIC_RUN_ID": "x"}])
def test_a_rank_in_its_own_session_exits_when_its_launcher_is_killed(tmp_path, marker):
    env = {k: v for k, v in ENV.items() if k not in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID")}
    armed = tmp_path / "armed"
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, RANK, str(armed)], cwd=ROOT, env={**env, **marker},
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    rank = int(launcher.stdout.readline())
    try:
        deadline = time.monotonic() + 60
        while not armed.is_file():
            assert alive(rank), "the rank died before it armed"
            assert time.monotonic() < deadline, "the rank never armed"
            time.sleep(0.05)
        os.kill(launcher.pid, signal.SIGKILL)  # the launcher alone
        launcher.wait(timeout=10)
        assert not wait_gone([rank], timeout=5), "the rank outlived its launcher"
    finally:
        kill_pids([launcher.pid, rank])
        launcher.wait(timeout=10)


def test_not_armed_without_a_launcher(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert exit_with_launcher() is False


# Two gloo ranks that each ran a collective, closed the group and exit normally.
CLOSE = """
import sys
import torch, torch.distributed as dist
from tokenizer.cli.lifecycle import close_distributed
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=rank,
                        world_size=2)
x = torch.ones(1)
dist.all_reduce(x)
assert x.item() == 2
close_distributed()
assert not dist.is_initialized()
close_distributed()  # without a group: nothing to do
print("closed", flush=True)
"""


def test_close_distributed_waits_for_the_peer_and_destroys_the_group():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", CLOSE, str(rank), port],
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    for rank in ranks:
        out, err = rank.communicate(timeout=120)
        assert rank.returncode == 0, err
        assert out.strip() == "closed"
