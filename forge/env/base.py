"""The environment contract: subclass `Env`, implement `reset` and `step`.

Methods may be plain or `async def`; the harness awaits whichever it gets and enforces
step and episode timeouts itself, so an env never has to. Plain methods run in a thread
(so a blocking one stalls no other episode) unless the env sets `blocking = False`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StepResult:
    """What one env step returns; `info` is logged.

    Reward rule: an episode's outcome is the sum of the `reward`s of all its steps (an env
    that scores only the end returns 0.0 until the step that is `done`). Success is
    `info["success"]` when given, else outcome >= `reward.success_threshold`."""

    observation: str
    reward: float = 0.0
    done: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Gym-style code computes `reward` and `done` with numpy (`np.float32`, `np.all(...)`):
        # each stands for the Python number or bool it holds, which the contract check
        # (`step_problem`) and JSON (the gateway's answer to an agent's step) both take.
        self.reward = _plain(self.reward)
        self.done = _plain(self.done)


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value it holds (`.item()`); anything else as it is."""
    return (
        value.item() if type(value).__module__ == "numpy" and getattr(value, "shape", None) == () else value
    )


def reset_problem(observation: Any, system_prompt: Any) -> str | None:
    """What makes `reset`'s return break the contract (None: nothing). An empty first
    observation is fine after a system prompt that states the task; without one the model
    would be shown no task at all and the run would train on noise."""
    if not isinstance(observation, str):
        return f"returned {type(observation).__name__}, expected str"
    if not observation.strip() and not (isinstance(system_prompt, str) and system_prompt.strip()):
        return (
            "returned an empty observation and the env has no system_prompt, so the model would see no task"
        )
    return None


def step_problem(step: Any) -> str | None:
    """What makes `step` break the contract (None: nothing). A reward that is text, None or
    not finite is refused rather than summed: a NaN outcome turns every advantage of its
    group into NaN, and one trained step into a model that samples nothing."""
    if not isinstance(step, StepResult):
        return f"returned {type(step).__name__}, expected forge.env.StepResult"
    if not isinstance(step.observation, str):
        return f"returned StepResult.observation of type {type(step.observation).__name__}, expected str"
    if not isinstance(step.done, bool):
        return f"returned StepResult.done of type {type(step.done).__name__}, expected bool"
    if not isinstance(step.reward, numbers.Real):  # numpy floats and bools count
        return f"returned StepResult.reward {step.reward!r}, expected a float"
    if not math.isfinite(step.reward):
        return f"returned StepResult.reward {step.reward}, expected a finite float"
    if not isinstance(step.info, dict):
        return f"returned StepResult.info of type {type(step.info).__name__}, expected dict"
    return None


class Env:
    """One episode at a time. A task is a dict row (a `datasets.Dataset` row).

    An episode's outcome is the sum of its steps' rewards (see `StepResult`)."""

    # Optional OpenAI-style function schemas; rendered through the chat template.
    tools: list[dict[str, Any]] | None = None
    # Optional system message placed before the first observation.
    system_prompt: str | None = None
    # False: __init__/reset/step/close are quick pure computation that never blocks, so the
    # harness calls them on the worker's event loop instead of handing each to a thread
    # (either way under env.step_timeout_s). The hand-off
    # costs ~0.1 ms per call, a third of a tiny env's rollout CPU; but an inline call that
    # hangs stalls every episode on its worker until a watchdog interrupts it, or, stuck in
    # C code, until the worker ends itself and is restarted (`forge.rollout.stuck`), its
    # episodes lost. `forge env check` fails an env that says False and takes over 10 ms on a call.
    blocking: bool = True
    # True: the env runs code it did not write (the model's) in `forge.sandbox`. A run then
    # refuses sandbox level 0 unless `sandbox.allow_level_0` is set, and warns when it is.
    runs_untrusted_code: bool = False

    def reset(self, task: dict[str, Any], seed: int) -> str:
        """Start an episode on `task`; return the first observation."""
        raise NotImplementedError

    def step(self, action: str) -> StepResult:
        """Apply the model's reply `action`; return what happened."""
        raise NotImplementedError

    def close(self) -> None:
        """Release resources (processes, files). Called once per env."""

    @classmethod
    def generate_tasks(cls, num_tasks: int, seed: int, **kwargs: Any) -> list[dict[str, Any]]:
        """Procedural tasks for built-in envs; a user env may instead read `env.tasks`."""
        raise NotImplementedError(
            f"{cls.__name__} does not generate tasks; set env.tasks to a jsonl/parquet/arrow file"
        )
