"""The command lines of each isolation level: which interpreter the sandbox may run, and the
`unshare` (level 1) and bubblewrap (level 2) wrappers around it."""

from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile

LEVEL_NAMES = {0: "rlimits+uid", 1: "user/net/pid namespaces (unshare)", 2: "bubblewrap"}

# Read-only system paths a level-2 sandbox sees; everything else (/etc, /home, /root, ...) is absent.
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/etc/alternatives", "/etc/ld.so.cache")


def _world_reachable(path: str) -> bool:
    """True when every directory on the way is world-searchable and the file world-executable."""
    path = os.path.realpath(path)
    if not os.path.isfile(path) or not os.stat(path).st_mode & stat.S_IXOTH:
        return False
    return _world_searchable(os.path.dirname(path))


def work_root(uid: int | None) -> str:
    """Where work dirs go: the temp dir, unless the sandbox uid could not reach it there."""
    preferred = tempfile.gettempdir()
    if uid is None or _world_searchable(preferred):
        return preferred
    return "/tmp"


def _world_searchable(directory: str) -> bool:
    parent = os.path.realpath(directory)
    while True:
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            return False
        if parent == "/":
            return True
        parent = os.path.dirname(parent)


def python_for(uid: int | None) -> str:
    """An interpreter the sandbox user can execute: ours if reachable, else the system one."""
    if uid is None or _world_reachable(sys.executable):
        return sys.executable
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3") or ""):
        if candidate and _world_reachable(candidate):
            return candidate
    raise RuntimeError(
        f"no Python interpreter is executable by the unprivileged sandbox user: {sys.executable} sits "
        "in a directory only root can enter. Install a system python3 (apt-get install python3) or "
        "put the harness's interpreter in a world-readable location."
    )


def _prefix_of(python: str) -> str:
    # .../bin/python3 -> the installation prefix holding bin/ and lib/
    return os.path.dirname(os.path.dirname(os.path.realpath(python)))


# pid 1 of a level-1 namespace: runs the command as pid 2 and reaps orphans. The code itself
# must not be pid 1, where the kernel drops signals it has no handler for (even its own SIGTERM).
MINI_INIT = """
import os, sys
child = os.fork()
if child == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
while True:
    pid, status = os.wait()
    if pid == child:
        code = os.waitstatus_to_exitcode(status)
        os._exit(128 - code if code < 0 else code)
"""


def unshare_argv(python: str) -> list[str]:
    return [
        shutil.which("unshare") or "unshare",
        "--user", "--map-current-user", "--net", "--pid", "--fork", "--kill-child", "--mount-proc",
        python, "-I", "-S", "-c", MINI_INIT,
    ]  # fmt: skip


def bwrap_argv(work_dir: str, python: str, env: dict[str, str]) -> list[str]:
    argv = [
        shutil.which("bwrap") or "bwrap",
        "--unshare-all", "--die-with-parent", "--new-session", "--clearenv",
        "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
    ]  # fmt: skip
    mounted: set[str] = set()
    for path in (*SYSTEM_PATHS, _prefix_of(python)):
        if path in mounted or not os.path.lexists(path):
            continue
        mounted.add(path)
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        else:
            argv += ["--ro-bind", path, path]
    argv += ["--bind", work_dir, work_dir, "--chdir", work_dir]
    for key, value in env.items():
        argv += ["--setenv", key, value]
    return argv + ["--"]
