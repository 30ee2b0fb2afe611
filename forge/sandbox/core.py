"""`run`: execute untrusted python or shell code in a fresh subprocess under the strongest
isolation level the host offers, and return what it printed and wrote."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from forge.sandbox import isolation, uids

Language = Literal["python", "shell"]
LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_launch.py")
# After the main process exits, how long daemons holding its pipes may keep us reading.
EXIT_GRACE_S = 0.2


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


@dataclass
class SandboxResult:
    stdout: str
    stderr: str
    exit_code: int  # killed by signal N: -N at level 0, 128+N at levels 1-2 (as a shell reports it)
    timed_out: bool
    output_truncated: bool
    level: int
    wall_seconds: float
    files: dict[str, str] = field(default_factory=dict)  # the `collect` paths that were regular files
    uid: int | None = None  # host uid the code ran as (root harness only), for audits

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and not self.output_truncated


def _work_dir(uid: int | None) -> str:
    path = tempfile.mkdtemp(prefix="forge-sandbox-", dir=isolation.work_root(uid))
    if uid is not None:
        os.chown(path, uid, uid)
    os.chmod(path, 0o700)
    return path


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


@contextlib.contextmanager
def _maybe_uid() -> Iterator[int | None]:
    if uids.is_root():
        with uids.sandbox_uid() as uid:
            yield uid
    else:
        yield None


def _kill_tree(proc: subprocess.Popen, uid: int | None) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # own session: start_new_session made pgid == pid
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    if uid is not None:
        uids.kill_all_of(uid)  # daemons that called setsid() left our process group
    proc.wait()


def _pump(proc: subprocess.Popen, deadline: float, cap: int) -> tuple[bytes, bytes, bool, bool]:
    """Read both pipes until EOF, the deadline, or more than `cap` bytes on one stream."""
    buffers = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    sel = selectors.DefaultSelector()
    for stream in buffers:
        os.set_blocking(stream.fileno(), False)
        sel.register(stream, selectors.EVENT_READ)
    timed_out = truncated = False
    exited_at: float | None = None
    try:
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                timed_out = True
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
    return out, err, timed_out, truncated


def run(
    code: str,
    language: Language = "python",
    *,
    files: dict[str, str | bytes] | None = None,
    collect: tuple[str, ...] | list[str] = (),
    timeout_s: float = 10.0,
    limits: Limits | None = None,
    min_level: int = 0,
    level: int | None = None,
    env: dict[str, str] | None = None,
) -> SandboxResult:
    """Run `code` as `main.py` (python) or `main.sh` (shell) in a fresh work dir with `files`.

    `level` forces an isolation level (it must be available); by default the strongest level
    the probe found is used. Raises SandboxUnavailable when that is below `min_level`.
    After the run, paths in `collect` that are regular files are returned in `files`.
    """
    from forge.sandbox.levels import available_level, min_level_floor

    limits = limits or Limits()
    min_level = max(min_level, min_level_floor())
    best = available_level()
    chosen = best if level is None else level
    if chosen > best:
        raise SandboxUnavailable(
            f"sandbox level {chosen} was requested but this host offers only level {best}"
        )
    if chosen < min_level:
        raise SandboxUnavailable(
            f"sandbox.min_level={min_level} but this host offers level {best} "
            f"({isolation.LEVEL_NAMES[best]}); see forge.sandbox.require_level for how to enable more"
        )
    return _run_at(code, language, files or {}, tuple(collect), timeout_s, limits, chosen, env)


def _run_at(
    code: str,
    language: Language,
    files: dict[str, str | bytes],
    collect: tuple[str, ...],
    timeout_s: float,
    limits: Limits,
    level: int,
    extra_env: dict[str, str] | None,
) -> SandboxResult:
    started = time.monotonic()
    with _maybe_uid() as uid:
        work_dir = _work_dir(uid)
        try:
            python = isolation.python_for(uid)
            argv, entry = _command(language, code, work_dir, python)
            _write_files(work_dir, {**files, **entry}, uid)
            env = _scrubbed_env(work_dir, extra_env)
            if level == 1:
                argv = isolation.unshare_argv(python) + argv
            elif level == 2:
                argv = isolation.bwrap_argv(work_dir, python, env) + argv
            spec = {
                "rlimits": _rlimits(limits, timeout_s, uid),
                "uid": uid,
                "cwd": work_dir,
                "argv": argv,
                "env": env,
                "supervise": level == 0 and uid is not None,
            }
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", LAUNCHER, json.dumps(spec)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                close_fds=True,
                env={},
            )
            try:
                deadline = started + timeout_s
                out, err, timed_out, truncated = _pump(proc, deadline, limits.output_bytes)
                if not (timed_out or truncated):
                    # The pipes closed; the run lasts until the main process exits too.
                    try:
                        proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
                    except subprocess.TimeoutExpired:
                        timed_out = True
            finally:
                _kill_tree(proc, uid)
                proc.stdout.close()
                proc.stderr.close()
            exit_code = proc.returncode
            collected = {}
            for name in collect:
                content = _read_back(work_dir, name, limits.output_bytes)
                if content is not None:
                    collected[name] = content
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
    return SandboxResult(
        stdout=out.decode("utf-8", errors="replace"),
        stderr=err.decode("utf-8", errors="replace"),
        exit_code=exit_code,
        timed_out=timed_out,
        output_truncated=truncated,
        level=level,
        wall_seconds=time.monotonic() - started,
        files=collected,
        uid=uid,
    )


async def arun(code: str, language: Language = "python", **kwargs) -> SandboxResult:
    """`run` from async code without blocking the event loop."""
    return await asyncio.to_thread(run, code, language, **kwargs)
