"""README's single-turn recipe (a prompt/answer file scored by a plain reward function, as a
TRL or verl user brings it) is complete: it passes the contract check on its task file and
scores as its reward function says."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from forge.env.check import check_env
from forge.env.tasks import tasks_from

REPO = Path(__file__).resolve().parent.parent
TASKS = str(REPO / "examples" / "prompt_answer.jsonl")


@pytest.fixture
def example(monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.syspath_prepend(str(REPO))
    return importlib.import_module("examples.prompt_answer")


def test_the_recipe_in_readme_is_the_tested_file():
    example = (REPO / "examples" / "prompt_answer.py").read_text().rstrip()
    assert f"```python\n{example}\n```" in (REPO / "README.md").read_text()


def test_the_recipe_passes_env_check_on_its_task_file(example):
    report = check_env("examples.prompt_answer:PromptAnswerEnv", tasks=TASKS)
    assert report.passed, report.render()


@pytest.mark.parametrize(
    ("reply", "reward", "success"),
    [
        ("so \\boxed{RIGHT}", 1.0, True),
        ("\\boxed{1} no, \\boxed{RIGHT}", 1.0, True),
        ("\\boxed{0}", 0.1, False),
        ("RIGHT", 0.0, False),
    ],
)
def test_one_reply_is_scored_by_the_reward_function_and_ends_the_episode(example, reply, reward, success):
    task = dict(tasks_from(TASKS)[0])
    env = example.PromptAnswerEnv()
    assert env.reset(task, seed=0) == task["prompt"]
    result = env.step(reply.replace("RIGHT", task["answer"]))
    assert (result.reward, result.done, result.info["success"]) == (reward, True, success)
