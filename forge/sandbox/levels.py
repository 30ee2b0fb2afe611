"""Which isolation level this host can give, found once by actually running a sandbox at
each level, and the fail-closed check behind `sandbox.min_level`."""

from __future__ import annotations

import logging
import shutil
import threading

from forge.sandbox import isolation

log = logging.getLogger("forge.sandbox")
_lock = threading.Lock()
_level: int | None = None
_floor = 0  # set_min_level: no sandbox in this process may run below it

HOW_TO_ENABLE = {
    1: "level 1 needs the `unshare` tool (util-linux) and unprivileged user namespaces "
    "(sysctl kernel.unprivileged_userns_clone=1 / user.max_user_namespaces>0; in Docker, run with "
    "--security-opt seccomp=unconfined or a profile allowing unshare)",
    2: "level 2 needs bubblewrap (apt-get install bubblewrap) and unprivileged user namespaces",
}


def _works(level: int) -> tuple[bool, str]:
    from forge.sandbox.core import Limits, _run_at

    tool = {0: None, 1: "unshare", 2: "bwrap"}[level]
    if tool and shutil.which(tool) is None:
        return False, f"{tool} not found"
    try:
        result = _run_at("print('ok')", "python", {}, (), 20.0, Limits(), level, None)
    except (OSError, RuntimeError) as exc:
        return False, f"{type(exc).__name__}: {exc}"
    if result.exit_code == 0 and result.stdout.strip() == "ok":
        return True, ""
    return False, (result.stderr.strip() or f"exit code {result.exit_code}")[-300:]


def available_level() -> int:
    """The strongest level that works here (probed once per process, then logged)."""
    global _level
    with _lock:
        if _level is None:
            for level in (2, 1, 0):
                ok, why = _works(level)
                if ok:
                    break
                log.info("sandbox level %d (%s) unavailable: %s", level, isolation.LEVEL_NAMES[level], why)
            else:
                from forge.sandbox.core import SandboxUnavailable

                raise SandboxUnavailable(
                    f"even sandbox level 0 (rlimits, and a uid drop when root) fails here: {why}. "
                    "A root harness needs CAP_SETUID/CAP_SETGID to drop to a sandbox uid."
                )
            _level = level
            log.info("sandbox: using level %d (%s)", _level, isolation.LEVEL_NAMES[_level])
        return _level


def probe() -> int:
    return available_level()


def require_level(min_level: int) -> int:
    """Fail closed: raise unless the host gives at least `min_level`; return the level in use."""
    from forge.sandbox.core import SandboxUnavailable

    if min_level not in isolation.LEVEL_NAMES:
        raise ValueError(f"sandbox.min_level must be 0, 1 or 2, got {min_level!r}")
    level = available_level()
    if level < min_level:
        raise SandboxUnavailable(
            f"sandbox.min_level={min_level} but this host only offers level {level} "
            f"({isolation.LEVEL_NAMES[level]}): {HOW_TO_ENABLE[min_level]}; or lower sandbox.min_level."
        )
    return level


def set_min_level(min_level: int) -> int:
    """Apply `sandbox.min_level` to this process: fail now if the host cannot give it, and
    refuse any later `run` below it. Call it at startup in the driver and in each worker."""
    global _floor
    level = require_level(min_level)
    _floor = min_level
    return level


def min_level_floor() -> int:
    return _floor
