"""Per-sandbox unprivileged uids for a root harness: allocation across processes, killing
everything a uid runs, and removing what it left in the host's shared writable directories.

A uid of its own means a sandbox cannot signal the harness or another sandbox, RLIMIT_NPROC
counts only its own processes, and "kill every process of this uid" reaps daemons that
left the session.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_launch.py")
UID_BASE = 200_000
UID_COUNT = 1_000
LOCK_DIR = "/run/forge-sandbox" if os.path.isdir("/run") else "/tmp/forge-sandbox-uids"
# World-writable directories where level 0's code, which sees the host's filesystem, can
# leave files (levels 1-2 give it private ones).
SHARED_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm")


def is_root() -> bool:
    return os.geteuid() == 0


def processes_of(uid: int) -> list[int]:
    """Live (non-zombie) processes whose owner is `uid`."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != uid:
                continue
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if state not in (b"Z", b"X"):
            pids.append(int(entry))
    return pids


def kill_all_of(uid: int, attempts: int = 20) -> None:
    """SIGKILL every process running as `uid`; with attempts=1, one pass and no waiting.

    The launcher (started as root, so any interpreter will do) forks a helper that becomes
    `uid` and calls kill(-1, SIGKILL): the kernel signals all of that uid's processes in one
    pass under the tasklist lock, so a fork bomb cannot outrun it as a /proc scan could, and
    none of them runs another instruction after it.
    """
    for _ in range(attempts):
        if not processes_of(uid):
            return
        subprocess.run(
            [sys.executable, "-I", "-S", LAUNCHER, "kill", str(uid), "1"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=True,
            env={},
            check=False,
        )
        if attempts == 1:
            return
        time.sleep(0.01)
    leftover = processes_of(uid)
    if leftover:
        raise RuntimeError(f"sandbox uid {uid} still has processes {leftover} after {attempts} kill passes")


def remove_files_of(uid: int) -> int:
    """Remove every entry `uid` owns at the top of SHARED_WRITABLE (a directory with all it
    holds); call it once none of its processes runs. Returns how many were removed."""
    removed = 0
    for directory in SHARED_WRITABLE:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)  # fd-based: a symlink inside is removed, never followed
                else:
                    os.unlink(entry.path)
                removed += 1
            except OSError:
                continue
    return removed


def _unused(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return True
    return False


@contextmanager
def sandbox_uid() -> Iterator[int]:
    """Hold a uid no other sandbox on this host is using (flock'ed across processes)."""
    os.makedirs(LOCK_DIR, mode=0o700, exist_ok=True)
    start = (os.getpid() * 7919 + time.monotonic_ns()) % UID_COUNT
    for i in range(UID_COUNT):
        uid = UID_BASE + (start + i) % UID_COUNT
        if not _unused(uid):
            continue
        fd = os.open(os.path.join(LOCK_DIR, str(uid)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            kill_all_of(uid)  # leftovers of a harness that died mid-run
            remove_files_of(uid)
            try:
                yield uid
            finally:
                kill_all_of(uid)
                remove_files_of(uid)
        finally:
            os.close(fd)
        return
    raise RuntimeError(f"all {UID_COUNT} sandbox uids from {UID_BASE} are in use on this host")
