"""Resident memory of this process from /proc (Linux), for the benches that report peak memory."""

from __future__ import annotations


def status(key: str) -> int:
    """A /proc/self/status memory figure in bytes (VmRSS: now, VmHWM: the peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status (Linux only)")


def reset_peak() -> None:
    """VmHWM := VmRSS, so the next peak is of what follows."""
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak resident set
        f.write("5")
