"""A run that would train on nothing made loud and bounded: the first episode error of each
kind printed once with the user's frame, and a run stopped when too many of its episodes
error or too many of its steps in a row have no learning signal."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from forge.env.errors import error_headline, error_kind
from forge.env.output import console
from forge.types import Trajectory

if TYPE_CHECKING:
    from forge.config import Config


def env_fix(env_name: str) -> str:
    """What the stop message tells the user to fix, for a run of env `env_name`."""
    return f"Fix the env (its first error is printed above; `forge env check {env_name}` runs it through the contract)"


AGENT_FIX = (
    "Fix the agent program (gateway.agent_command) or the env: the first error of each kind is printed "
    "above (for an agent that crashed, the last line of its stderr)"
)


def signal_fix(env_name: str, max_turns: int, max_new_tokens: int) -> str:
    """What a stop for want of learning signal tells the user to check, for a run of env `env_name`."""
    return (
        f"Check that {env_name} can be solved in rollout.max_turns={max_turns} turns of at most "
        f"rollout.max_new_tokens={max_new_tokens} tokens (`forge env check {env_name}` plays it) and that its "
        "rewards differ between episodes of a task; or warm-start the model first (`forge sft`)"
    )


def cut_fix(mask_truncated: bool, max_new_tokens: int, agents: bool = False) -> str:
    """What a stop for want of learning signal says when `train.mask_truncated` left out every
    episode (each had a reply cut at its token limit); "" when it is off. `agents`: a gateway
    run's, whose agents may ask for a lower limit (max_tokens) themselves."""
    if not mask_truncated:
        return ""
    limit = f"rollout.max_new_tokens={max_new_tokens}" + (
        " or the max_tokens its agent asked for" if agents else ""
    )
    return (
        f"Every episode had a reply cut at {limit}, and train.mask_truncated leaves those out of the loss: "
        "raise the limit, or set train.mask_truncated=false"
    )


def env_timeout_fix(step_timeout_s: float, episode_timeout_s: float) -> str:
    """What a stop tells the user when a run's episodes were all cut short by a time limit."""
    return (
        f"Raise env.step_timeout_s (now {step_timeout_s:g} s, the limit on one env call) or "
        f"env.episode_timeout_s (now {episode_timeout_s:g} s), or make the env's calls faster"
    )


def agent_timeout_fix(agent_timeout_s: float) -> str:
    """As `env_timeout_fix`, for a gateway run's agent programs."""
    return (
        f"Raise gateway.agent_timeout_s (now {agent_timeout_s:g} s) or env.step_timeout_s, or make the agent "
        "program (gateway.agent_command) or the env faster"
    )


AGENT_SIGNAL_FIX = (
    "Check that the agent program (gateway.agent_command) can solve the env's tasks and that their rewards "
    "differ between episodes of a task; or warm-start the model first (`forge sft`)"
)


class RunStopped(RuntimeError):
    """The run cannot usefully go on (its env keeps failing, or nothing is learned); the message says why."""


def say(message: str) -> None:
    """Print a run's message on the console, above its progress bar."""
    from tqdm import tqdm

    # Above a progress bar, not through it; in a rollout worker, not into the env's log file.
    tqdm.write(message, file=console())


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


SOLVED_FIX = (
    "Every episode solved its task (a warm start that already learned them?): harder tasks, or a reward "
    "term that tells solved episodes apart (reward.speed), give RL something to learn"
)


def solved_fix(speed_enabled: bool, speed_measure: str) -> str:
    """What to do when every episode solved its task: SOLVED_FIX, unless reward.speed is on
    already (then its measure came out the same for each group's episodes)."""
    if not speed_enabled:
        return SOLVED_FIX
    return (
        "Every episode solved its task (a warm start that already learned them?), and reward.speed, which is on, "
        f"scored each group's episodes alike (their {speed_measure} were the same): harder tasks, or a "
        "reward.speed.measure that differs between episodes, give RL something to learn"
    )


class SignalWatch:
    """Watches each step for learning signal: an episode whose advantage is not 0 (the step's
    `signal_fraction` metric, `forge.run.context.shape_rewards`).

    A step without any (every group's episodes scored alike) changes nothing, and the next
    step samples the same policy again. Until the run's first step with signal, that is a
    run training on nothing: its first such step is said with `fix`, and `max_steps` of them
    in a row stop it, as does its last step. After signal, steps without it are a policy that
    solves its tasks alike (converged, most often): said once, when `max_steps` come in a
    row, and the run goes on. A resumed run has had signal. `max_steps` 0 turns it all off.

    Steps whose every episode errored or ran out of time have no signal for that reason
    (FailureWatch prints the first of each kind): they are never said to need an env that can
    be solved, and a stop after only such steps says `timeout_fix` where time limits cut some
    short, else `error_fix`."""

    def __init__(
        self,
        max_steps: int,
        fix: str,
        from_scratch: bool = True,
        error_fix: str = "",
        timeout_fix: str = "",
        solved_fix: str = SOLVED_FIX,
        cut_fix: str = "",
    ) -> None:
        self.max_steps = max_steps
        self.cut_fix = cut_fix  # said when train.mask_truncated left every episode out (see cut_fix())
        self.fix = fix
        self.solved_fix = solved_fix  # said instead of `fix` when every episode solved its task
        self.error_fix = error_fix
        self.timeout_fix = timeout_fix
        self.cut_off_in_a_row = 0  # of the steps in a row without signal, those none of whose episodes ended
        self.timeouts_in_a_row = 0  # of those, the steps with an episode cut short by a time limit
        self.ever = not from_scratch  # whether a step had signal (a resumed run trained before)
        self.in_a_row = 0
        self.steps = 0
        self.said_alike = False
        self.said_first = False  # the first step without signal (before any had it) was said

    def observe(self, step: int, metrics: dict[str, float], last_step: bool = False) -> None:
        """Watch step `step`, already recorded; raises `RunStopped` when the run must stop."""
        self.steps += 1
        if metrics.get("signal_fraction", 0.0) > 0:
            self.ever, self.in_a_row, self.cut_off_in_a_row, self.timeouts_in_a_row = True, 0, 0, 0
            return
        self.in_a_row += 1
        played = metrics.get("episodes", 0)
        cut_off = (
            played > 0 and metrics.get("episodes_error", 0) + metrics.get("episodes_timeout", 0) == played
        )
        self.cut_off_in_a_row += cut_off
        self.timeouts_in_a_row += cut_off and metrics.get("episodes_timeout", 0) > 0
        if not self.max_steps:
            return
        # Every episode solved: the env and model are fine, there is only nothing left to learn.
        fix = self.solved_fix if metrics.get("success_rate", 0.0) >= 1.0 else self.fix
        scored = f"reward_mean {metrics.get('reward_mean', float('nan')):.3g}, success_rate {metrics.get('success_rate', float('nan')):.2f}"
        masked = bool(self.cut_fix) and played > 0 and metrics.get("episodes_reply_cut", 0) >= played
        if self.ever:
            if self.in_a_row >= self.max_steps and not self.said_alike:
                self.said_alike = True
                say(
                    f"forge: steps {step - self.in_a_row + 1}-{step} had no learning signal ({scored}): every group's "
                    "episodes scored alike, so they train nothing; the run goes on (tasks the policy solves only "
                    "sometimes give it more to learn)"
                )
            return
        # A step whose every episode errored or timed out has no signal for that reason, said by
        # FailureWatch; telling the user then to check the env can be solved would send them the wrong way.
        if not self.said_first and not cut_off:
            self.said_first = True
            if masked:  # left out, whatever they scored
                say(f"forge: step {step} trains nothing: {self.cut_fix}")
            else:
                say(
                    f"forge: step {step} had no learning signal: within each task's group every episode got the "
                    f"same reward ({scored}), so every advantage is 0 and the step trains nothing. {fix}"
                )
        if self.in_a_row >= self.max_steps or last_step:
            if self.cut_off_in_a_row == self.in_a_row and self.timeouts_in_a_row:
                scored = (
                    "every episode errored or ran past a time limit, the first of each kind printed above"
                )
                fix = self.timeout_fix or fix
            elif self.cut_off_in_a_row == self.in_a_row:
                scored = "every episode errored, the first error of each kind printed above"
                fix = self.error_fix or fix
            why = f"every episode's advantage was 0; {scored}"
            if masked and self.cut_off_in_a_row < self.in_a_row:
                why, fix = "train.mask_truncated left out every episode: each had a reply cut", self.cut_fix
            raise RunStopped(
                f"stopped at step {step}: none of the run's {self.steps} steps had learning signal ({why}), "
                "so it trained on nothing (train.max_steps_without_signal="
                f"{self.max_steps}; 0 never stops). {fix}"
            )


def env_watches(cfg: Config, from_scratch: bool) -> tuple[FailureWatch, SignalWatch]:
    """The failure and learning-signal watches of a run whose episodes the env plays (sync
    and async runs), with the fixes its config points to; `from_scratch`: not resumed."""
    fix = env_fix(cfg.env.name)
    failures = FailureWatch(cfg.env.max_error_fraction, cfg.env.error_window_steps, fix)
    signal = SignalWatch(
        cfg.train.max_steps_without_signal,
        signal_fix(cfg.env.name, cfg.rollout.max_turns, cfg.rollout.max_new_tokens),
        from_scratch=from_scratch,
        error_fix=fix,
        timeout_fix=env_timeout_fix(cfg.env.step_timeout_s, cfg.env.episode_timeout_s),
        solved_fix=solved_fix(cfg.reward.speed.enabled, cfg.reward.speed.measure),
        cut_fix=cut_fix(cfg.train.mask_truncated, cfg.rollout.max_new_tokens),
    )
    return failures, signal


def gateway_watches(cfg: Config, from_scratch: bool) -> tuple[FailureWatch, SignalWatch]:
    """The failure and learning-signal watches of a gateway run, whose episodes are agent
    processes: an errored episode is most often an agent that crashed (or an env error)."""
    failures = FailureWatch(cfg.env.max_error_fraction, cfg.env.error_window_steps, AGENT_FIX)
    signal = SignalWatch(
        cfg.train.max_steps_without_signal,
        AGENT_SIGNAL_FIX,
        from_scratch=from_scratch,
        error_fix=AGENT_FIX,
        timeout_fix=agent_timeout_fix(cfg.gateway.agent_timeout_s),
        solved_fix=solved_fix(cfg.reward.speed.enabled, cfg.reward.speed.measure),
        cut_fix=cut_fix(cfg.train.mask_truncated, cfg.rollout.max_new_tokens, agents=True),
    )
    return failures, signal
