"""Task environments: the `Env` contract, the registry, task sources."""

from forge.env.base import Env, StepResult
from forge.env.calls import EnvTimeout, call_env
from forge.env.registry import registered_envs, resolve_env
from forge.env.tasks import load_tasks
from forge.env.tools import ToolCall, ToolEnv, parse_tool_calls, tool

__all__ = [
    "Env",
    "EnvTimeout",
    "StepResult",
    "ToolCall",
    "ToolEnv",
    "call_env",
    "load_tasks",
    "parse_tool_calls",
    "registered_envs",
    "resolve_env",
    "tool",
]
