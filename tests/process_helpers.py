"""Killing a launched job the way a node failure does: every process at once, no cleanup."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import defaultdict
from pathlib import Path


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, read from /proc (Linux)."""
    children: dict[int, list[int]] = defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name can hold spaces and parentheses: fields follow the last ")".
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended while we looked
        children[int(fields[1])].append(int(stat.parent.name))
    return children


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has stopped running


def kill_tree(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGKILL a launcher and all its descendants, and wait until none runs.

    Killing the launcher's process group is not enough: torchrun (behind `accelerate
    launch`) starts every rank in a session of its own, and orphaned ranks train on.
    """
    tree, todo = [], [proc.pid]
    children = _children()
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in tree):
        assert time.monotonic() < deadline, "killed processes still running"
        time.sleep(0.05)
