"""The README walkthrough's env package (examples/reach): its solver is right, its splits are
disjoint, its demonstrations are what a rollout of the solver's moves would show the model,
and it passes the contract check."""

from __future__ import annotations

import itertools
import tomllib
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "reach"


@pytest.fixture
def reach(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    import reach_env

    return reach_env


def play(env, moves):
    results = [env.step(move) for move in moves]
    return results[-1] if results else None


def test_the_solver_finds_a_shortest_solution(reach):
    for target in range(2, 16):
        for start in range(1, target):
            moves = reach.solve(start, target)
            value = start
            for move in moves:
                value = reach.MOVES[move](value)
            assert value == target
            shorter = itertools.product(reach.MOVES, repeat=len(moves) - 1)
            assert not any(_ends_at(reach, start, target, seq) for seq in shorter), (start, target)


def _ends_at(reach, start, target, moves):
    value = start
    for move in moves:
        value = reach.MOVES[move](value)
    return value == target


def test_train_and_test_tasks_are_disjoint_pairs(reach):
    pairs = {split: {(t["start"], t["target"]) for t in reach.ReachEnv.generate_tasks(2000, 0, split=split)}
             for split in ("train", "test")}  # fmt: skip
    assert pairs["train"] and pairs["test"] and not pairs["train"] & pairs["test"]
    assert len(pairs["train"]) + len(pairs["test"]) == 105  # every pair 1 <= start < target <= 15


def test_demonstrations_are_the_env_played_by_the_solver(reach):
    tasks = reach.ReachEnv.generate_tasks(20, 3)
    for task, messages in zip(tasks, reach.ReachEnv.demonstrations(tasks), strict=True):
        env = reach.ReachEnv()
        assert messages[0] == {"role": "system", "content": reach.ReachEnv.system_prompt}
        assert messages[1] == {"role": "user", "content": env.reset(task, seed=0)}
        moves = [m["content"] for m in messages if m["role"] == "assistant"]
        assert moves == reach.solve(task["start"], task["target"])
        for index, message in enumerate(messages[2:], 2):  # each observation follows its move
            if message["role"] == "assistant":
                result = env.step(message["content"])
                if index + 1 < len(messages):
                    assert messages[index + 1] == {"role": "user", "content": result.observation}
        assert (result.reward, result.done) == (1.0, True)


def test_a_reply_counts_only_when_it_starts_with_a_move_written_exactly(reach):
    task = {"task_id": "1-15", "start": 1, "target": 15, "turns": 6}
    env = reach.ReachEnv()
    env.reset(task, seed=0)
    assert env.step("+3 then x2").observation.startswith("from 4 to 15")  # its first move counts
    assert env.step(" x2").observation.startswith("from 8 to 15")
    for loose in ("2", "3", "x 2", "+ 3", "+10", "x2x", "then +1", "higher"):  # no move: the turn is spent
        env.reset(task, seed=0)
        step = env.step(loose)
        assert step.observation == "from 1 to 15 5 turns left" and step.info == {"valid": False}, loose
    env.reset(task, seed=0)
    done = [env.step(move).done for move in ("x2", "x2", "x2", "x2")]
    assert done == [False, False, False, True]  # 16 overshoots 15


def test_tasks_cycle_through_every_pair_of_the_split(reach):
    test_pairs = reach.split_pairs("test")
    tasks = reach.ReachEnv.generate_tasks(len(test_pairs), 5, split="test")
    assert sorted((t["start"], t["target"]) for t in tasks) == sorted(test_pairs)  # each held-out pair once
    counts = Counter((t["start"], t["target"]) for t in reach.ReachEnv.generate_tasks(1000, 0))
    assert set(counts) == set(reach.split_pairs("train")) and max(counts.values()) - min(counts.values()) <= 1


def test_the_config_makes_each_move_one_token_of_the_tiny_model(reach):
    from forge.config import load_config
    from forge.models.tiny import build_tokenizer

    tokenizer = build_tokenizer(load_config(EXAMPLE / "reach.yaml").model.tiny.extra_words)
    for move in reach.MOVES:
        ids = tokenizer(move, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tokenizer.decode(ids) == move, move


def test_the_example_passes_env_check(reach):
    from forge.env.check import check_env

    report = check_env("reach_env:ReachEnv")
    assert report.passed, report.render()


def test_the_package_registers_the_env_the_config_names(reach):
    from forge.config import load_config

    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["forge.envs"] == {"reach": "reach_env:ReachEnv"}
    assert load_config(EXAMPLE / "reach.yaml").env.name == "reach"
