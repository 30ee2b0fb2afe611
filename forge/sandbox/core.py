"""Executing untrusted python or shell code in a fresh subprocess at a given isolation level
(`run_at`), and what a run returns; `forge.sandbox.api.run` picks the level."""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import os
import selectors
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from forge.sandbox import cgroup, isolation, uids, workdir

Language = Literal["python", "shell"]
log = logging.getLogger("forge.sandbox")
# After the main process exits, how long daemons holding its pipes may keep us reading.
EXIT_GRACE_S = 0.2
# Without a capped tmpfs (a harness that is not root), how often the work dir is measured.
DISK_CHECK_S = 0.25


class SandboxUnavailable(RuntimeError):
    """The host cannot give the isolation level the config demands."""


@dataclass(frozen=True)
class Limits:
    cpu_seconds: int | None = None  # default: the wall timeout rounded up, plus one
    memory_bytes: int = 1 << 30  # RLIMIT_AS: address space, not resident memory
    file_bytes: int = 64 << 20  # RLIMIT_FSIZE: largest file the code may write
    open_files: int = 256
    processes: int = 64  # RLIMIT_NPROC, per sandbox uid
    output_bytes: int = 1 << 20  # per stream; more ends the run, output_truncated=True
    # Everything the code may keep in its work dir, /tmp and /dev/shm together: a tmpfs of this
    # size and inode count when the harness is root; otherwise /tmp and /dev/shm each (levels 1-2).
    # Level 0 under a root harness also measures its uid's files in the host's shared dirs.
    disk_bytes: int = 256 << 20
    max_files: int = 4096
    # The call as a whole, in a cgroup of its own where the harness can make one (root; see
    # forge.sandbox.cgroup): memory of all its processes together (page cache and tmpfs pages
    # included; None: no cap), and cores (None: no cap). `processes` caps the call there too.
    call_memory_bytes: int | None = 2 << 30
    call_cpus: float | None = None


@dataclass
class SandboxResult:
    stdout: str
    stderr: str
    # As a shell reports it, at every level: the code's exit status, or 128+N when it died of
    # signal N; a call the harness ended (timeout, output or disk cap) reports 137 (SIGKILL);
    # 126/127 when level 1 could not set up or start the command (its stderr says why).
    exit_code: int
    timed_out: bool
    output_truncated: bool
    level: int
    wall_seconds: float
    files: dict[str, str] = field(default_factory=dict)  # the `collect` paths that were regular files
    uid: int | None = None  # host uid the code ran as (root harness only), for audits
    # Ended for holding more than Limits.disk_bytes or max_files in its work dir (measured when
    # the harness is not root: as root a capped tmpfs makes such writes fail instead), or, at
    # level 0 under a root harness, in the host's /tmp, /var/tmp and /dev/shm (measured).
    disk_exceeded: bool = False
    # The kernel killed a process of the call for holding more than Limits.call_memory_bytes
    # together (only where calls get a cgroup).
    memory_exceeded: bool = False

    @property
    def ok(self) -> bool:
        return (
            self.exit_code == 0
            and not self.timed_out
            and not self.output_truncated
            and not self.disk_exceeded
            and not self.memory_exceeded
        )


def _safe_relpath(name: str) -> str:
    norm = os.path.normpath(name)
    if os.path.isabs(norm) or norm in (".", "..") or norm.startswith("../"):
        raise ValueError(f"sandbox file name {name!r} must be a relative path inside the work dir")
    return norm


def _write_files(work_dir: str, files: dict[str, str | bytes], uid: int | None) -> None:
    for name, content in files.items():
        path = os.path.join(work_dir, _safe_relpath(name))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb" if isinstance(content, bytes) else "w") as f:
            f.write(content)
    if uid is not None:
        for root, dirs, names in os.walk(work_dir):
            for entry in (*dirs, *names):
                os.chown(os.path.join(root, entry), uid, uid, follow_symlinks=False)


def _read_back(work_dir: str, name: str, max_bytes: int) -> str | None:
    """Read a file the sandbox left, refusing symlinks anywhere on the path (the sandbox may
    have planted `out.txt -> /etc/shadow`) and anything but a regular file."""
    parts = _safe_relpath(name).split(os.sep)
    fd = os.open(work_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for part in parts[:-1]:
            try:
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError:
                return None
            os.close(fd)
            fd = nxt
        try:
            file_fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
        except OSError:
            return None
        with os.fdopen(file_fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            return f.read(max_bytes).decode("utf-8", errors="replace")
    finally:
        os.close(fd)


def _scrubbed_env(work_dir: str, extra: dict[str, str] | None) -> dict[str, str]:
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": work_dir,
        "TMPDIR": work_dir,
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    env.update(extra or {})
    return env


def _rlimits(limits: Limits, timeout_s: float, uid: int | None) -> dict[str, int]:
    cpu = limits.cpu_seconds if limits.cpu_seconds is not None else math.ceil(timeout_s) + 1
    nproc = limits.processes
    if uid is None:  # no uid of our own: NPROC counts every process this user already runs
        nproc += len(uids.processes_of(os.getuid()))
    return {
        "cpu": cpu,
        "as": limits.memory_bytes,
        "fsize": limits.file_bytes,
        "nofile": limits.open_files,
        "nproc": nproc,
        "core": 0,
    }


def _command(language: Language, code: str, work_dir: str, python: str) -> tuple[list[str], dict[str, str]]:
    if language == "python":
        return [python, "main.py"], {"main.py": code}
    if language == "shell":
        shell = "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"
        return [shell, "main.sh"], {"main.sh": code}
    raise ValueError(f"sandbox language {language!r} is not supported: use 'python' or 'shell'")


def _kill_now(proc: subprocess.Popen, uid: int | None) -> None:
    """Stop every process of the call before it returns: after this none of them runs
    another instruction (so none writes late). Waiting for them to be reaped is cleanup's."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # own session: start_new_session made pgid == pid
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    if uid is not None:
        uids.kill_all_of(uid, attempts=1)  # daemons that called setsid() left our process group
    proc.wait()


def _pump(
    proc: subprocess.Popen, deadline: float, cap: int, over_cap: Callable[[], str | None] | None
) -> tuple[bytes, bytes, bool, bool, str | None]:
    """Read both pipes until EOF, the deadline, more than `cap` bytes on one stream, or
    `over_cap()` (checked every DISK_CHECK_S) names a cap the call went over ("disk" or
    "memory"), which it returns."""
    buffers = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    sel = selectors.DefaultSelector()
    for stream in buffers:
        os.set_blocking(stream.fileno(), False)
        sel.register(stream, selectors.EVENT_READ)
    timed_out = truncated = False
    over: str | None = None
    exited_at: float | None = None
    next_disk_check = time.monotonic() + DISK_CHECK_S
    try:
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                timed_out = True
                break
            if over_cap is not None and now >= next_disk_check:
                next_disk_check = now + DISK_CHECK_S
                over = over_cap()
                if over is not None:
                    break
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > EXIT_GRACE_S:
                break  # a daemon inherited the pipes; the call is over anyway
            wait = min(deadline - now, 0.05 if exited_at is None else EXIT_GRACE_S)
            for key, _ in sel.select(timeout=max(wait, 0.0)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf = buffers[key.fileobj]
                buf += chunk[: cap + 1 - len(buf)]
                if len(buf) > cap:
                    truncated = True
            if truncated:
                break
    finally:
        sel.close()
    out, err = (bytes(b[:cap]) for b in buffers.values())
    return out, err, timed_out, truncated, over


def _cap_check(
    run_dir: workdir.RunDir, shared_uid: int | None, group: cgroup.CallGroup | None, limits: Limits
) -> Callable[[], str | None] | None:
    """What `_pump` measures: the work dir when no capped tmpfs holds it, and, for level 0's own
    uid, its files in the host's /tmp, /var/tmp and /dev/shm (no tmpfs can hold those) ("disk");
    and whether the kernel killed one of the call's processes for the call's memory ("memory":
    the code could carry on without it, but the result would not say why)."""
    checks: list[tuple[str, Callable[[], bool]]] = []
    if not run_dir.mounted:
        checks.append(("disk", lambda: workdir.over_cap(run_dir, limits.disk_bytes, limits.max_files)))
    if shared_uid is not None:
        checks.append(
            ("disk", lambda: workdir.shared_over_cap(shared_uid, limits.disk_bytes, limits.max_files))
        )
    if group is not None:
        checks.append(("memory", group.memory_exceeded))
    if not checks:
        return None
    return lambda: next((name for name, check in checks if check()), None)


def _launch(spec: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-I", "-S", uids.LAUNCHER, json.dumps(spec)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        close_fds=True,
        env={},
    )


def _argv_at(level: int, run_dir: workdir.RunDir, argv: list[str], env: dict[str, str],
             limits: Limits, ro_binds: list[tuple[str, str]]) -> tuple[list[str], dict | None]:  # fmt: skip
    """The command the launcher execs, and level 1's namespace spec."""
    if level == 1:
        ns = isolation.level1_spec(run_dir.work, run_dir.fs, ro_binds, run_dir.mounted, limits.disk_bytes,
                                   limits.max_files)  # fmt: skip
        return argv, ns
    if level == 2:
        bwrap = isolation.bwrap_argv(
            run_dir.work, run_dir.fs, ro_binds, run_dir.mounted, limits.disk_bytes, env
        )
        return bwrap + argv, None
    return argv, None


def run_at(
    code: str,
    language: Language,
    files: dict[str, str | bytes],
    collect: tuple[str, ...],
    timeout_s: float,
    limits: Limits,
    level: int,
    extra_env: dict[str, str] | None,
    python: str,
) -> SandboxResult:
    started = time.monotonic()
    cleanup = contextlib.ExitStack()  # runs off the caller's path, in a thread, once we return
    try:
        uid = cleanup.enter_context(uids.sandbox_uid()) if uids.is_root() else None
        run_dir = workdir.create(uid, limits.disk_bytes, limits.max_files)
        cleanup.callback(workdir.remove, run_dir)
        group = (
            cgroup.create(limits.call_memory_bytes, limits.processes, limits.call_cpus)
            if uid is not None
            else None
        )
        if group is not None:
            cleanup.callback(group.remove)
        work = run_dir.work
        runnable = isolation.level0_python(python) or python if level == 0 else python
        argv, entry = _command(language, code, work, runnable)
        _write_files(work, {**files, **entry}, uid)
        inside = isolation.INSIDE_WORK if level >= 1 else work
        env = _scrubbed_env(inside, extra_env)
        if runnable != python:  # its RUNPATH names the closed path: it would load another libpython
            env["LD_LIBRARY_PATH"] = os.path.join(os.path.dirname(os.path.dirname(runnable)), "lib")
        ro_binds = isolation.interpreter_binds(python) if level >= 1 else []
        argv, ns = _argv_at(level, run_dir, argv, env, limits, ro_binds)
        spec = {
            "level": level,
            "rlimits": _rlimits(limits, timeout_s, uid),
            "uid": uid,
            "cwd": "/" if level == 2 else inside,  # bubblewrap's --chdir moves it inside
            "argv": argv,
            "env": env,
            "ns": ns,
            "supervise": level == 0 and uid is not None,
            "cgroups": group.procs_files if group is not None else [],
        }
        proc = _launch(spec)
        try:
            deadline = started + timeout_s
            over_cap = _cap_check(run_dir, uid if level == 0 else None, group, limits)
            out, err, timed_out, truncated, over = _pump(proc, deadline, limits.output_bytes, over_cap)
            if not (timed_out or truncated or over):
                # The pipes closed; the run lasts until the main process exits too.
                try:
                    proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
                except subprocess.TimeoutExpired:
                    timed_out = True
        finally:
            _kill_now(proc, uid)
            proc.stdout.close()
            proc.stderr.close()
        disk_exceeded = over == "disk"
        memory_exceeded = over == "memory" or (group is not None and group.memory_exceeded())
        collected = {}
        for name in collect:
            content = _read_back(work, name, limits.output_bytes)
            if content is not None:
                collected[name] = content
    finally:
        _in_background(cleanup)
    status = proc.returncode
    return SandboxResult(
        stdout=out.decode("utf-8", errors="replace"),
        stderr=err.decode("utf-8", errors="replace"),
        exit_code=128 - status if status < 0 else status,
        timed_out=timed_out,
        output_truncated=truncated,
        level=level,
        wall_seconds=time.monotonic() - started,
        files=collected,
        uid=uid,
        disk_exceeded=disk_exceeded,
        memory_exceeded=memory_exceeded,
    )


_pending: set[threading.Thread] = set()
_pending_lock = threading.Lock()


def _in_background(cleanup: contextlib.ExitStack) -> None:
    """Reap the call's processes, unmount and remove its files, free its uid: in a thread,
    so however much the code left behind the call itself has already returned."""

    def work() -> None:
        try:
            cleanup.close()
        except Exception:
            log.exception("sandbox cleanup failed (a later start sweeps what is left)")
        finally:
            with _pending_lock:
                _pending.discard(thread)

    thread = threading.Thread(target=work, name="forge-sandbox-cleanup", daemon=True)
    with _pending_lock:
        _pending.add(thread)
    thread.start()


def wait_for_cleanup(timeout_s: float = 30.0) -> bool:
    """Wait until every finished call's cleanup is done; False if some still run."""
    deadline = time.monotonic() + timeout_s
    while True:
        with _pending_lock:
            threads = list(_pending)
        if not threads:
            return True
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0.0))
        if time.monotonic() >= deadline:
            with _pending_lock:
                return not _pending


atexit.register(wait_for_cleanup)
