"""Process memory for the bench tools: the peak RSS of a stretch of code on Linux, and
torch's allocator figures on CUDA."""

from __future__ import annotations

import ctypes

MiB = 1 << 20


def status_kib(key: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: resident now, VmHWM: its peak)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def prepare_cpu_memory_tracking() -> bool:
    """True when the peak RSS can be reset (Linux). Also tells glibc to mmap every block of
    1 MiB or more and unmap it on free, so memory freed earlier cannot hide a new
    allocation and memory freed now leaves the RSS at once."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, MiB)  # M_MMAP_THRESHOLD: blocks >= 1 MiB are mmap'd, unmapped on free
        libc.mallopt(-1, MiB)  # M_TRIM_THRESHOLD: trim the heap top beyond 1 MiB
        reset_peak_rss()
        status_kib("VmHWM")
    except OSError:
        return False
    return True


def reset_peak_rss() -> None:
    """VmHWM := VmRSS, so the next peak is that of what runs from now on."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss_bytes() -> int:
    return status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return status_kib("VmHWM") * 1024


def release_freed_memory() -> None:
    """Hand memory glibc keeps after frees back to the OS (malloc_trim), so that the RSS
    is what is live; a no-op where there is no glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
