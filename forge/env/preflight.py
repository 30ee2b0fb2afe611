"""Before any actor starts: resolve the configured env, build it with its kwargs and reset
one task, so a wrong name, wrong kwargs or a broken `reset` stop the run with one message."""

from __future__ import annotations

import inspect
import threading
from typing import Any

from forge.config import ConfigError, EnvConfig
from forge.env.base import Env
from forge.env.calls import call_sync
from forge.env.errors import describe_env_error, error_headline
from forge.env.registry import resolve_env
from forge.env.tasks import load_tasks


class EnvPreflightError(ConfigError):
    """The configured env cannot play an episode; the message says what to fix."""


def _kwargs_problem(env_class: type[Env], kwargs: dict[str, Any]) -> str | None:
    try:
        signature = inspect.signature(env_class)
    except (TypeError, ValueError):  # a builtin or C-level __init__: let construction tell
        return None
    try:
        signature.bind(**kwargs)
    except TypeError as exc:
        takes = [
            name
            for name, p in signature.parameters.items()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        return (
            f"env.kwargs={kwargs!r} do not fit {env_class.__name__}({', '.join(takes)}): {exc}; "
            "set env.kwargs to the arguments its __init__ takes"
        )
    return None


def _in_thread(function: Any, *args: Any, timeout_s: float) -> Any:
    """`function(*args)` in a daemon thread (so a hung call costs one thread, not the
    process); raises TimeoutError past `timeout_s`, or what the call raised."""
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["value"] = call_sync(function, *args)
        except BaseException as exc:  # handed back to the caller
            outcome["error"] = exc

    thread = threading.Thread(target=work, name="forge-env-preflight", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"did not return within {timeout_s:g}s (env.step_timeout_s)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def preflight_env(env_cfg: EnvConfig, seed: int) -> str:
    """Build the env of `env_cfg` and reset it on the first task; a one-line summary, or
    `EnvPreflightError` naming the setting or the user's code (file:line) to fix."""
    try:
        env_class = resolve_env(env_cfg.name)
    except ValueError as exc:
        raise EnvPreflightError(f"env.name: {exc}") from None
    name = env_class.__name__
    problem = _kwargs_problem(env_class, dict(env_cfg.kwargs))
    if problem:
        raise EnvPreflightError(problem)
    try:
        tasks = load_tasks(env_class, env_cfg.tasks, env_cfg.num_tasks, seed, **env_cfg.kwargs)
    except Exception as exc:
        source = f"env.tasks={env_cfg.tasks!r}" if env_cfg.tasks else f"{name}.generate_tasks"
        raise EnvPreflightError(f"{source}: {error_headline(describe_env_error(exc))}") from None
    task = dict(tasks[0])
    try:
        env = env_class(**env_cfg.kwargs)
    except Exception as exc:
        raise EnvPreflightError(
            f"{name}(**env.kwargs={env_cfg.kwargs!r}) raised {error_headline(describe_env_error(exc))}"
        ) from None
    try:
        observation = _in_thread(env.reset, task, seed, timeout_s=env_cfg.step_timeout_s)
    except Exception as exc:
        raise EnvPreflightError(
            f"{name}.reset on task {task.get('task_id')!r} raised {error_headline(describe_env_error(exc, env))}"
        ) from None
    finally:
        try:
            _in_thread(env.close, timeout_s=env_cfg.step_timeout_s)
        except Exception:  # a failing close is `forge env check`'s to report, not a reason to stop
            pass
    if not isinstance(observation, str):
        code = env.reset.__func__.__code__ if hasattr(env.reset, "__func__") else None
        where = f" ({code.co_filename}:{code.co_firstlineno})" if code else ""
        raise EnvPreflightError(
            f"{name}.reset returned {type(observation).__name__}, expected str{where}: return the first "
            "observation as text the model reads"
        )
    return (
        f"env {env_cfg.name}: built {name}(**{env_cfg.kwargs!r}), {len(tasks)} tasks, reset on task "
        f"{task.get('task_id')!r} returned {len(observation)} chars"
    )
