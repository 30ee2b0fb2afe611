"""Before any actor starts: resolve the configured env, build it with its kwargs and reset
one task, so a wrong name, wrong kwargs or a broken `reset` stop the run with one message."""

from __future__ import annotations

import faulthandler
import inspect
import sys
import threading
from typing import Any

from forge.config import ConfigError, EnvConfig
from forge.env.base import Env, reset_problem
from forge.env.calls import EnvTimeout, ThreadCall, call_sync
from forge.env.errors import describe_env_error, error_headline
from forge.env.registry import resolve_env
from forge.env.tasks import as_dataset, generated_rows, load_tasks

GIL_GRACE_S = 5.0  # past env.step_timeout_s: a call that kept this thread waiting holds the GIL


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


def text_problem(env: Env) -> str | None:
    """What is wrong with the env's `system_prompt` or `tools`, which every episode renders
    through the chat template (a wrong type there would error every episode in Forge's code)."""
    prompt = getattr(env, "system_prompt", None)
    if prompt is not None and not isinstance(prompt, str):
        return f"system_prompt is {type(prompt).__name__}, expected str or None: the text shown before the first observation"
    tools = getattr(env, "tools", None)
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        return f"tools is {type(tools).__name__}, expected a list of OpenAI-style function schemas (dicts) or None"
    return None


def tool_schema_problem(tools: list[dict[str, Any]]) -> str | None:
    """What keeps a list of tool schemas from being OpenAI function schemas, which every
    episode renders and every tool call is looked up in (a bare {name, parameters} schema,
    the legacy or another API's shape, erred every episode whose reply called a tool)."""
    for index, schema in enumerate(tools):
        function = schema.get("function")
        if (
            schema.get("type") != "function"
            or not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
        ):
            shape = (
                f" (it has {', '.join(map(repr, schema))}: put them under 'function')"
                if "name" in schema
                else ""
            )
            return (
                f"tools[{index}] is not an OpenAI function schema{shape}: each needs "
                '{"type": "function", "function": {"name": ..., "description": ..., "parameters": {...}}}, '
                "as forge.env.tool builds on a ToolEnv method"
            )
        if function.get("parameters", {}).get("type") != "object":
            return f"tools[{index}] ({function['name']}): parameters must be a JSON schema of type 'object'"
    return None


def _in_thread(function: Any, *args: Any, timeout_s: float) -> Any:
    """`function(*args)` in a daemon thread (so a hung call costs one thread, not the
    process); raises `EnvTimeout` (where the call was stuck) past `timeout_s`, or what the
    call raised. A call given up on is stopped like every env call (`ThreadCall`: one
    looping in Python ends at once, one in C code when that returns). C code that holds the
    GIL stops this thread's wait too: past the limit and `GIL_GRACE_S`, faulthandler (a C
    thread) ends the process with every thread's stack."""
    outcome: dict[str, Any] = {}
    call = ThreadCall()

    def work() -> None:
        try:
            outcome["value"] = call.run(call_sync, function, *args)
        except BaseException as exc:  # handed back to the caller (Abandoned: to nobody)
            outcome["error"] = exc

    thread = threading.Thread(target=work, name="forge-env-preflight", daemon=True)
    # The real stderr: faulthandler writes to a file descriptor, not to a replaced sys.stderr.
    faulthandler.dump_traceback_later(timeout_s + GIL_GRACE_S, exit=True, file=sys.__stderr__)
    try:
        thread.start()
        thread.join(timeout_s)
    finally:
        faulthandler.cancel_dump_traceback_later()
    if thread.is_alive():
        raise EnvTimeout(f"did not return within {timeout_s:g}s (env.step_timeout_s)", call.give_up())
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _generate(env_class: type[Env], env_cfg: EnvConfig, seed: int) -> list[dict[str, Any]]:
    return generated_rows(env_class, env_cfg.num_tasks, seed, **env_cfg.kwargs)


def _stuck_at(exc: EnvTimeout) -> str:
    frame = exc.stuck_at
    return f" (stuck at {frame.filename}:{frame.lineno} in {frame.name})" if frame is not None else ""


def preflight_env(env_cfg: EnvConfig, seed: int, first_prompt_check: Any = None) -> str:
    """Build the env of `env_cfg` and reset it on the first task; a one-line summary, or
    `EnvPreflightError` naming the setting or the user's code (file:line) to fix.
    `first_prompt_check(observation, system_prompt, tools)`, when given, is called on the
    reset's text (the model's side of it: `forge.env.tokens.first_prompt_check`)."""
    try:
        env_class = resolve_env(env_cfg.name)
    except ValueError as exc:
        raise EnvPreflightError(f"env.name: {exc}") from None
    name = env_class.__name__
    problem = _kwargs_problem(env_class, dict(env_cfg.kwargs))
    if problem:
        raise EnvPreflightError(problem)
    try:
        if env_cfg.tasks:  # a task file: data, not the env's code
            tasks = load_tasks(env_class, env_cfg.tasks, env_cfg.num_tasks, seed, **env_cfg.kwargs)
        else:
            # The env's own code, run in a thread: one that hangs is given up on with its line.
            rows = _in_thread(_generate, env_class, env_cfg, seed, timeout_s=env_cfg.tasks_timeout_s)
            tasks = as_dataset(rows)  # after the limit: the env's time is its own code's only
    except EnvTimeout as exc:
        raise EnvPreflightError(
            f"{name}.generate_tasks (env.num_tasks={env_cfg.num_tasks}) did not return within "
            f"{env_cfg.tasks_timeout_s:g}s (env.tasks_timeout_s){_stuck_at(exc)}: keep it quick, write the tasks "
            "to a file once and set env.tasks to it, or raise env.tasks_timeout_s"
        ) from None
    except Exception as exc:
        source = f"env.tasks={env_cfg.tasks!r}" if env_cfg.tasks else f"{name}.generate_tasks"
        raise EnvPreflightError(f"{source}: {error_headline(describe_env_error(exc))}") from None
    task = dict(tasks[0])
    try:
        env = _in_thread(lambda: env_class(**env_cfg.kwargs), timeout_s=env_cfg.step_timeout_s)
    except EnvTimeout as exc:
        raise EnvPreflightError(
            f"building {name}(**env.kwargs={env_cfg.kwargs!r}) took longer than {env_cfg.step_timeout_s:g}s "
            f"(env.step_timeout_s){_stuck_at(exc)}: a run gives building an env that long, like a step; keep "
            "__init__ quick (slow setup lazily or once per process) or raise env.step_timeout_s"
        ) from None
    except Exception as exc:
        raise EnvPreflightError(
            f"{name}(**env.kwargs={env_cfg.kwargs!r}) raised {error_headline(describe_env_error(exc))}"
        ) from None
    try:
        observation = _in_thread(env.reset, task, seed, timeout_s=env_cfg.step_timeout_s)
    except EnvTimeout as exc:
        raise EnvPreflightError(
            f"{name}.reset on task {task.get('task_id')!r} did not return within {env_cfg.step_timeout_s:g}s "
            f"(env.step_timeout_s){_stuck_at(exc)}"
        ) from None
    except Exception as exc:
        raise EnvPreflightError(
            f"{name}.reset on task {task.get('task_id')!r} raised {error_headline(describe_env_error(exc, env))}"
        ) from None
    finally:
        try:
            _in_thread(env.close, timeout_s=env_cfg.step_timeout_s)
        except Exception:  # a failing close is `forge env check`'s to report, not a reason to stop
            pass
    problem = reset_problem(observation, getattr(env, "system_prompt", None))
    if problem is not None:
        code = env.reset.__func__.__code__ if hasattr(env.reset, "__func__") else None
        where = f" ({code.co_filename}:{code.co_firstlineno})" if code else ""
        raise EnvPreflightError(
            f"{name}.reset {problem}{where}: return the first observation as text the model reads"
        )
    problem = text_problem(env)
    if problem:
        raise EnvPreflightError(f"{name}.{problem}")
    problem = tool_schema_problem(getattr(env, "tools", None) or [])
    if problem:
        raise EnvPreflightError(f"{name}.{problem}")
    if first_prompt_check is not None:
        first_prompt_check(observation, getattr(env, "system_prompt", None), getattr(env, "tools", None))
    return (
        f"env {env_cfg.name}: built {name}(**{env_cfg.kwargs!r}), {len(tasks)} tasks, reset on task "
        f"{task.get('task_id')!r} returned {len(observation)} chars"
    )
