"""A call's writable space: `forge-sandbox-*/fs/` holding `work/` (the code's cwd and home),
`tmp/` and `shm/`. A root harness mounts fs/ as a tmpfs capped in bytes and inodes, which
also makes removing it one unmount whatever the code left; directories of harnesses that
died are swept at start."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

from forge.sandbox import _syscalls, isolation, uids

log = logging.getLogger("forge.sandbox")
PREFIX = "forge-sandbox-"
# A directory this young may be one another harness is still setting up (not yet locked).
STALE_AFTER_S = 60.0
# Work dirs of the layout before run dirs were locked: the harness that made them may still run.
LEGACY_STALE_AFTER_S = 3600.0
SUBDIRS = ("work", "tmp", "shm")


@dataclass
class RunDir:
    root: str  # forge-sandbox-XXXX: holds `lock` and `fs`, walkable by the sandbox uid
    lock_fd: int  # flock'ed while the call and its cleanup last
    mounted: bool  # fs is a capped tmpfs

    @property
    def fs(self) -> str:
        return os.path.join(self.root, "fs")

    @property
    def work(self) -> str:
        return os.path.join(self.fs, "work")

    @property
    def new_root(self) -> str:
        """Where level 1 assembles the code's root filesystem (a mount point only)."""
        return os.path.join(self.root, "newroot")


def base_dir(uid: int | None) -> str:
    """The temp dir, unless the sandbox uid could not reach it there."""
    preferred = tempfile.gettempdir()
    if uid is None or isolation.world_searchable(preferred):
        return preferred
    return "/tmp"


def create(uid: int | None, max_bytes: int, max_files: int) -> RunDir:
    root = tempfile.mkdtemp(prefix=PREFIX, dir=base_dir(uid))
    os.chmod(root, 0o711)  # the sandbox uid may walk through to fs/, not list it
    lock_fd = os.open(os.path.join(root, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)
    run_dir = RunDir(root, lock_fd, mounted=False)
    os.mkdir(run_dir.fs, 0o700)
    if os.geteuid() == 0:
        owner = f",uid={uid},gid={uid}" if uid is not None else ""
        options = f"size={max_bytes},nr_inodes={max_files + 1 + len(SUBDIRS)},mode=0700{owner}"
        try:
            _syscalls.mount("tmpfs", run_dir.fs, "tmpfs", _syscalls.MS_NOSUID | _syscalls.MS_NODEV, options)
            run_dir.mounted = True
        except OSError as exc:
            _warn_unmounted(exc)
    for name in SUBDIRS:
        os.mkdir(os.path.join(run_dir.fs, name), 0o700)
        if uid is not None:
            os.chown(os.path.join(run_dir.fs, name), uid, uid)
    os.mkdir(run_dir.new_root, 0o700)
    if uid is not None:
        os.chown(run_dir.fs, uid, uid)
        os.chown(run_dir.new_root, uid, uid)
    return run_dir


_warned = False


def _warn_unmounted(exc: OSError) -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning("sandbox work dirs are not capped in bytes and files: mounting a tmpfs failed (%s)", exc)


def over_cap(run_dir: RunDir, max_bytes: int, max_files: int) -> bool:
    """Whether fs/ holds more than the caps: the check for a harness that cannot mount a
    capped tmpfs. It stops counting at the cap, so a flood costs it O(cap) per check."""
    return _holds_more([run_dir.fs], [], max_bytes, max_files)


def shared_over_cap(uid: int, max_bytes: int, max_files: int) -> bool:
    """Whether what `uid` keeps in the host's shared writable directories (where level 0's code
    can write) holds more than the caps."""
    return _holds_more(list(uids.SHARED_WRITABLE), [uid], max_bytes, max_files)


def _holds_more(roots: list[str], owners: list[int], max_bytes: int, max_files: int) -> bool:
    """Count what lies below `roots` (at their top, only entries of `owners` when given) until
    it passes a cap."""
    files = used = 0
    stack = [(root, bool(owners)) for root in roots]
    while stack:
        directory, filtered = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if filtered and info.st_uid not in owners:
                continue
            files += 1
            used += info.st_blocks * 512  # what it occupies: a sparse file counts what it wrote
            if files > max_files or used > max_bytes:
                return True
            if entry.is_dir(follow_symlinks=False):
                stack.append((entry.path, False))
    return False


def _remove(root: str) -> None:
    fs = os.path.join(root, "fs")
    if os.path.ismount(fs):
        # Detached, the tmpfs is freed when its last user is gone: no walk over what the code left.
        with contextlib.suppress(OSError):
            _syscalls.umount(fs, _syscalls.MNT_DETACH)
    shutil.rmtree(root, ignore_errors=True)


def remove(run_dir: RunDir) -> None:
    try:
        _remove(run_dir.root)
    finally:
        os.close(run_dir.lock_fd)


def sweep(base: str) -> int:
    """Remove the run dirs of harnesses that are gone (unlocked and not young); their count."""
    removed = 0
    now = time.time()
    try:
        entries = [
            e for e in os.scandir(base) if e.name.startswith(PREFIX) and e.is_dir(follow_symlinks=False)
        ]
    except OSError:
        return 0
    for entry in entries:
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
            lock_path = os.path.join(entry.path, "lock")
            if not os.path.exists(lock_path):
                if age > LEGACY_STALE_AFTER_S:
                    _remove(entry.path)
                    removed += 1
                continue
            if age < STALE_AFTER_S:
                continue
            fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # a live harness holds it
        try:
            _remove(entry.path)
            removed += 1
        finally:
            os.close(fd)
    if removed:
        log.info("sandbox: swept %d stale work dirs under %s", removed, base)
    return removed
