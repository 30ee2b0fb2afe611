"""What each isolation level is made of: the interpreter the sandbox runs and the directories
it needs read-only, the launcher's spec for level 1 (its own namespaces) and the bubblewrap
command line for level 2."""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys

LEVEL_NAMES = {0: "rlimits+uid", 1: "namespaces (user, mount, pid, net)", 2: "bubblewrap"}
# Level 1 built with a root harness's own capabilities where the host refuses user namespaces.
LEVEL_1_AS_ROOT_NAME = "namespaces (mount, pid, net), built as root: this host refuses user namespaces"
_level1_as_root = False  # set by the level probe (forge.sandbox.levels) for this process


def set_level1_as_root(on: bool) -> None:
    global _level1_as_root
    _level1_as_root = on


def level1_as_root() -> bool:
    """Whether this process builds level 1 as root, without a user namespace."""
    return _level1_as_root


# Read-only system paths a level 1-2 sandbox sees; everything else (/etc, /home, /root, /tmp,
# Ray's session files, the harness's tree) is absent.
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/etc/alternatives", "/etc/ld.so.cache")
# The code's own writable places inside levels 1-2, bound from the run's directory.
SCRATCH = {"tmp": "/tmp", "shm": "/dev/shm"}
# The work dir's path inside levels 1-2 (its host path would sit under the private /tmp).
INSIDE_WORK = "/work"


def world_reachable(path: str) -> bool:
    """True when every directory on the way is world-searchable and the file world-executable."""
    path = os.path.realpath(path)
    if not os.path.isfile(path) or not os.stat(path).st_mode & stat.S_IXOTH:
        return False
    return world_searchable(os.path.dirname(path))


def world_searchable(directory: str) -> bool:
    parent = os.path.realpath(directory)
    while True:
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            return False
        if parent == "/":
            return True
        parent = os.path.dirname(parent)


def _prefix_of(python: str) -> str:
    # .../bin/python3 -> the installation prefix holding bin/ and lib/
    return os.path.dirname(os.path.dirname(os.path.realpath(python)))


@functools.lru_cache(maxsize=8)
def interpreter_dirs(python: str) -> tuple[str, ...]:
    """The directories `python` needs (its prefixes: a venv and the installation under it),
    outside the system paths, each given once (none inside another)."""
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        prefixes = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
    else:
        query = "import sys, json; print(json.dumps([sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]))"
        try:
            out = subprocess.run([python, "-I", "-S", "-c", query], capture_output=True, text=True, timeout=30,
                                 check=True).stdout  # fmt: skip
            prefixes = json.loads(out)
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            raise ValueError(f"sandbox.python={python!r} does not run here ({exc}); set it to a Python 3 "
                             "interpreter's path, or leave it unset for the harness's own") from exc  # fmt: skip
    prefixes.append(_prefix_of(python))
    dirs: list[str] = []
    for path in sorted(
        {os.path.realpath(p) for p in prefixes} | {os.path.abspath(p) for p in prefixes}, key=len
    ):
        covered = any(path == d or path.startswith(d.rstrip("/") + "/") for d in (*SYSTEM_PATHS, *dirs))
        if os.path.isdir(path) and not covered:
            dirs.append(path)
    return tuple(dirs)


def interpreter_binds(python: str) -> list[tuple[str, str]]:
    """(source, destination) read-only binds that give the sandbox `python` at its own path.
    A directory the sandbox uid cannot walk to (a venv under a root-only /root) comes from a
    read-only bind the root harness keeps under BIND_DIR, since bubblewrap and the level-1
    launcher set up mounts as that uid."""
    return [(_reachable(path), path) for path in interpreter_dirs(python)]


BIND_DIR = "/run/forge-sandbox-python"


def level0_python(python: str) -> str | None:
    """A path to `python` that level 0's sandbox uid can execute, or None. Under a root
    harness, an installation in a closed directory is reached through its read-only bind
    under BIND_DIR (its stdlib and packages sit beside it); a venv cannot be (its
    pyvenv.cfg names the closed path of the installation below it)."""
    if os.geteuid() != 0 or world_reachable(python):
        return python
    real = os.path.realpath(python)
    dirs = interpreter_dirs(python)
    if len(dirs) != 1 or not real.startswith(dirs[0] + "/"):
        return None
    return os.path.join(_reachable(dirs[0]), os.path.relpath(real, dirs[0]))


def _is_mount_point(path: str) -> bool:
    # os.path.ismount misses a bind mount from the same filesystem (same st_dev as its parent).
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def _reachable(path: str) -> str:
    if os.geteuid() != 0 or world_searchable(path):
        return path
    from forge.sandbox import _syscalls

    target = os.path.join(BIND_DIR, hashlib.sha256(path.encode()).hexdigest()[:16])
    os.makedirs(BIND_DIR, mode=0o711, exist_ok=True)
    with open(os.path.join(BIND_DIR, "lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one harness at a time mounts it
        if not _is_mount_point(target):
            os.makedirs(target, mode=0o755, exist_ok=True)
            _syscalls.mount(path, target, None, _syscalls.MS_BIND)
            flags = (
                _syscalls.mount_flags(target) | _syscalls.MS_RDONLY | _syscalls.MS_NOSUID | _syscalls.MS_NODEV
            )
            _syscalls.mount(None, target, None, _syscalls.MS_REMOUNT | _syscalls.MS_BIND | flags)
    return target


def level1_spec(work: str, scratch: str, ro_binds: list[tuple[str, str]], scratch_mounted: bool,
                tmpfs_bytes: int, tmpfs_files: int) -> dict:  # fmt: skip
    """What `_namespace` builds: the run's fs/ is at `scratch`, its work dir at `work`.
    Without a capped tmpfs from the harness (not root), /tmp and /dev/shm are tmpfs of their own."""
    binds = [(work, INSIDE_WORK)]
    tmpfs = []
    for name, dest in SCRATCH.items():
        if scratch_mounted:
            binds.append((os.path.join(scratch, name), dest))
        else:
            tmpfs.append((dest, tmpfs_bytes, tmpfs_files))
    return {
        "as_root": _level1_as_root,
        "new_root": os.path.join(os.path.dirname(scratch), "newroot"),
        "system": list(SYSTEM_PATHS),
        "ro_binds": [list(pair) for pair in ro_binds],
        "binds": [list(pair) for pair in binds],
        "tmpfs": [list(entry) for entry in tmpfs],
    }


@functools.lru_cache(maxsize=1)
def _bwrap_has_size() -> bool:
    # --size (a tmpfs's cap) came with bubblewrap 0.7; without it /tmp is an uncapped tmpfs.
    try:
        return (
            "--size" in subprocess.run(["bwrap", "--help"], capture_output=True, text=True, timeout=10).stdout
        )
    except (OSError, subprocess.SubprocessError):
        return False


def bwrap_argv(work: str, scratch: str, ro_binds: list[tuple[str, str]], scratch_mounted: bool,
               tmpfs_bytes: int, env: dict[str, str]) -> list[str]:  # fmt: skip
    argv = [
        shutil.which("bwrap") or "bwrap",
        "--unshare-all", "--die-with-parent", "--new-session", "--clearenv",
        "--proc", "/proc", "--dev", "/dev",
    ]  # fmt: skip
    for path in SYSTEM_PATHS:
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.exists(path):
            argv += ["--ro-bind", path, path]
    for source, dest in ro_binds:
        argv += ["--ro-bind", source, dest]
    for name, dest in SCRATCH.items():
        if scratch_mounted:
            argv += ["--bind", os.path.join(scratch, name), dest]
        else:
            argv += (["--size", str(tmpfs_bytes)] if _bwrap_has_size() else []) + ["--tmpfs", dest]
    argv += ["--bind", work, INSIDE_WORK, "--chdir", INSIDE_WORK]
    argv += ["--remount-ro", "/"]  # bubblewrap's root is a tmpfs: writable, and uncapped, by default
    for key, value in env.items():
        argv += ["--setenv", key, value]
    return argv + ["--"]
