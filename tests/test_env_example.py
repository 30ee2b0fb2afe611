"""The README's custom env example is complete: it passes the contract check and plays."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from forge.env.check import check_env
from forge.env.tasks import load_tasks

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def example(monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.syspath_prepend(str(REPO))
    return importlib.import_module("examples.custom_env")


def test_the_example_is_under_30_lines():
    assert len((REPO / "examples" / "custom_env.py").read_text().splitlines()) <= 30


def test_the_example_passes_env_check_by_module_name(example):
    report = check_env("examples.custom_env:ReverseEnv")
    assert report.passed, report.render()


def test_the_example_rewards_the_reversed_word(example):
    task = load_tasks(example.ReverseEnv, None, num_tasks=1, seed=0)[0]
    env = example.ReverseEnv()
    env.reset(task, seed=0)
    assert env.step("nope").done is False
    result = env.step(task["word"][::-1])
    assert (result.observation, result.reward, result.done) == ("correct", 1.0, True)
