"""A run's sandbox policy: untrusted code never runs silently at level 0, and the level in
use is said on the console at start, with a warning below level 2."""

from __future__ import annotations

import sys
from typing import Any

from forge.sandbox import isolation, levels, uids
from forge.sandbox.core import SandboxUnavailable

LEVEL_0_RISK = (
    "level 0 is rlimits and a uid of its own: the code can read files any user may read, write to the "
    "host's /tmp and /dev/shm, list the host's processes and connect to services on this host (Ray's included)"
)
# Without root there is no uid to give the code: it runs as the harness's own user.
LEVEL_0_RISK_NOT_ROOT = (
    "level 0 without root is rlimits only, and the code runs as this harness's own user: it can do "
    "whatever that user can, including read and write that user's files (its home, ~/.ssh, the "
    "repository), read the harness's environment variables with their secrets (/proc/PID/environ), "
    "signal or kill the harness, Ray and that user's other processes, leave processes running after the "
    "call, write to the host's /tmp and /dev/shm and connect to services on this host (Ray's included)"
)


def level_0_risk() -> str:
    return LEVEL_0_RISK if uids.is_root() else LEVEL_0_RISK_NOT_ROOT


def configure(
    min_level: int = 0,
    *,
    untrusted: bool = False,
    allow_level_0: bool = False,
    python: str | None = None,
    env_name: str = "",
) -> int:
    """Apply `sandbox.*` to this process and return the level its sandboxes use. An env that
    runs untrusted code needs level 1 or more unless `allow_level_0`; sandboxed Python is
    checked now (`python`, else the harness's own interpreter), so a bad one fails at start."""
    levels.set_python(python)
    level = levels.available_level()
    floor, reason = min_level, f"sandbox.min_level={min_level}"
    if untrusted and not allow_level_0 and floor < 1:
        floor = 1
        reason = (
            f"env {env_name!r} runs untrusted code, which needs sandbox level 1 or more "
            "(or sandbox.allow_level_0: true to accept level 0)"
        )
    if level < floor:
        raise SandboxUnavailable(
            f"{reason}, but this host offers only level {level} ({isolation.LEVEL_NAMES[level]}): "
            f"{levels.how_to_enable(floor)}"
        )
    levels.set_min_level(floor, reason)
    if untrusted:
        levels.check_python(level, levels.interpreter())
    return level


def configure_for_env(settings: Any, env_class: type, env_name: str) -> int:
    """`configure` from a `sandbox` config section for the run's env class."""
    return configure(
        settings.min_level,
        untrusted=bool(getattr(env_class, "runs_untrusted_code", False)),
        allow_level_0=settings.allow_level_0,
        python=settings.python,
        env_name=env_name,
    )


def announce(level: int, *, untrusted: bool, env_name: str = "") -> list[str]:
    """Print (stderr) the run's sandbox level, and why it is weak when it is below 2."""
    lines = [f"forge: sandbox level {level} ({isolation.LEVEL_NAMES[level]})"]
    if level < 2:
        lines.append(
            f"forge: WARNING: sandbox level {level} is below bubblewrap's (2): {levels.how_to_enable(2)}"
        )
    if level == 0:
        lines.append(f"forge: WARNING: sandbox level 1 is unavailable too: {levels.how_to_enable(1)}")
    if level == 0 and untrusted:
        lines.append(
            f"forge: WARNING: env {env_name!r} runs untrusted code at level 0 because sandbox.allow_level_0 "
            f"is true; {level_0_risk()}"
        )
    for line in lines:
        print(line, file=sys.stderr, flush=True)
    return lines
