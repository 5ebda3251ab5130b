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


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has stopped running


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children, ...), read from /proc."""
    children = _children()
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, []))
    return found


def kill_pids(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait until none of `pids` runs; returns those still running at the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = [pid for pid in pids if alive(pid)]
        if not running:
            return []
        time.sleep(0.05)
    return [pid for pid in pids if alive(pid)]


def kill_tree(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGKILL a launcher and all its descendants, and wait until none runs.

    Killing the launcher's process group is not enough: torchrun (behind `accelerate
    launch`) starts every rank in a session of its own.
    """
    tree = [proc.pid, *descendants(proc.pid)]
    kill_pids(tree)
    proc.wait(timeout=timeout)
    assert not wait_gone(tree, timeout), "killed processes still running"
