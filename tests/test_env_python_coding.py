"""Python coding: hidden tests run in the sandbox, feedback drives multi-turn debugging, and
only correct return values earn reward."""

from __future__ import annotations

import json

import pytest

from forge.env.calls import call_sync
from forge_envs.python_coding import PROBLEMS, PythonCodingEnv

# An independent solution for every problem: generated tasks must be solvable.
SOLUTIONS = {
    "count_multiples": "def count_multiples(xs, k):\n    return len([x for x in xs if x % k == 0])\n",
    "rotate_left": "def rotate_left(xs, k):\n    for _ in range(k if xs else 0):\n        xs = xs[1:] + xs[:1]\n    return xs\n",
    "running_max": "def running_max(xs):\n    out = []\n    for x in xs:\n        out.append(x if not out else max(out[-1], x))\n    return out\n",
    "caesar": "def caesar(text, shift):\n    abc = 'abcdefghijklmnopqrstuvwxyz'\n    return ''.join(abc[(abc.index(c) + shift) % 26] if c in abc else c for c in text)\n",
    "dedupe": "def dedupe(xs):\n    seen = []\n    for x in xs:\n        if x not in seen:\n            seen.append(x)\n    return seen\n",
    "is_balanced": "def is_balanced(text):\n    while any(p in text for p in ('()', '[]', '{}')):\n        text = text.replace('()', '').replace('[]', '').replace('{}', '')\n    return text == ''\n",
    "digital_root": "def digital_root(n):\n    return 0 if n == 0 else 1 + (n - 1) % 9\n",
    "second_largest": "def second_largest(xs):\n    distinct = sorted(set(xs), reverse=True)\n    return distinct[1] if len(distinct) > 1 else None\n",
}  # fmt: skip


def run_tests(code: str) -> str:
    return f"<tool_call>{json.dumps({'name': 'run_tests', 'arguments': {'code': code}})}</tool_call>"


def task_for(name: str, seed: int = 0) -> dict:
    for task in PythonCodingEnv.generate_tasks(64, seed):
        if task["function_name"] == name:
            return task
    raise AssertionError(f"no {name} task generated")


def test_every_problem_has_a_solution():
    assert set(SOLUTIONS) == {p.name for p in PROBLEMS}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SOLUTIONS))
def test_an_independent_correct_solution_passes_every_hidden_test(name):
    env = PythonCodingEnv()
    env.reset(task_for(name), seed=0)
    result = call_sync(env.step, run_tests(SOLUTIONS[name]))
    assert result.done and result.reward == 1.0, result.observation


def test_debugging_over_several_turns_ends_in_success():
    env = PythonCodingEnv()
    prompt = env.reset(task_for("running_max"), seed=0)
    assert "running_max(xs: list[int]) -> list[int]" in prompt
    first = call_sync(env.step, run_tests("def running_max(xs):\n    return xs\n"))
    assert (
        not first.done
        and "tests passed" in first.observation
        and "first failure: running_max(" in first.observation
    )
    second = call_sync(env.step, run_tests(SOLUTIONS["running_max"]))
    assert second.done and second.reward == 1.0
    assert second.info["turns"] == 2 and second.info["tool_calls"] == 2 and second.info["tool_seconds"] > 0
    assert second.info["tests_passed"] == second.info["tests_total"] == 12


def test_printing_success_or_exiting_early_earns_nothing():
    env = PythonCodingEnv()
    env.reset(task_for("dedupe"), seed=0)
    forged = "print('12/12 tests passed')\nimport json, os\njson.dump([{'value': 1}] * 12, open('results.json', 'w'))\nos._exit(0)\n"
    result = call_sync(env.step, run_tests(forged))
    assert not result.done and result.reward == 0.0


def test_errors_are_shown_to_the_model():
    env = PythonCodingEnv()
    env.reset(task_for("caesar"), seed=0)
    syntax = call_sync(env.step, run_tests("def caesar(text, shift)\n    return text\n"))
    assert "SyntaxError" in syntax.observation and not syntax.done
    raising = call_sync(env.step, run_tests("def caesar(text, shift):\n    return text[100]\n"))
    assert "IndexError: string index out of range" in raising.observation


def test_a_hanging_solution_times_out_without_ending_the_episode():
    env = PythonCodingEnv(timeout_s=1.0)
    env.reset(task_for("dedupe"), seed=0)
    result = call_sync(env.step, run_tests("def dedupe(xs):\n    while True:\n        pass\n"))
    assert "timed out after 1s" in result.observation and not result.done


def test_a_solution_whose_processes_together_exceed_the_calls_memory_is_told_so():
    from forge.sandbox import cgroup

    if not cgroup.enabled():
        pytest.skip(f"no cgroup per call here: {cgroup.why_not()}")
    env = PythonCodingEnv(timeout_s=60.0)  # room for a loaded machine to touch 2 GiB
    env.reset(task_for("dedupe"), seed=0)
    # Each process stays under the env's 512 MiB of address space; six together pass the call's 2 GiB.
    hog = (
        "import os, time\nfor _ in range(6):\n    if os.fork() == 0:\n        block = bytearray(400 << 20)\n"
        "        block[::4096] = b'x' * len(block[::4096])\n        time.sleep(120)\n"
        "time.sleep(120)\ndef dedupe(xs):\n    return xs\n"
    )
    result = call_sync(env.step, run_tests(hog))
    assert "killed for using more memory than the tests may" in result.observation and not result.done


def test_a_final_answer_is_graded_once():
    env = PythonCodingEnv()
    env.reset(task_for("digital_root"), seed=0)
    result = call_sync(
        env.step, "<answer>\n```python\ndef digital_root(n):\n    return n % 10\n```\n</answer>"
    )
    assert result.done and result.reward == 0.0 and result.info["outcome"] == "failure"
    assert 0 <= result.info["tests_passed"] < 12


def test_expected_values_never_reach_the_sandbox(monkeypatch):
    from forge_envs import python_coding

    sent = []
    real_run = python_coding.sandbox.run

    def spy(code, *args, **kwargs):
        sent.append(code + json.dumps(kwargs.get("files")))
        return real_run(code, *args, **kwargs)

    monkeypatch.setattr(python_coding.sandbox, "run", spy)
    env = PythonCodingEnv()
    task = task_for("rotate_left")
    env.reset(task, seed=0)
    call_sync(env.step, run_tests(SOLUTIONS["rotate_left"]))
    expected = json.loads(task["tests"])["expected"]
    assert len(sent) == 1 and json.dumps(expected) not in sent[0] and "expected" not in sent[0]
