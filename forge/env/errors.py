"""An env's exception as a person can act on it: the message and the user's own frame
(file:line), found under Forge's, asyncio's and the thread hand-off's frames."""

from __future__ import annotations

import inspect
import os
import sys
import sysconfig
import traceback
from typing import Any

import forge

_FORGE_DIR = os.path.dirname(os.path.abspath(forge.__file__)) + os.sep
_PYTHON_DIRS = tuple(
    os.path.abspath(path) + os.sep
    for path in {
        sysconfig.get_paths()["stdlib"],
        sysconfig.get_paths()["platstdlib"],
        sys.prefix,
        sys.base_prefix,
    }
)


def is_harness(filename: str) -> bool:
    """Frames of Forge itself or of Python's own library (asyncio, threading)."""
    path = os.path.abspath(filename)
    if path.startswith(_FORGE_DIR):
        return True
    return path.startswith(_PYTHON_DIRS) and "site-packages" not in path


class EnvContractError(TypeError):
    """An env method returned the wrong type; `method` is the method, so the report can
    point at its definition (no frame of the user's raised it)."""

    def __init__(self, message: str, method: Any) -> None:
        super().__init__(message)
        self.method = method


def _definition(method: Any) -> traceback.FrameSummary | None:
    code = getattr(getattr(method, "__func__", method), "__code__", None)
    if code is None:
        return None
    return traceback.FrameSummary(code.co_filename, code.co_firstlineno, code.co_name, lookup_line=False)


def user_frame(exc: BaseException, env: Any = None) -> traceback.FrameSummary | None:
    """The innermost frame in the source file of `env` (an env, or its class), else the
    innermost frame outside Forge and the standard library (a library the env called),
    else None. For a call given up on at a time limit: where it was stuck, when known."""
    if isinstance(exc, EnvContractError):
        return _definition(exc.method)
    stuck = getattr(exc, "stuck_at", None)  # forge.env.calls.EnvTimeout
    if stuck is not None:
        return stuck
    frames = traceback.extract_tb(exc.__traceback__)
    env_file = None
    if env is not None:
        try:
            env_file = os.path.abspath(inspect.getfile(env if isinstance(env, type) else type(env)))
        except (TypeError, OSError):
            env_file = None
    # An env class of Forge's own (a sub-agent's `SubagentEnv`, a latency wrapper) wraps the
    # user's env: its frames are the harness's, so look outside Forge instead.
    if env_file is not None and not is_harness(env_file):
        own = [f for f in frames if os.path.abspath(f.filename) == env_file]
        if own:
            return own[-1]
    outside = [f for f in frames if not is_harness(f.filename)]
    return outside[-1] if outside else None


def describe_env_error(exc: BaseException, env: Any = None) -> str:
    """`Type: message`, then `  at FILE:LINE in FUNCTION` (the user's frame, when there is
    one), then the whole traceback. `error_kind` reads the first two lines back."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    lines = [f"{type(exc).__name__}: {message}" if message else type(exc).__name__]
    frame = user_frame(exc, env)
    if frame is not None:
        lines.append(f"  at {frame.filename}:{frame.lineno} in {frame.name}")
    lines.append("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip())
    return "\n".join(lines)


def error_kind(error: str) -> str:
    """What makes two episode errors the same failure: the exception type and where it was
    raised (not the message, which often names the task)."""
    lines = error.splitlines() or [""]
    kind = lines[0].split(":", 1)[0]
    if len(lines) > 1 and lines[1].startswith("  at "):
        kind += lines[1]
    return kind


def error_headline(error: str) -> str:
    """The message and the user's frame, on one line."""
    lines = error.splitlines() or [""]
    headline = lines[0]
    if len(lines) > 1 and lines[1].startswith("  at "):
        headline += f" ({lines[1].strip()})"
    return headline
