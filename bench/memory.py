"""A benchmark process's own memory, from Linux's /proc/self."""

from __future__ import annotations

from pathlib import Path


def resident_mb(field: str = "VmHWM") -> float:
    """A memory field of /proc/self/status in MB: VmHWM (the resident-set high-water mark)
    or VmRSS (the resident set now)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_high_water() -> None:
    """VmHWM restarts from the current resident set."""
    Path("/proc/self/clear_refs").write_text("5")
