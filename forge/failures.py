"""Episode failures made loud and bounded: the first error of each kind printed once with
the user's frame, and a run stopped when too many of its episodes error."""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable

from forge.env.errors import error_headline, error_kind
from forge.types import Trajectory


def env_fix(env_name: str) -> str:
    """What the stop message tells the user to fix, for a run of env `env_name`."""
    return f"Fix the env (its first error is printed above; `forge env check {env_name}` runs it through the contract)"


AGENT_FIX = (
    "Fix the agent program (gateway.agent_command) or the env: the first error of each kind is printed "
    "above (for an agent that crashed, the last line of its stderr)"
)


class RunStopped(RuntimeError):
    """The run cannot usefully go on (its env keeps failing); the message says why."""


def say(message: str) -> None:
    """Print a run's message on the console, above its progress bar."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)  # above a progress bar, not through it


class FailureWatch:
    """Watches each step's episodes.

    Prints each new kind of episode error (exception type and the user's file:line) or
    timeout once. Raises `RunStopped` when errored episodes are more than
    `max_error_fraction` of those played over the last `window_steps` steps (checked once
    the window is full, and at the run's last step), since a run whose episodes error
    trains on nothing."""

    def __init__(self, max_error_fraction: float, window_steps: int, fix: str = env_fix("ENV_NAME")) -> None:
        self.max_error_fraction = max_error_fraction
        self.fix = fix  # what the stop message tells the user to fix
        self.window: deque[tuple[int, int]] = deque(maxlen=window_steps)  # (errored, played) per step
        self.seen: set[str] = set()

    def observe(
        self,
        step: int,
        trajectories: list[Trajectory],
        last_step: bool = False,
        before_stop: Callable[[], None] | None = None,
    ) -> None:
        """Watch step `step`'s episodes; `before_stop` runs before a stop is raised (to record
        the step that stopped the run, whose metrics would otherwise be lost)."""
        played = [t for t in trajectories if t.status != "lost"]
        errored = [t for t in played if t.status == "error"]
        for trajectory in played:
            if not trajectory.error:
                continue
            kind = error_kind(trajectory.error)
            if kind in self.seen:
                continue
            self.seen.add(kind)
            what = "an episode errored" if trajectory.status == "error" else "an episode was cut short"
            say(
                f"forge: step {step}: {what} (task {trajectory.task_id!r}; each kind is printed once):\n"
                f"  {error_headline(trajectory.error)}"
            )
        self.window.append((len(errored), len(played)))
        if len(self.window) < (self.window.maxlen or 1) and not last_step:
            return
        errors = sum(e for e, _ in self.window)
        total = sum(p for _, p in self.window)
        if total and errors / total > self.max_error_fraction:
            if before_stop is not None:
                before_stop()
            raise RunStopped(
                f"stopped at step {step}: {errors} of {total} episodes errored over the last {len(self.window)} "
                f"steps ({errors / total:.0%} > env.max_error_fraction={self.max_error_fraction:g}), so the run "
                f"would train on nothing. {self.fix}, or raise env.max_error_fraction"
            )
