"""`forge env check` in a child process, watched from outside: an env call stuck in C code
that holds the GIL stops every thread of its own process, the check's watch included.

The child runs the check as usual and tells this process each check and each env call
as it happens (JSON lines on a pipe); a call that outlasts the timeout, the child's own
watch and a grace period gets the child ended and the call reported as failed.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from forge.env.check import (
    HUNG_GRACE_S,
    Check,
    CheckReport,
    add_check_arguments,
    check_env,
    hung_check,
    list_envs,
)

OUTSIDE_GRACE_S = 3.0  # past the child's own watch, which reports what it can itself
STDERR_FD = 2  # the descriptor, not sys.stderr: that may be an object with none (a test's capture)


def main(argv: list[str] | None = None) -> int:
    """`forge env` as a function: `list`, or `check NAME [--kwargs JSON] [--tasks PATH] ...`."""
    import argparse

    parser = argparse.ArgumentParser(prog="forge env", description="list installed envs or check one")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="installed envs (entry point group forge.envs)")
    add_check_arguments(sub.add_parser("check", help="run the env contract check"))
    args = parser.parse_args(argv)
    if args.command == "list":
        print(list_envs())
        return 0
    return run_check_command(args)


def run_check_command(args: Any) -> int:
    """`forge env check NAME ...`: print the report; 0 when every check passed."""
    if args.kwargs is not None:
        try:
            json.loads(args.kwargs)
        except json.JSONDecodeError as exc:
            print(f"--kwargs must be a JSON object, e.g. '{{\"n\": 8}}' ({exc})")
            return 2
    from forge.env.tokens import check_model_folder

    check_model_folder(model_path_of(args))  # said here, as the command's error, not as a check's
    report = check_in_child_process(args)
    print(report.render())
    return 0 if report.passed else 1


def check_from_arguments(args: Any, sink: Callable[[dict[str, Any]], None] | None = None) -> CheckReport:
    """The check `forge env check`'s arguments ask for, with the tokenizer they name."""
    from forge.config import ConfigError
    from forge.env.check import Check, CheckReport
    from forge.env.registry import resolve_env
    from forge.env.tokens import load_check_tokenizer

    try:
        resolve_env(args.name)
    except ValueError:  # the check's one failed line says so: no tokenizer to load (seconds) first
        return check_env(args.name, sink=sink)
    cfg = _config(args)
    extra_words = cfg.model.tiny.extra_words if cfg is not None else ()
    try:
        tokenizer, name = load_check_tokenizer(model_path_of(args), extra_words)
    except ConfigError as exc:  # a folder without a usable tokenizer: one failed check, not a traceback
        report = CheckReport(args.name, sink=sink)
        report.add(
            Check("tokenizer", False, str(exc), "--model, or --config's model.path, names that folder")
        )
        return report
    return check_env(
        args.name,
        kwargs_of(args),
        tasks=cfg.env.tasks if args.tasks is None and _configs_env(args, cfg) else args.tasks,
        seed=args.seed,
        timeout_s=args.timeout,
        tokenizer=(name, tokenizer),
        sink=sink,
    )


def _config(args: Any) -> Any:
    """The --config's settings, or None without one."""
    if not args.config:
        return None
    from forge.config import load_config

    return load_config(args.config, [])


def _configs_env(args: Any, cfg: Any) -> bool:
    """Whether the env checked is the one `cfg` trains (whose env.kwargs and env.tasks apply)."""
    if cfg is None:
        return False
    if args.name == cfg.env.name:
        return True
    from forge.env.registry import resolve_env

    try:
        return resolve_env(args.name) is resolve_env(cfg.env.name)
    except ValueError:  # either does not resolve: the check itself reports the checked one
        return False


def kwargs_of(args: Any) -> dict[str, Any]:
    """The env's constructor arguments: --kwargs, else the --config's env.kwargs (what a run
    builds the env with) when the env checked is the config's, else none."""
    if args.kwargs is not None:
        return json.loads(args.kwargs)
    cfg = _config(args)
    return dict(cfg.env.kwargs) if _configs_env(args, cfg) else {}


def model_path_of(args: Any) -> str | None:
    """The model whose tokenizer is checked: --model, else the --config's model.path (None:
    the built-in tiny model, built with the config's model.tiny.extra_words)."""
    if args.model is None and args.config:
        return _config(args).model.path
    return args.model


def child_arguments(args: Any) -> list[str]:
    """`args` (`forge env check`'s) as the child's command line."""
    argv = [args.name, "--seed", str(args.seed), "--timeout", repr(args.timeout)]
    flags = (
        ("--kwargs", args.kwargs),
        ("--tasks", args.tasks),
        ("--model", args.model),
        ("--config", args.config),
    )
    for flag, value in flags:
        if value is not None:
            argv += [flag, str(value)]
    return argv


def check_in_child_process(args: Any) -> CheckReport:
    """Run the check `args` ask for in a child process and return its report; a child stuck
    in one env call past `args.timeout` + grace is killed and that call reported failed."""
    read_fd, write_fd = os.pipe()
    command = [sys.executable, "-m", "forge.env.check_process", str(write_fd), *child_arguments(args)]
    # The child finds the env's module where this process would (the working directory, a
    # folder a caller put on sys.path).
    path = os.pathsep.join([entry or os.getcwd() for entry in sys.path] + [os.environ.get("PYTHONPATH", "")])
    # The child's stdout is this process's stderr: stdout carries the report alone (`forge env
    # check NAME | grep FAIL`), and an env's own prints (a user debugging it) still show.
    child = subprocess.Popen(
        command, pass_fds=(write_fd,), env={**os.environ, "PYTHONPATH": path}, stdout=STDERR_FD
    )
    os.close(write_fd)
    report = CheckReport(args.name)
    in_call: tuple[str, str, bool, float] | None = None  # (check, method, inline, started)
    limit_s = args.timeout + HUNG_GRACE_S + OUTSIDE_GRACE_S
    pending = b""
    try:
        while True:
            if select.select([read_fd], [], [], 0.1)[0]:
                chunk = os.read(read_fd, 1 << 16)
                if not chunk:  # the child is done (or died)
                    break
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    event = json.loads(line)
                    if "check" in event:
                        report.checks.append(Check(*event["check"]))
                    elif event["call"] is None:
                        in_call = None
                    else:
                        in_call = (*event["call"], time.monotonic())
            if in_call is not None and time.monotonic() - in_call[3] > limit_s:
                child.kill()
                name, method, inline, _ = in_call
                report.checks.append(hung_check(name, method, args.timeout, inline, held_gil=True))
                break
    finally:
        os.close(read_fd)
        code = child.wait()
    if code not in (0, -9) and report.passed:
        report.checks.append(
            Check("check", False, f"the check's process ended with exit code {code}", "see its output above")
        )
    return report


def child_main(argv: list[str]) -> int:
    """The child: run the check and write each event to the file descriptor `argv[0]`."""
    import argparse

    events = os.fdopen(int(argv[0]), "w", buffering=1)

    def sink(event: dict[str, Any]) -> None:
        events.write(json.dumps(event) + "\n")

    parser = argparse.ArgumentParser(prog="forge env check")
    add_check_arguments(parser)
    check_from_arguments(parser.parse_args(argv[1:]), sink)
    events.close()
    sys.stdout.flush()
    sys.stderr.flush()
    # The check may leave a stuck env call behind in a daemon thread: end now rather than
    # wait for it at interpreter shutdown.
    os._exit(0)


if __name__ == "__main__":
    raise SystemExit(child_main(sys.argv[1:]))
