"""Countdown: solvable generated puzzles, a safe calculator tool, strict answer grading."""

from __future__ import annotations

import json
from collections import Counter
from fractions import Fraction

import pytest

from forge.env.calls import call_sync
from forge_envs.countdown import CountdownEnv, ExpressionError, evaluate


def calculator(expression: str) -> str:
    return f"<tool_call>{json.dumps({'name': 'calculator', 'arguments': {'expression': expression}})}</tool_call>"


@pytest.fixture
def env():
    env = CountdownEnv()
    env.reset({"numbers": [2, 3, 4], "target": 24}, seed=0)
    return env


def test_every_generated_puzzle_has_a_solution_using_each_number_once():
    for task in CountdownEnv.generate_tasks(200, seed=5):
        value, used = evaluate(task["solution"])
        assert value == task["target"] and Counter(used) == Counter(task["numbers"])


def test_evaluation_is_exact():
    assert evaluate("7 / 2 * 4") == (Fraction(14), [7, 2, 4])


@pytest.mark.parametrize(
    "expression", ["__import__('os')", "2 ** 100", "x + 1", "1 / 0", "9" * 20 + " * 9", "(1"]
)
def test_anything_but_arithmetic_is_rejected(expression):
    with pytest.raises(ExpressionError):
        evaluate(expression)


def test_the_calculator_tool_answers_and_records_tool_use(env):
    result = call_sync(env.step, calculator("(3 + 5) / 2"))
    assert result.observation == "<tool_response>\n4\n</tool_response>" and not result.done
    assert result.info["tool_calls"] == 1 and result.info["turns"] == 1


def test_a_bad_calculator_expression_is_an_error_observation(env):
    result = call_sync(env.step, calculator("open('/etc/passwd')"))
    assert "error: only integers" in result.observation and not result.done


def test_a_correct_answer_ends_the_episode_with_reward_one(env):
    call_sync(env.step, calculator("2 * 3"))
    result = call_sync(env.step, "I think <answer>4 * (3 * 2)</answer>")
    assert result.done and result.reward == 1.0
    assert result.info["success"] is True and result.info["outcome"] == "success"
    assert result.info["turns"] == 2 and result.info["tool_calls"] == 1 and result.info["tool_seconds"] >= 0


@pytest.mark.parametrize(
    ("answer", "reason"),
    [("2 + 3 + 4", "wrong_value"), ("6 * 4", "wrong_numbers"), ("2 * 3 * 4 * 1", "wrong_numbers"),
     ("2 * * 3", "invalid_expression")],
)  # fmt: skip
def test_a_wrong_answer_ends_the_episode_with_reward_zero(env, answer, reason):
    result = call_sync(env.step, f"<answer>{answer}</answer>")
    assert result.done and result.reward == 0.0
    assert result.info["reason"] == reason and result.info["outcome"] == "failure"
