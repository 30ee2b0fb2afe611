"""Task environments: the `Env` contract, the registry, task sources."""

from forge.env.base import Env, StepResult
from forge.env.registry import registered_envs, resolve_env

__all__ = ["Env", "StepResult", "registered_envs", "resolve_env"]
