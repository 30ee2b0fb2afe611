"""A run with nothing to learn from is loud and bounded: a step whose episodes all have
advantage 0 (every group scored alike) is said once with what to check, a run stops with
exit code 1 after `train.max_steps_without_signal` such steps in a row, and a run from
scratch that never had signal does not end with exit code 0."""

from __future__ import annotations

import json

import pytest

from forge.config import load_config
from forge.env.base import Env, StepResult
from forge.failures import RunStopped, SignalWatch
from forge.run.context import shape_rewards
from forge.types import Trajectory


class NeverSolvedEnv(Env):
    """Every episode scores 0: the smoke config's one-token actions never spell a word."""

    blocking = False

    @classmethod
    def generate_tasks(cls, num_tasks, seed, **kwargs):
        return [{"task_id": str(i)} for i in range(num_tasks)]

    def reset(self, task, seed):
        return "Spell 'forge' backwards."

    def step(self, action):
        return StepResult("no", reward=0.0, done=True)


def steps(*fractions: float) -> list[dict[str, float]]:
    return [{"signal_fraction": f, "reward_mean": 0.0} for f in fractions]


def test_the_first_step_without_signal_is_said_once_with_what_to_check(capsys):
    watch = SignalWatch(max_steps=5, fix="Check the env")
    for step, metrics in enumerate(steps(0, 0, 0), start=1):
        watch.observe(step, metrics)
    said = capsys.readouterr().err
    assert said.count("had no learning signal") == 1
    assert (
        "forge: step 1 had no learning signal: within each task's group every episode got the same reward"
        in said
    )
    assert said.rstrip().endswith("Check the env")


def test_a_step_whose_every_episode_errored_is_not_said_as_one_without_signal(capsys):
    # Its error is said by the error watch; "check that the env can be solved" would mislead.
    watch = SignalWatch(max_steps=5, fix="Check the env")
    errored = {"signal_fraction": 0.0, "reward_mean": 0.0, "episodes": 8.0, "episodes_error": 8.0}
    watch.observe(1, errored)
    assert capsys.readouterr().err == ""
    watch.observe(2, {**errored, "episodes_error": 3.0})
    assert "forge: step 2 had no learning signal" in capsys.readouterr().err


def test_steps_cut_short_by_time_limits_say_the_limit_to_raise_not_that_the_env_may_be_unsolvable(capsys):
    # Every episode ran past env.step_timeout_s (its kind printed by the failure watch): all
    # rewards are 0, but the env's solvability is not what to check.
    watch = SignalWatch(
        max_steps=3, fix="Check the env can be solved", timeout_fix="Raise env.step_timeout_s"
    )
    timed_out = {"signal_fraction": 0.0, "reward_mean": 0.0, "episodes": 8.0, "episodes_timeout": 8.0}
    watch.observe(1, timed_out)
    watch.observe(2, {**timed_out, "episodes_timeout": 5.0, "episodes_error": 3.0})
    assert capsys.readouterr().err == ""
    with pytest.raises(RunStopped, match=r"ran past a time limit.*\. Raise env.step_timeout_s$") as stop:
        watch.observe(3, timed_out)
    assert "can be solved" not in str(stop.value)
    # One step in the run whose episodes ended (reward 0 all the same) and the env is in question again.
    mixed = SignalWatch(
        max_steps=3, fix="Check the env can be solved", timeout_fix="Raise env.step_timeout_s"
    )
    mixed.observe(1, timed_out)
    mixed.observe(2, {**timed_out, "episodes_timeout": 2.0})
    assert "forge: step 2 had no learning signal" in capsys.readouterr().err
    with pytest.raises(RunStopped, match=r"Check the env can be solved$"):
        mixed.observe(3, timed_out)
    # Only errors (the error watch stops such runs first unless env.max_error_fraction=1): the env's error.
    errored = SignalWatch(
        max_steps=1, fix="Check the env can be solved", error_fix="Fix the env", timeout_fix="Raise"
    )
    with pytest.raises(RunStopped, match=r"every episode errored, the first error .*\. Fix the env$"):
        errored.observe(1, {**timed_out, "episodes_timeout": 0.0, "episodes_error": 8.0})


def test_a_run_that_never_had_signal_stops_after_max_steps_or_at_its_last_step():
    watch = SignalWatch(max_steps=3, fix="Check the env")
    watch.observe(1, steps(0)[0])
    watch.observe(2, steps(0)[0])
    with pytest.raises(
        RunStopped,
        match=r"stopped at step 3: none of the run's 3 steps had learning signal .*"
        r"train.max_steps_without_signal=3; 0 never stops\). Check the env",
    ):
        watch.observe(3, steps(0)[0])
    short = SignalWatch(max_steps=20, fix="Check the env")
    short.observe(1, steps(0)[0])
    with pytest.raises(RunStopped, match=r"stopped at step 2: none of the run's 2 steps had learning signal"):
        short.observe(2, steps(0)[0], last_step=True)


def test_after_signal_steps_that_score_alike_are_said_once_and_the_run_goes_on(capsys):
    """A converged policy solves every episode of every group: no signal, and nothing wrong."""
    watch = SignalWatch(max_steps=3, fix="Check the env")
    watch.observe(1, steps(0.5)[0])
    for step in range(2, 30):
        watch.observe(
            step, {"signal_fraction": 0.0, "reward_mean": 1.0, "success_rate": 1.0}, last_step=step == 29
        )
    said = capsys.readouterr().err
    assert said.count("had no learning signal") == 1
    assert "forge: steps 2-4 had no learning signal (reward_mean 1, success_rate 1.00)" in said
    assert "the run goes on" in said and "Check the env" not in said


def test_a_resumed_run_or_the_setting_at_0_never_stops():
    resumed = SignalWatch(
        max_steps=2, fix="Check the env", from_scratch=False
    )  # it trained before this process
    off = SignalWatch(max_steps=0, fix="Check the env")
    for step in range(1, 40):
        resumed.observe(step, steps(0)[0], last_step=step == 39)
        off.observe(step, steps(0)[0], last_step=step == 39)


def _episode(group: str, reward: float, status: str = "ok") -> Trajectory:
    return Trajectory("t", group, [5], [1], [0.0], [0], 0, reward=reward, outcome=reward, status=status)


def test_signal_fraction_is_the_share_of_played_episodes_with_a_nonzero_advantage():
    from forge.reward.shaping import RewardShaper

    cfg = load_config("configs/smoke.yaml")
    shaper = RewardShaper(cfg.reward)
    alike = [_episode("a", 1.0), _episode("a", 1.0), _episode("b", 0.0), _episode("b", 0.0)]
    assert shape_rewards(shaper, alike, cfg)[0]["signal_fraction"] == 0.0
    mixed = [
        _episode("a", 1.0),
        _episode("a", 0.0),
        _episode("b", 0.0),
        _episode("b", 0.0),
        _episode("b", 1, "lost"),
    ]
    assert shape_rewards(shaper, mixed, cfg)[0]["signal_fraction"] == 0.5  # the lost one is not played
    # An episode that errored before its first reply has no token to train: not counted either.
    unreplied = Trajectory("t", "a", [5], [0], [0.0], [0], 0, reward=0.0, outcome=0.0, status="error")
    solved = [_episode("a", 1.0), _episode("a", 1.0), unreplied, _episode("b", 0.0), _episode("b", 0.0)]
    assert shape_rewards(shaper, solved, cfg)[0]["signal_fraction"] == 0.5  # a's two of the four trained


@pytest.mark.slow
def test_a_run_on_an_env_it_never_solves_ends_with_exit_code_1_not_0(ray_session, tmp_path, capsys):
    from forge.cli import main

    overrides = [
        f"env.name={__name__}:NeverSolvedEnv",
        "env.kwargs={}",
        "train.max_steps=2",
        "rollout.tasks_per_step=2",
        "rollout.group_size=2",
        "rollout.num_workers=1",  # the driver judges the signal: one worker plays the episodes as two would
        "logging.progress_bar=false",
    ]
    assert main(["train", "configs/smoke.yaml", *overrides, "--output-dir", str(tmp_path / "run")]) == 1
    error = capsys.readouterr().err
    assert "forge: step 1 had no learning signal" in error
    assert "forge: stopped at step 2: none of the run's 2 steps had learning signal" in error
    assert f"`forge env check {__name__}:NeverSolvedEnv` plays it" in error
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["signal_fraction"]) for r in rows] == [(1, 0.0), (2, 0.0)]


def test_a_first_step_that_solved_every_task_is_not_told_to_check_the_env(capsys):
    watch = SignalWatch(max_steps=5, fix="Check the env or warm-start")
    watch.observe(1, {"signal_fraction": 0.0, "reward_mean": 1.0, "success_rate": 1.0})
    said = capsys.readouterr().err
    assert "had no learning signal" in said and "Check the env" not in said
    assert "Every episode solved its task" in said


def test_a_run_with_reward_speed_on_that_solved_every_task_is_not_told_to_turn_it_on(capsys):
    from forge.failures import solved_fix

    speed = load_config("configs/swarm.yaml").reward.speed
    assert speed.enabled
    watch = SignalWatch(max_steps=5, fix="Check the env", solved_fix=solved_fix(speed.enabled, speed.measure))
    watch.observe(1, {"signal_fraction": 0.0, "reward_mean": 1.2, "success_rate": 1.0})
    said = capsys.readouterr().err
    assert "a reward term that tells solved episodes apart (reward.speed)" not in said
    assert (
        "reward.speed, which is on, scored each group's episodes alike (their critical_steps were the same)"
        in said
    )


def test_a_gateway_run_with_reward_speed_on_that_solved_every_task_is_not_told_to_turn_it_on(capsys):
    from forge.failures import gateway_watches

    cfg = load_config("configs/gateway-smoke.yaml", ["reward.speed.enabled=true"])
    _, watch = gateway_watches(cfg, from_scratch=True)
    watch.observe(1, {"signal_fraction": 0.0, "reward_mean": 1.0, "success_rate": 1.0})
    said = capsys.readouterr().err
    assert "a reward term that tells solved episodes apart (reward.speed)" not in said
    assert "reward.speed, which is on, scored each group's episodes alike" in said
