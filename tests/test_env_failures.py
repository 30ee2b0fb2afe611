"""A failing env is loud and bounded: its error names the user's file and line, each kind
is printed once, a run whose episodes keep erroring stops with exit code 1, a bad env
setting is caught before Ray starts, and a hung inline env cannot hang the harness."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from forge.config import Config
from forge.env.base import Env, StepResult
from forge.types import Trajectory

RAISE_LINE = "raise KeyError"  # the line the user's frame must point at


class BuggyEnv(Env):
    def reset(self, task, seed):
        return "guess"

    def step(self, action):
        lookup = {}
        return StepResult(lookup["answer"])  # raise KeyError: the user's bug


class InlineBuggyEnv(BuggyEnv):
    blocking = False


class DictResetEnv(Env):
    def reset(self, task, seed):
        return {"text": "guess"}

    def step(self, action):
        return StepResult("x", done=True)


class EmptyResetEnv(Env):
    """No system prompt and an empty first observation: the model would be shown no task."""

    def reset(self, task, seed):
        return "  "

    def step(self, action):
        return StepResult("x", reward=float(len(action) % 2), done=True)


class EmptyResetAfterSystemPromptEnv(EmptyResetEnv):
    system_prompt = "Reply with an odd number of characters."


class SpinningEnv(Env):
    """Inline, and its step never returns: a pure-Python loop."""

    blocking = False

    @classmethod
    def generate_tasks(cls, num_tasks, seed, **kwargs):
        return [{"task_id": str(i)} for i in range(num_tasks)]

    def reset(self, task, seed):
        return "guess"

    def step(self, action):
        if action != "never":
            while True:
                pass
        return StepResult("x")


class NeedsSize(Env):
    def __init__(self, size: int = 3) -> None:
        self.size = size

    @classmethod
    def generate_tasks(cls, num_tasks, seed, **kwargs):
        return [{"task_id": str(i)} for i in range(num_tasks)]

    def reset(self, task, seed):
        return "guess"

    def step(self, action):
        return StepResult("x", done=True)


def _this_file() -> str:
    return __file__


def _worker(checkpoint, env_name: str, step_timeout_s: float = 30.0, latency: bool = False):
    from forge.rollout.worker import RolloutWorker

    cfg = Config()
    cfg.env.name = env_name
    cfg.env.step_timeout_s = step_timeout_s
    if latency:  # the straggler wrapper (LatencyEnv) around the env
        cfg.env.latency.dist, cfg.env.latency.median_ms, cfg.env.latency.p99_ms = "lognormal", 1.0, 2.0
    cfg.rollout.max_turns = 2
    cfg.rollout.max_new_tokens = 2
    return RolloutWorker(str(checkpoint), cfg.model, cfg.env, cfg.rollout, 0.5, seed=0)


@pytest.mark.parametrize("env", ["BuggyEnv", "InlineBuggyEnv"])
def test_an_episode_error_names_the_users_own_file_and_line(tiny_checkpoint, env):
    from forge.env.errors import error_headline

    trajectories = asyncio.run(_worker(tiny_checkpoint, f"{__name__}:{env}").rollout([{"task_id": "t"}], 1))
    error = trajectories[0].error
    assert trajectories[0].status == "error"
    headline = error_headline(error)
    line = next(n for n, text in enumerate(open(_this_file()), 1) if "# raise KeyError" in text)
    assert headline == f"KeyError: 'answer' (at {_this_file()}:{line} in step)"
    assert "Traceback (most recent call last)" in error  # the whole traceback is kept too


@pytest.mark.parametrize("latency", [False, True], ids=["plain", "env.latency"])
def test_a_reset_of_the_wrong_type_points_at_the_reset_method(tiny_checkpoint, latency):
    from forge.env.errors import error_headline

    trajectories = asyncio.run(
        _worker(tiny_checkpoint, f"{__name__}:DictResetEnv", latency=latency).rollout([{"task_id": "t"}], 1)
    )
    assert error_headline(trajectories[0].error).startswith(
        f"EnvContractError: DictResetEnv.reset returned dict, expected str (at {_this_file()}:"
    )


class BadRewardEnv(Env):
    reward: object = float("nan")

    def reset(self, task, seed):
        return "guess"

    def step(self, action):
        return StepResult("x", reward=self.reward, done=True)


class TextRewardEnv(BadRewardEnv):
    reward = "1"


class NoneRewardEnv(BadRewardEnv):
    reward = None


@pytest.mark.parametrize(
    ("env", "shown"), [("BadRewardEnv", "nan"), ("TextRewardEnv", "'1'"), ("NoneRewardEnv", "None")]
)
def test_a_reward_that_is_not_a_finite_float_errors_the_episode_at_the_step_method(
    tiny_checkpoint, env, shown
):
    # Summed as it was, NaN made the group's advantages NaN and one trained step broke the
    # model ("probability tensor contains either inf, nan"); text "1" passed as 1.0.
    from forge.env.errors import error_headline

    trajectories = asyncio.run(_worker(tiny_checkpoint, f"{__name__}:{env}").rollout([{"task_id": "t"}], 1))
    assert trajectories[0].status == "error"
    assert error_headline(trajectories[0].error).startswith(
        f"EnvContractError: {env}.step returned StepResult.reward {shown}, expected a "
    )
    assert f"{_this_file()}:" in error_headline(trajectories[0].error)


class NumpyStepEnv(Env):
    """Gym-style: reward and done computed with numpy."""

    def reset(self, task, seed):
        return "guess"

    def step(self, action):
        import numpy

        return StepResult("x", reward=numpy.float32(1.0), done=numpy.array([True]).all())


def test_a_step_whose_reward_and_done_are_numpys_plays_as_a_float_and_a_bool(tiny_checkpoint):
    import json

    import numpy

    step = NumpyStepEnv().step("7")
    assert type(step.done) is bool and step.done and json.dumps(step.done) == "true"
    assert StepResult("x", done=numpy.bool_(False)).done is False
    [played] = asyncio.run(
        _worker(tiny_checkpoint, f"{__name__}:NumpyStepEnv").rollout([{"task_id": "t"}], 1)
    )
    assert played.status != "error", played.error
    assert played.outcome == 1.0 and played.num_turns == 1


def test_an_empty_first_observation_errors_the_episode_unless_a_system_prompt_states_the_task(
    tiny_checkpoint,
):
    from forge.env.errors import error_headline

    empty = asyncio.run(_worker(tiny_checkpoint, f"{__name__}:EmptyResetEnv").rollout([{"task_id": "t"}], 1))
    assert empty[0].status == "error"
    assert error_headline(empty[0].error).startswith(
        "EnvContractError: EmptyResetEnv.reset returned an empty observation and the env has no system_prompt"
    )
    prompted = asyncio.run(
        _worker(tiny_checkpoint, f"{__name__}:EmptyResetAfterSystemPromptEnv").rollout([{"task_id": "t"}], 1)
    )
    assert prompted[0].status == "ok"


def _errored(task: str, where: str = "  at /u/env.py:7 in step") -> Trajectory:
    return Trajectory(
        task, "g", [], [], [], [], 0, status="error", error=f"KeyError: {task!r}\n{where}\nTraceback"
    )


def _fine() -> Trajectory:
    return Trajectory("ok", "g", [], [], [], [], 0, status="ok")


def test_each_kind_of_error_is_printed_once_with_its_place(capsys):
    from forge.failures import FailureWatch

    watch = FailureWatch(max_error_fraction=1.0, window_steps=3)
    watch.observe(1, [_errored("a"), _errored("b"), _fine()])
    watch.observe(2, [_errored("c"), _errored("d", "  at /u/env.py:9 in reset")])
    printed = capsys.readouterr().err
    assert printed.count("KeyError") == 2  # same type and line, other task: the same kind
    assert "KeyError: 'a' (at /u/env.py:7 in step)" in printed
    assert "KeyError: 'd' (at /u/env.py:9 in reset)" in printed


def test_a_run_stops_when_the_errored_share_over_the_window_passes_the_bound():
    from forge.failures import FailureWatch, RunStopped

    watch = FailureWatch(max_error_fraction=0.5, window_steps=2)
    watch.observe(1, [_errored("a"), _errored("b"), _errored("c"), _fine()])  # window not full yet
    watch.observe(2, [_errored("d"), _fine(), _fine(), _fine()])  # 4 of 8: not past the bound
    with pytest.raises(RunStopped, match=r"stopped at step 3: 5 of 8 episodes errored over the last 2 steps"):
        watch.observe(3, [_errored("e"), _errored("f"), _errored("g"), _errored("h")])


def test_a_run_shorter_than_the_window_is_judged_at_its_last_step():
    from forge.failures import FailureWatch, RunStopped

    watch = FailureWatch(max_error_fraction=0.5, window_steps=5)
    with pytest.raises(RunStopped, match="env.max_error_fraction=0.5"):
        watch.observe(1, [_errored("a"), _errored("b")], last_step=True)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["env.name=guess_numbr"], r"env.name: env 'guess_numbr' is not registered \(known: .*guess_number"),
        (["env.kwargs={sizes: 3}"], r"env.kwargs=\{'sizes': 3\} do not fit NeedsSize\(size\).*'sizes'"),
        (
            [f"env.name={__name__}:DictResetEnv", "env.kwargs={}", "env.tasks=" + "{tasks}"],
            r"DictResetEnv.reset returned dict, expected str \(.*test_env_failures.py:\d+\)",
        ),
        (
            [f"env.name={__name__}:EmptyResetEnv", "env.kwargs={}", "env.tasks=" + "{tasks}"],
            r"EmptyResetEnv.reset returned an empty observation and the env has no system_prompt",
        ),
    ],
)
def test_dry_run_builds_and_resets_the_env_and_names_what_is_wrong(tmp_path, capsys, overrides, message):
    from forge.cli import main

    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"task_id": "a"}\n')
    overrides = [o.replace("{tasks}", str(tasks)) for o in overrides]
    base = [f"env.name={__name__}:NeedsSize"] if "env.kwargs={sizes: 3}" in overrides else []
    assert main(["train", "configs/smoke.yaml", *base, *overrides, "--dry-run"]) == 2
    error = capsys.readouterr().err
    assert error.splitlines()[-1].startswith("forge: ") and "Traceback" not in error
    import re

    assert re.search(message, error), error


def test_dry_run_reports_the_env_it_built(capsys):
    from forge.cli import main

    assert main(["train", "configs/smoke.yaml", "--dry-run"]) == 0
    assert "built GuessNumberEnv(**{'n': 4}), 10000 tasks, reset on task 'guess-0'" in capsys.readouterr().err


def test_a_hung_inline_env_truncates_its_episodes_and_the_worker_goes_on(tiny_checkpoint, monkeypatch):
    from forge.env import calls

    monkeypatch.setattr(calls, "_SLOW_INLINE", set())
    worker = _worker(tiny_checkpoint, f"{__name__}:SpinningEnv", step_timeout_s=0.5)
    started = time.monotonic()
    trajectories = asyncio.run(worker.rollout([{"task_id": "t"}], 6))
    assert [t.status for t in trajectories] == ["truncated"] * 6
    assert all("blocking = False" in t.error for t in trajectories)
    # A group's steps come due together. Inline, each held the loop until the watchdog ended
    # it (a limit per episode: a 32-episode group at 3 s stalled the worker past its stuck
    # limit and it was ended, every episode lost). After the first, the class runs in threads.
    assert sum("called inline" in t.error for t in trajectories) == 1
    assert time.monotonic() - started < 10
    worker.env_class = NeedsSize  # the same worker plays on
    again = asyncio.run(worker.rollout([{"task_id": "t"}], 2))
    assert [t.status for t in again] == ["ok", "ok"]


def test_env_check_fails_a_hung_inline_env_instead_of_hanging():
    from forge.env.check import check_env

    class SleepingEnv(SpinningEnv):
        def step(self, action):
            time.sleep(3600)  # inside C: the watchdog cannot interrupt it

    for env in (SpinningEnv, SleepingEnv):
        started = time.monotonic()
        report = check_env(env, timeout_s=0.3)
        assert not report.passed and time.monotonic() - started < 10
        step = next(c for c in report.checks if c.name == "step")
        assert "did not return within 0.3s" in step.detail and "blocking = False" in step.fix


def test_the_step_that_stops_a_run_is_recorded_before_the_stop():
    from forge.failures import FailureWatch, RunStopped

    recorded = []
    watch = FailureWatch(max_error_fraction=0.5, window_steps=1)
    watch.observe(1, [_fine()], before_stop=lambda: recorded.append(1))
    with pytest.raises(RunStopped, match="stopped at step 2"):
        watch.observe(2, [_errored("a")], before_stop=lambda: recorded.append(2))
    assert recorded == [2]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_run_whose_env_always_errors_stops_with_exit_code_1(ray_session, tmp_path, capsys, mode):
    from forge.cli import main

    overrides = [
        f"train.mode={mode}",
        f"env.name={__name__}:BuggyEnv",
        "env.tasks=" + str(tmp_path / "tasks.jsonl"),
        "env.kwargs={}",
        "train.max_steps=20",
        "env.error_window_steps=2",
        "rollout.tasks_per_step=2",
        "rollout.group_size=2",
        "rollout.num_workers=1",  # the driver counts the errors and stops the run: one worker as two
        "logging.progress_bar=false",
    ]
    (tmp_path / "tasks.jsonl").write_text("".join(json.dumps({"task_id": str(i)}) + "\n" for i in range(4)))
    assert main(["train", "configs/smoke.yaml", *overrides, "--output-dir", str(tmp_path / "run")]) == 1
    error = capsys.readouterr().err
    assert error.count("KeyError: 'answer' (at ") == 1
    assert "forge: stopped at step 2: 8 of 8 episodes errored over the last 2 steps" in error
    assert f"`forge env check {__name__}:BuggyEnv` runs it through the contract" in error
    # The step that stopped the run is in metrics.jsonl, with its errored episodes.
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["episodes_error"]) for r in rows] == [(1, 4), (2, 4)]
    if mode == "sync":  # nothing was trained on the stopping step, and its row does not say otherwise
        assert "loss" in rows[0]
        assert not {"loss", "policy_loss", "trained_samples"} & set(rows[-1])
