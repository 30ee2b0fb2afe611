"""`run` / `arun`: execute untrusted python or shell code under the strongest isolation level
the host offers (or a forced one, never below the process's floor), and return what it printed
and wrote."""

from __future__ import annotations

import asyncio

from forge.sandbox import levels
from forge.sandbox.core import Language, Limits, SandboxResult, SandboxUnavailable, run_at


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
    python: str | None = None,
) -> SandboxResult:
    """Run `code` as `main.py` (python) or `main.sh` (shell) in a fresh work dir with `files`.

    `level` forces an isolation level (it must be available); by default the strongest level
    the probe found is used. Raises SandboxUnavailable when that is below `min_level` or the
    process's floor (`set_min_level`, `configure`). `python` is the interpreter for python
    code (default: the one `configure` set, else the harness's own), checked on first use.
    After the run, paths in `collect` that are regular files are returned in `files`.
    """
    limits = limits or Limits()
    best = levels.available_level()
    chosen = best if level is None else level
    if chosen > best:
        raise SandboxUnavailable(
            f"sandbox level {chosen} was requested but this host offers only level {best}"
        )
    levels.check_floor(chosen, min_level)
    interpreter = levels.interpreter(python)
    if language == "python":
        levels.check_python(chosen, interpreter)
    return run_at(code, language, files or {}, tuple(collect), timeout_s, limits, chosen, env, interpreter)


async def arun(code: str, language: Language = "python", **kwargs) -> SandboxResult:
    """`run` from async code without blocking the event loop."""
    return await asyncio.to_thread(run, code, language, **kwargs)
