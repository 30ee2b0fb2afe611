"""Trusted launcher: applies rlimits, drops privileges, then execs the sandboxed command.

Run by `forge.sandbox.run` as `python -I -S _launch.py SPEC_JSON` so that every privileged
step happens in a fresh process, never in the caller (which may be a threaded Ray actor,
where `preexec_fn` is unsafe). Standard library only; it must start fast.
"""

import ctypes
import json
import os
import resource
import signal
import sys

PR_SET_PDEATHSIG = 1

RLIMITS = {
    "cpu": resource.RLIMIT_CPU,
    "as": resource.RLIMIT_AS,
    "fsize": resource.RLIMIT_FSIZE,
    "nofile": resource.RLIMIT_NOFILE,
    "nproc": resource.RLIMIT_NPROC,
    "core": resource.RLIMIT_CORE,
}


def _set_limit(name: str, value: int) -> None:
    which = RLIMITS[name]
    _, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY and os.getuid() != 0:
        value = min(value, hard)
    resource.setrlimit(which, (value, value))


def main() -> None:
    spec = json.loads(sys.argv[1])
    parent = os.getppid()
    for name, value in spec["rlimits"].items():
        _set_limit(name, int(value))
    uid = spec.get("uid")
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    # Set after the uid change: the kernel clears the parent-death signal on credential changes.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the harness died before we armed the signal
        os._exit(137)
    os.umask(0o022)
    os.chdir(spec["cwd"])
    argv = spec["argv"]
    os.execvpe(argv[0], argv, spec["env"])


if __name__ == "__main__":
    main()
