"""Which isolation level this host can give, found once by actually running a sandbox at
each level; the floor below which this process refuses to run code (`sandbox.min_level`,
untrusted envs); and the interpreter sandboxed Python runs, checked before first use."""

from __future__ import annotations

import logging
import shutil
import sys
import threading

from forge.sandbox import isolation, uids, workdir
from forge.sandbox.core import Limits, SandboxUnavailable, run_at

log = logging.getLogger("forge.sandbox")
_lock = threading.Lock()
_level: int | None = None
_floor = 0  # set_min_level: no sandbox in this process may run below it
_floor_reason = ""  # what set the floor, for the refusal's message
_python: str | None = None  # set_python: sandbox.python
_python_ok: set[tuple[int, str]] = set()
_unavailable: dict[int, str] = {}  # level -> why the probe found it does not work here

HOW_TO_ENABLE = {
    1: "level 1 needs unprivileged user namespaces, or a harness running as root with CAP_SYS_ADMIN "
    "(which builds the namespaces itself) (sysctl kernel.unprivileged_userns_clone=1 / "
    "user.max_user_namespaces>0; on Ubuntu 23.10 and later, where AppArmor takes their capabilities, "
    "sysctl kernel.apparmor_restrict_unprivileged_userns=0; in Docker, run with --security-opt "
    "seccomp=unconfined --security-opt apparmor=unconfined, or profiles allowing unshare and mount)",
    2: "level 2 needs bubblewrap (apt-get install bubblewrap) and unprivileged user namespaces",
}


def _works(level: int) -> tuple[bool, str]:
    if level == 2 and shutil.which("bwrap") is None:
        return False, "bwrap not found"
    try:
        result = run_at("echo ok", "shell", {}, (), 20.0, Limits(), level, None, sys.executable)
    except (OSError, RuntimeError) as exc:
        return False, f"{type(exc).__name__}: {exc}"
    if result.exit_code == 0 and result.stdout.strip() == "ok":
        return True, ""
    # The last line says what failed (a launcher that crashed printed a traceback above it).
    lines = result.stderr.strip().splitlines()
    return False, (lines[-1] if lines else f"exit code {result.exit_code}")[-300:]


def _level_1_as_root(why_not: str) -> tuple[bool, str]:
    """Level 1 from root's own capabilities, for a root harness whose host refused the
    unprivileged user namespace level 1 first tries (`why_not`)."""
    isolation.set_level1_as_root(True)
    ok, why = _works(1)
    if ok:
        log.info("sandbox level 1 builds its namespaces as root: %s", why_not)
        return True, ""
    isolation.set_level1_as_root(False)
    return False, f"{why_not}; as root without a user namespace: {why}"


def available_level() -> int:
    """The strongest level that works here (probed once per process, then logged). The first
    probe also sweeps work dirs left by harnesses that died."""
    global _level
    with _lock:
        if _level is None:
            workdir.sweep(workdir.base_dir(uids.UID_BASE if uids.is_root() else None))
            for level in (2, 1, 0):
                ok, why = _works(level)
                if not ok and level == 1 and uids.is_root():
                    ok, why = _level_1_as_root(why)
                if ok:
                    break
                _unavailable[level] = why
                log.info("sandbox level %d (%s) unavailable: %s", level, isolation.LEVEL_NAMES[level], why)
            else:
                raise SandboxUnavailable(
                    f"even sandbox level 0 (rlimits, and a uid drop when root) fails here: {why}. "
                    "A root harness needs CAP_SETUID/CAP_SETGID to drop to a sandbox uid."
                )
            _level = level
            log.info("sandbox: using level %d (%s)", _level, isolation.LEVEL_NAMES[_level])
        return _level


def probe() -> int:
    return available_level()


def why_unavailable(level: int) -> str:
    """Why the probe found `level` does not work on this host ("" if it works or was not tried)."""
    available_level()
    return _unavailable.get(level, "")


def how_to_enable(level: int) -> str:
    """What `level` needs, with what the probe met here when it tried it."""
    why = why_unavailable(level)
    return HOW_TO_ENABLE[level] + (f" (here: {why})" if why else "")


def require_level(min_level: int) -> int:
    """Fail closed: raise unless the host gives at least `min_level`; return the level in use."""
    if min_level not in isolation.LEVEL_NAMES:
        raise ValueError(f"sandbox.min_level must be 0, 1 or 2, got {min_level!r}")
    level = available_level()
    if level < min_level:
        raise SandboxUnavailable(
            f"sandbox.min_level={min_level} but this host only offers level {level} "
            f"({isolation.LEVEL_NAMES[level]}): {how_to_enable(min_level)}; or lower sandbox.min_level."
        )
    return level


def set_min_level(min_level: int, reason: str = "") -> int:
    """Apply a floor to this process: fail now if the host cannot give it, and refuse any
    later `run` below it. Call it at startup in the driver and in each worker."""
    global _floor, _floor_reason
    level = require_level(min_level)
    _floor = min_level
    _floor_reason = reason or f"sandbox.min_level={min_level}"
    return level


def min_level_floor() -> int:
    return _floor


def check_floor(level: int, min_level: int = 0) -> None:
    """Raise SandboxUnavailable when `level` is below `min_level` or this process's floor."""
    if level >= max(min_level, _floor):
        return
    reason = _floor_reason if _floor > min_level else f"sandbox.min_level={min_level}"
    best = available_level()
    raise SandboxUnavailable(
        f"{reason}, but this run would use sandbox level {level} ({isolation.LEVEL_NAMES[level]}; "
        f"the host offers up to level {best}); see forge.sandbox.require_level for how to enable more"
    )


def set_python(python: str | None) -> None:
    """`sandbox.python`: the interpreter for sandboxed Python (None: the harness's own)."""
    global _python
    _python = python


def interpreter(python: str | None = None) -> str:
    return python or _python or sys.executable


def check_python(level: int, python: str) -> None:
    """Fail with the fix unless sandboxed code at `level` can run `python` (checked once)."""
    if (level, python) in _python_ok:
        return
    fix = (
        "set sandbox.python to an interpreter the sandbox can run (e.g. /usr/bin/python3, without the "
        "harness's packages), or use a host that gives level 1 or 2"
    )
    try:
        isolation.interpreter_dirs(python)
    except ValueError as exc:
        raise SandboxUnavailable(str(exc)) from exc
    if level == 0 and isolation.level0_python(python) is None:
        raise SandboxUnavailable(
            f"sandboxed Python at level 0 runs as an unprivileged uid, which cannot execute {python} "
            f"(a directory on its path is closed to other users, and it is a venv): {fix}"
        )
    result = run_at(
        "import sys\nprint(sys.version_info[0])", "python", {}, (), 30.0, Limits(), level, None, python
    )
    if result.stdout.strip() != "3":
        why = (result.stderr.strip() or f"exit code {result.exit_code}")[-400:]
        raise SandboxUnavailable(f"the sandbox (level {level}) cannot run Python {python}: {why}; {fix}")
    _python_ok.add((level, python))
