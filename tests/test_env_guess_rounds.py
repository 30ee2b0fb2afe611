"""guess_rounds, the straggler env: guess-the-number over a long-tailed number of rounds."""

from __future__ import annotations

import statistics

import pytest

from forge.env.calls import call_sync
from forge_envs.guess_rounds import GuessRoundsEnv, rounds_weights


def test_episode_lengths_vary_widely_most_short_a_few_long():
    tasks = GuessRoundsEnv.generate_tasks(2000, seed=0, n=4, max_rounds=8, tail_exponent=1.5)
    rounds = [len(t["secrets"]) for t in tasks]
    assert min(rounds) == 1 and max(rounds) == 8
    assert statistics.median(rounds) == 1  # half or more are one round (1-3 turns)
    assert sum(r >= 5 for r in rounds) / len(rounds) > 0.08  # and about one in ten is 5-8 rounds (5-24 turns)
    shares = [rounds.count(k) / len(rounds) for k in range(1, 9)]
    assert shares == pytest.approx(rounds_weights(8, 1.5), abs=0.03)


def test_tasks_are_reproducible_from_the_seed():
    assert GuessRoundsEnv.generate_tasks(50, seed=3) == GuessRoundsEnv.generate_tasks(50, seed=3)
    assert GuessRoundsEnv.generate_tasks(50, seed=3) != GuessRoundsEnv.generate_tasks(50, seed=4)


def test_solving_every_round_succeeds_with_reward_one():
    env = GuessRoundsEnv()
    assert (
        call_sync(env.reset, {"task_id": "t", "n": 4, "secrets": [2, 0, 3]}, 0)
        == "guess a number from 0 to 3"
    )
    replies = [env.step(guess) for guess in ("1", "2", "0", "3")]
    assert [r.observation for r in replies] == [
        "higher", "correct guess a number from 0 to 3", "correct guess a number from 0 to 3", "correct",
    ]  # fmt: skip
    assert [r.done for r in replies] == [False, False, False, True]
    assert sum(r.reward for r in replies) == pytest.approx(1.0)
    assert replies[-1].info["success"] is True and replies[-1].info["turns"] == 4


def test_a_round_out_of_guesses_ends_the_episode_with_the_rounds_solved_so_far():
    env = GuessRoundsEnv(guesses_per_round=2)
    env.reset({"n": 4, "secrets": [1, 3]}, 0)
    replies = [env.step(guess) for guess in ("1", "0", "hmm")]
    assert replies[-1].done and replies[-1].info == {
        "turns": 3,
        "rounds": 2,
        "rounds_solved": 1,
        "success": False,
    }
    assert sum(r.reward for r in replies) == pytest.approx(0.5)
    assert replies[1].observation == "higher"


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="n=1"):
        GuessRoundsEnv(n=1)
    with pytest.raises(ValueError, match="max_rounds=0"):
        GuessRoundsEnv(max_rounds=0)
