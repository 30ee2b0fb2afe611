"""A watcher process that says in words why a `LoopGuard` (`forge.rollout.stuck`) ended the
process it guards: the guard's exit runs no Python code, so that process cannot.

`StuckWatcher` starts it; it waits until the guarded process ends (end of file on a pipe
whose only writer that process holds, however it ends) and, if the guard's report fired,
prints which env call was stuck and where (`stuck_message`) to the stderr they share. When
that process ended without letting the watcher go (its guard fired, or it was killed: out of
memory, `kill -9`), the watcher then ends what it started and left running: every process
carrying its `RUN_MARK` (a local Ray's, the gateway's agents), after `LEFTOVER_GRACE_S` to
end on their own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import forge
from forge.env.output import console
from forge.rollout.stuck import StuckReport, read_stuck_report

# The environment variable whose value marks the processes a run started (set before a
# local Ray starts, so all of Ray's processes and the agents inherit it).
RUN_MARK = "FORGE_RUN_MARK"
LEFTOVER_GRACE_S = 3.0
LET_GO = b"done"  # what a process that ends normally writes to its watcher


class StuckWatcher:
    """The watcher of this process's guard, whose report goes to `report_path`; `what` names
    the process in the message ("the gateway run") and `on_loop` says why a call stuck on
    its event loop stopped it. `env_file` is the env class's source file, whose frames the
    message names (None when unknown)."""

    def __init__(
        self,
        report_path: Path,
        env_name: str,
        env_file: str | None,
        step_timeout_s: float,
        what: str,
        on_loop: str,
    ) -> None:
        read_end, self._alive = os.pipe()  # this process holds the only write end until it ends
        argv = [
            str(read_end),
            str(report_path),
            env_name,
            env_file or "",
            repr(step_timeout_s),
            what,
            on_loop,
            own_mark(),
        ]
        # The watcher imports this Forge, wherever this process found it.
        path = os.pathsep.join([str(Path(forge.__file__).parent.parent), os.environ.get("PYTHONPATH", "")])
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "forge.rollout.stuck_watch", *argv],
                pass_fds=(read_end,),
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": path},
            )
        finally:
            os.close(read_end)

    def close(self) -> None:
        """Let the watcher go (this process is ending normally) and wait for it."""
        if self._alive < 0:
            return
        os.write(self._alive, LET_GO)  # an ending it was told of: nothing to clean up
        os.close(self._alive)
        self._alive = -1
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def own_mark() -> str:
    """This process's `RUN_MARK` value, or "" when it set none (one inherited from the
    process that started it marks that process's own, which must not be ended)."""
    mark = os.environ.get(RUN_MARK, "")
    return mark if mark.startswith(f"{os.getpid()}-") else ""


def env_source_file(env_class: type) -> str | None:
    """The env class's source file, whose frames a stuck report names; None for one of
    Forge's own (the gymnasium adapter: the user's code is what it calls) or none at all."""
    import inspect

    from forge.env.errors import is_harness

    try:
        path = inspect.getfile(env_class)
    except (TypeError, OSError):  # a class defined where no file is (a REPL)
        return None
    return None if is_harness(path) else path


def stuck_message(report: StuckReport, env_name: str, step_timeout_s: float, what: str, on_loop: str) -> str:
    """What the console says when a guard ended `what` (`report` is the guard's report;
    `on_loop` says why a call stuck on the guarded event loop stopped everything)."""
    limit = f"env.step_timeout_s={step_timeout_s:g}"
    stacks = f"All threads' stacks: {report.path}"
    if report.call is None:
        thread = "its event loop" if report.on_loop else "a thread (one held the GIL)"
        return (
            f"forge: {what} was ended (exit code 1): its event loop did not run for {report.seconds:g}s "
            f"(env {env_name}, {limit}); the innermost frame outside Forge and Python's library, on "
            f"{thread}, was {report.where}. Code that holds the GIL that long (C code that does not "
            f"release it) stops every thread of the process. {stacks}"
        )
    why = (
        on_loop
        if report.on_loop
        else "it ran in a thread inside C code that holds the GIL (a backtracking regex, a C extension's "
        "loop), which stops every thread of the process, so the call could not be abandoned at its time limit"
    )
    return (
        f"forge: {what} was ended (exit code 1): the env call {report.call}() was stuck for {report.seconds:g}s "
        f"at {report.where} (env {env_name}, {limit}): {why}. Make that code finish within {limit}, or "
        f"release the GIL while it runs (or run it in a subprocess). {stacks}"
    )


def watch(argv: list[str]) -> int:
    """The watcher: wait until the guarded process ends (end of file on the pipe `argv[0]`),
    print the message if its guard's report `argv[1]` fired, and end its leftovers unless it
    let the watcher go."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the guarded process, which then lets go
    alive, report_path, env_name, env_file, step_timeout_s, what, on_loop, mark = argv
    with os.fdopen(int(alive), "rb") as pipe:
        let_go = pipe.read() == LET_GO
    report = read_stuck_report(report_path, env_file or None)
    if report is not None:
        message = stuck_message(report, env_name, float(step_timeout_s), what, on_loop)
        print(message, file=console(), flush=True)
    if mark and not let_go:
        ended = end_marked(f"{RUN_MARK}={mark}", LEFTOVER_GRACE_S)
        if ended and report is None:  # killed from outside: say what became of its processes
            print(
                f"forge: {what} ended without shutting down (killed, or out of memory?); ended the "
                f"{len(ended)} processes it left running (Ray's, the agents')",
                file=console(),
                flush=True,
            )
    return 0


def marked_processes(mark: str) -> list[int]:
    """Processes (but this one) whose environment holds `mark` ("NAME=VALUE"); Linux only."""
    found = []
    entry = mark.encode() + b"\0"
    for name in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as environ:
                if (b"\0" + environ.read()).find(b"\0" + entry) >= 0:
                    found.append(int(name))
        except OSError:  # ended meanwhile, or not ours to read
            pass
    return found


# After the kill, the processes holding the mark are looked for again this many times, 0.2 s
# apart: one started while the others were listed (a Ray node still starting a process when
# its driver ended) is not in that list. (Ray's agents once outlived a run for another reason:
# their titles had overwritten the mark; `forge.run.cluster` sets SPT_NOENV against that.)
KILL_ROUNDS = 5


def end_marked(mark: str, grace_s: float) -> list[int]:
    """Let the processes holding `mark` end on their own for `grace_s`, then kill the rest,
    and any found after them. Returns those killed."""
    deadline = time.monotonic() + grace_s
    while (left := marked_processes(mark)) and time.monotonic() < deadline:
        time.sleep(0.2)
    killed: list[int] = []
    for _ in range(KILL_ROUNDS):
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        killed += [pid for pid in left if pid not in killed]
        time.sleep(0.2)
        left = [pid for pid in marked_processes(mark) if pid not in killed]
        if not left:
            break
    return killed


if __name__ == "__main__":
    raise SystemExit(watch(sys.argv[1:]))
