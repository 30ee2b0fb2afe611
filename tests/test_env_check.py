"""`forge env check`: contract violations are reported as FAIL with a fix, good envs pass."""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

import pytest
from side_by_side import Started, selected_tests

from forge.env import Env, StepResult
from forge.env.check import check_env, list_envs
from forge.env.check_process import main


class Good(Env):
    @classmethod
    def generate_tasks(cls, num_tasks, seed, **kwargs):
        rng = random.Random(seed)
        return [{"task_id": str(i), "target": rng.randrange(5)} for i in range(num_tasks)]

    def reset(self, task, seed):
        self.target, self.steps = task["target"], 0
        return "pick 0-4"

    def step(self, action):
        self.steps += 1
        hit = action.strip() == str(self.target)
        return StepResult("yes" if hit else "no", float(hit), hit or self.steps >= 10, {"steps": self.steps})


def failed(report) -> dict[str, str]:
    return {c.name: c.detail for c in report.checks if not c.passed}


# `forge env check NAME` (this module's `main`) in a process per env: each spends seconds
# starting (its check runs in a child process of its own, which loads the tokenizer's
# libraries), so the tests that run it from the command line start theirs at once.
CLI_CHECKS = {
    "test_cli_exit_code_follows_the_verdict": ["guess_number"],
    "test_the_cli_exits_1_when_a_check_crashed": [f"{__name__}:RaisingPrompt", f"{__name__}:NumberPrompt"],
    "test_the_reports_stdout_holds_the_report_alone_and_the_envs_prints_go_to_stderr": [f"{__name__}:Chatty"],
}


@pytest.fixture(scope="module")
def checks(request, tmp_path_factory):
    """`main(["check", NAME])` run as `forge env check NAME` for the selected tests above,
    all started at once; by the env's class name."""
    tests = Path(__file__).resolve().parent
    path = os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")])
    run_main = "import sys; from forge.env.check_process import main; sys.exit(main(sys.argv[1:]))"
    started = {}
    for name in [name for test in selected_tests(request) for name in CLI_CHECKS.get(test, [])]:
        key = name.rsplit(":", 1)[-1]
        started[key] = Started(
            tmp_path_factory.mktemp(f"check-{key}"), [sys.executable, "-c", run_main, "check", name],
            tests.parent, {**os.environ, "PYTHONPATH": path},
        )  # fmt: skip
    yield started
    for run in started.values():
        run.stop()


def test_a_well_behaved_env_passes_every_check():
    report = check_env(Good)
    assert report.passed, report.render()
    names = [c.name for c in report.checks]
    for expected in ("reset", "step", "empty action", "huge action", "garbage action", "done", "determinism",
                     "timeouts", "close"):  # fmt: skip
        assert expected in names


def test_the_built_in_envs_pass():
    for name in ("guess_number", "countdown", "file_search"):
        report = check_env(name, num_tasks=2)
        assert report.passed, report.render()


def test_reset_must_return_a_string():
    class IntReset(Good):
        def reset(self, task, seed):
            super().reset(task, seed)
            return 3

    assert failed(check_env(IntReset)) == {"reset": "reset returned int, expected str"}


def test_step_must_return_a_step_result():
    class TupleStep(Good):
        def step(self, action):
            return ("obs", 0.0, False, {})

    assert "expected forge.env.StepResult" in failed(check_env(TupleStep))["step"]


def test_a_reward_given_as_text_fails_the_check_as_it_errors_a_rollout():
    class TextReward(Good):
        def step(self, action):
            result = super().step(action)
            result.reward = str(result.reward)
            return result

    assert "StepResult.reward '" in failed(check_env(TextReward))["step"]


def test_raising_on_an_empty_action_fails_with_a_fix():
    class Picky(Good):
        def step(self, action):
            if not action:
                raise ValueError("empty")
            return super().step(action)

    report = check_env(Picky)
    assert "raised ValueError: empty" in failed(report)["empty action"]
    assert "fix: an env must answer every action" in report.render()


def test_info_must_be_json_serializable():
    class SetInfo(Good):
        def step(self, action):
            return StepResult("o", info={"seen": {1, 2}})

    assert "not JSON-serializable" in failed(check_env(SetInfo))["step"]


def test_a_numpy_value_in_info_is_named_by_its_key_and_type_with_the_fix():
    """numpy 2 calls its bool 'bool': json's own 'Object of type bool is not JSON serializable'
    reads as if a plain bool were refused."""
    import numpy as np

    class NumpyInfo(Good):
        def step(self, action):
            return StepResult("o", info={"success": np.bool_(True), "scores": [1.0, np.float32(0.5)]})

    problem = failed(check_env(NumpyInfo))["step"]
    assert "StepResult.info['success'] is numpy.bool" in problem and "bool(x)" in problem


def test_global_randomness_breaks_determinism():
    class Noisy(Good):
        def reset(self, task, seed):
            super().reset(task, seed)
            return f"pick 0-4 ({random.random()})"

    assert "determinism" in failed(check_env(Noisy))


def test_state_leaking_across_resets_is_caught():
    class Leaky(Good):
        episodes = 0

        def reset(self, task, seed):
            self.episodes += 1
            super().reset(task, seed)
            return f"episode {self.episodes}"

    assert "differs" in failed(check_env(Leaky))["done"]


def test_a_step_past_the_timeout_fails_and_the_check_returns():
    class Slow(Good):
        def step(self, action):
            time.sleep(5)

    report = check_env(Slow, timeout_s=0.2)
    assert failed(report)["step"].endswith("Slow.step did not return within 0.2s")


def test_an_env_claiming_not_to_block_must_answer_quickly():
    class Quick(Good):
        blocking = False

    class Sluggish(Quick):
        def step(self, action):
            time.sleep(0.03)
            return super().step(action)

    assert check_env(Quick).passed
    report = check_env(Sluggish)
    assert "stalls every episode on its worker" in failed(report)["blocking=False"]
    assert "blocking=False" not in [c.name for c in check_env(Good).checks]


def test_bad_tool_schemas_are_reported():
    class BadTools(Good):
        tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]

    assert "parameters must be a JSON schema of type 'object'" in failed(check_env(BadTools))["tools"]


def test_an_unknown_env_name_fails_to_resolve():
    report = check_env("no_such_env_anywhere")
    assert not report.passed and "not registered" in report.checks[0].detail


def test_render_prints_pass_fail_lines_and_a_verdict():
    class IntReset(Good):
        def reset(self, task, seed):
            return 3

    text = check_env(IntReset).render()
    assert "  PASS  construct" in text and "  FAIL  reset" in text and text.endswith("1 failed")


def test_cli_exit_code_follows_the_verdict(checks):
    passed = checks["guess_number"].finish(timeout_s=120)
    assert passed.returncode == 0 and "PASSED" in passed.stdout, passed.stderr
    assert main(["check", "no_such_env_anywhere"]) == 1
    assert main(["check", "guess_number", "--kwargs", "{bad"]) == 2


def test_list_shows_the_registered_built_ins():
    listing = list_envs()
    for name in ("guess_number", "countdown", "python_coding", "file_search"):
        assert name in listing


def test_envs_are_closed_even_when_a_check_fails():
    closed = []

    class FailsStep(Good):
        def step(self, action):
            raise RuntimeError("no")

        def close(self):
            closed.append(self)

    assert not check_env(FailsStep).passed
    assert len(closed) == 1


def test_a_tool_list_of_non_dicts_is_reported_not_crashed_on():
    class OddTools(Good):
        tools = ["calculator"]

    assert failed(check_env(OddTools))["text"].startswith(
        "OddTools.tools is list, expected a list of OpenAI-style function schemas"
    )


class NumberPrompt(Good):
    system_prompt = 42  # a user's slip: not text


class RaisingPrompt(Good):
    @property
    def system_prompt(self):
        raise RuntimeError("prompt file missing")


class ListParameters(Good):
    tools = [{"type": "function", "function": {"name": "add", "parameters": ["a", "b"]}}]


def test_a_system_prompt_that_is_not_text_fails_with_the_dry_runs_words():
    report = check_env(NumberPrompt)
    assert failed(report) == {"text": "NumberPrompt.system_prompt is int, expected str or None: the text shown "
                              "before the first observation"}  # fmt: skip


def test_an_exception_escaping_a_check_fails_that_check_with_the_users_frame():
    report = check_env(RaisingPrompt)
    detail = failed(report)["text"]
    assert detail.startswith("the check raised RuntimeError: prompt file missing at ")
    assert f"{__file__}:" in detail and "in system_prompt" in detail
    assert not report.passed


def test_an_exception_in_the_checkers_own_code_fails_the_check_it_was_in():
    assert failed(check_env(ListParameters))["tools"].startswith("the check raised AttributeError: ")


def test_the_cli_exits_1_when_a_check_crashed(checks):
    raising = checks["RaisingPrompt"].finish(timeout_s=120)
    assert raising.returncode == 1
    assert "FAILED: 1 passed, 1 failed" in raising.stdout and "Traceback" not in raising.stderr
    number = checks["NumberPrompt"].finish(timeout_s=120)
    assert number.returncode == 1 and "FAIL  text" in number.stdout


class Chatty(Good):
    """Prints as a user debugging their env does."""

    def reset(self, task, seed):
        print("debug: reset", task["task_id"])
        return super().reset(task, seed)

    def step(self, action):
        print("debug: step", action)
        return super().step(action)


def test_the_reports_stdout_holds_the_report_alone_and_the_envs_prints_go_to_stderr(checks):
    captured = checks["Chatty"].finish(timeout_s=120)
    assert captured.returncode == 0, captured.stderr
    lines = captured.stdout.splitlines()
    assert lines[0] == f"forge env check {__name__}:Chatty" and lines[-1].startswith("PASSED: ")
    assert all(line.startswith(("  PASS  ", "  FAIL  ", "        fix: ")) for line in lines[1:-1])
    assert "debug: reset" in captured.stderr and "debug: step" in captured.stderr


def test_a_tool_env_whose_methods_lack_the_tool_decorator_fails_naming_them():
    from forge.env.tools import ToolEnv

    class ForgotTool(ToolEnv):
        @classmethod
        def generate_tasks(cls, num_tasks, seed, **kwargs):
            return [{"task_id": str(i)} for i in range(num_tasks)]

        def reset(self, task, seed):
            return "count the apples"

        def count(self, item: str) -> str:  # meant as a tool: no @tool
            return "3"

        def score_answer(self, answer):
            return self.done(float(answer == "3"), answer == "3")

    report = check_env(ForgotTool)
    assert "ForgotTool is a ToolEnv with no tools" in failed(report)["tools"]
    assert "count is a plain method, not a @tool" in failed(report)["tools"]
    assert "decorate each method the model may call with @tool" in report.render()
