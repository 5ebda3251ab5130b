"""A launched rank's life: it dies with its launcher, and a run that ends well closes
its process group and exits without the interpreter's teardown.

torchrun's elastic agent starts every rank in a session of its own, so killing the
launcher's process group (Ctrl-C in a lost shell, a scheduler killing the job's group)
leaves orphaned ranks that train on and keep writing checkpoints into the run directory.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time
from typing import NoReturn

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_LAUNCHER_ENV = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID")
_POLL_SECONDS = 0.5
_watching = False


def launched_by_launcher() -> bool:
    return any(name in os.environ for name in _LAUNCHER_ENV)


def exit_with_launcher() -> bool:
    """When this process is a launched rank, make it exit as soon as its parent (the
    launcher) is gone; returns whether it was armed. Call first thing in main().

    Two mechanisms: the kernel's parent-death signal (Linux prctl, SIGTERM on the death of
    the parent thread), and a daemon thread that sees the parent pid change (the process
    was re-parented) on any POSIX system, or when the signal was handled or ignored.
    """
    global _watching
    if _watching or not launched_by_launcher() or os.name != "posix":
        return _watching
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    threading.Thread(
        target=_watch_parent, args=(parent,), name="exit-with-launcher", daemon=True
    ).start()
    _watching = True
    if os.getppid() != parent:  # the launcher died before the signal was armed
        _exit_orphaned(parent)
    return True


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(_POLL_SECONDS)
    _exit_orphaned(parent)


def _exit_orphaned(parent: int) -> None:
    print(
        f"rank pid {os.getpid()}: launcher pid {parent} is gone; exiting",
        file=sys.stderr,
        flush=True,
    )
    # No cleanup: the launcher is dead, peers may be gone, a collective could hang forever.
    # Checkpoints are written under a temporary name, so nothing half-written looks complete.
    os._exit(143)


def close_distributed() -> None:
    """After a run that ended normally on this rank: wait for the others, then destroy the
    process group. Call it only on success, as the last step of main().

    A process that exits with its gloo process group alive can abort (SIGABRT, "terminate
    called without an active exception") when gloo's worker threads outlive the
    interpreter's teardown (pytorch#179291), turning a finished run into a failed one. A
    rank that failed skips this: the launcher stops the others, and a barrier would hang.
    """
    import torch.distributed as dist  # only ranks pay for the import

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_rank(code: int) -> NoReturn:
    """End a CLI: sys.exit(code), except in a launched rank, which flushes its streams
    and logs and leaves without the interpreter's teardown (os._exit).

    Everything a run writes is complete and closed by then (checkpoints renamed into
    place, logs and TensorBoard closed). What teardown would still do is destroy C++
    objects whose threads may outlive it: a rank that had finished its work still
    aborted there now and then (SIGABRT, "terminate called without an active
    exception"), and the launcher then fails the whole job.
    """
    if not launched_by_launcher():
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: nothing more to say
            pass
    os._exit(code)
