"""Trusted launcher: applies rlimits, drops privileges, then execs the sandboxed command
(levels 0 and 2) or builds level 1's namespaces itself (`_namespace`).

Run by `forge.sandbox.run` as `python -I -S _launch.py SPEC_JSON` so that every privileged
step happens in a fresh process, never in the caller (which may be a threaded Ray actor,
where `preexec_fn` is unsafe). Standard library only; it must start fast.
`python -I -S _launch.py kill UID` kills every process of a sandbox uid (as root).

With `supervise` (level 0 under a root harness) the launcher forks: the child becomes the
sandbox, and the launcher stays behind as root to kill every process of the sandbox uid
if the harness dies, since without a pid namespace nothing else would reap daemons then.
"""

import json
import os
import resource
import signal
import sys

# -I leaves this file's directory off sys.path; the helpers beside it are standard library only.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _namespace  # noqa: E402  (imported now: after the uid drop the stdlib may be out of reach)
import _syscalls  # noqa: E402

RLIMITS = {
    "cpu": resource.RLIMIT_CPU,
    "as": resource.RLIMIT_AS,
    "fsize": resource.RLIMIT_FSIZE,
    "nofile": resource.RLIMIT_NOFILE,
    "nproc": resource.RLIMIT_NPROC,
    "core": resource.RLIMIT_CORE,
}


def _set_limit(name, value):
    which = RLIMITS[name]
    _, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY and os.getuid() != 0:
        value = min(value, hard)
    resource.setrlimit(which, (value, value))


def _die_with(parent, sig):
    _syscalls.prctl(_syscalls.PR_SET_PDEATHSIG, sig)
    if os.getppid() != parent:  # the parent died before the signal was armed
        os.kill(os.getpid(), sig)


def _become_sandbox(spec, parent):
    for name, value in spec["rlimits"].items():
        _set_limit(name, int(value))
    uid = spec.get("uid")
    # Level 1 as root keeps root until its namespaces are built: the code's process drops it.
    if uid is not None and not (spec.get("level") == 1 and spec["ns"].get("as_root")):
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    # Armed after the uid change: the kernel clears the parent-death signal on credential changes.
    _die_with(parent, signal.SIGKILL)
    if spec.get("level") == 1:
        _namespace.run(spec, parent)
    os.umask(0o022)
    os.chdir(spec["cwd"])
    argv = spec["argv"]
    os.execvpe(argv[0], argv, spec["env"])


def _live_processes_of(uid):
    count = 0
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.stat("/proc/" + entry).st_uid == uid:
                with open("/proc/" + entry + "/stat", "rb") as f:
                    count += f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
        except (OSError, IndexError):
            continue
    return count


def _kill_uid(uid, passes=50):
    for _ in range(passes):
        if not _live_processes_of(uid):
            return
        pid = os.fork()
        if pid == 0:
            try:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
                os.kill(-1, signal.SIGKILL)  # every process of uid, atomically w.r.t. fork
            finally:
                os._exit(0)
        os.waitpid(pid, 0)


def _supervise(spec, parent):
    sandbox_pid = os.fork()
    if sandbox_pid == 0:
        _become_sandbox(spec, os.getppid())
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 1)  # leave the output pipes to the sandbox alone
    os.dup2(devnull, 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    def harness_died(signum, frame):
        _kill_uid(spec["uid"])
        os._exit(137)

    signal.signal(signal.SIGTERM, harness_died)
    _die_with(parent, signal.SIGTERM)
    _, status = os.waitpid(sandbox_pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code < 0:  # die the same way, so the harness sees the signal
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code)


def main():
    if sys.argv[1] == "kill":  # kill UID PASSES
        _kill_uid(int(sys.argv[2]), int(sys.argv[3]))
        return
    spec = json.loads(sys.argv[1])
    parent = os.getppid()
    # The call's cgroups, joined before anything forks: every process of the call is in them.
    for procs in spec.get("cgroups", ()):
        try:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
        except OSError as error:
            os.write(2, f"forge sandbox: cannot join the call's cgroup {procs}: {error}\n".encode())
            os._exit(126)
    if spec.get("supervise"):
        _supervise(spec, parent)
    else:
        _become_sandbox(spec, parent)


if __name__ == "__main__":
    main()
