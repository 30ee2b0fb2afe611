"""GymEnv: a gymnasium env with text observations and actions plays as a Forge env."""

from __future__ import annotations

import gymnasium as gym
import pytest

from forge.env.check import check_env
from forge.env.gym_adapter import GymEnv


class EchoEnv(gym.Env):
    """Text in, text out: repeat the shown word; three tries."""

    observation_space = gym.spaces.Text(max_length=32)
    action_space = gym.spaces.Text(max_length=10_000)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.word = ["alpha", "beta", "gamma"][int(self.np_random.integers(3))]
        self.tries = 0
        return self.word, {}

    def step(self, action):
        self.tries += 1
        hit = action.strip() == self.word
        return ("right" if hit else "wrong"), float(hit), hit, self.tries >= 3, {"tries": self.tries}


def test_text_spaces_pass_straight_through():
    env = GymEnv(env=EchoEnv())
    word = env.reset({"seed": 3}, seed=0)
    result = env.step(f"  {word} ")
    assert (result.observation, result.reward, result.done) == ("right", 1.0, True)
    assert result.info["terminated"] is True and result.info["tries"] == 1


def test_the_task_seed_fixes_the_instance_for_every_episode():
    env = GymEnv(env=EchoEnv())
    assert len({env.reset({"seed": 11}, seed=s) for s in range(10)}) == 1


def test_gymnasium_truncation_ends_the_episode():
    env = GymEnv(env=EchoEnv())
    env.reset({"seed": 0}, 0)
    results = [env.step("nope") for _ in range(3)]
    assert [r.done for r in results] == [False, False, True] and results[-1].info["truncated"] is True


def test_discrete_actions_are_read_from_the_reply():
    env = GymEnv("FrozenLake-v1", is_slippery=False)
    assert env.reset({"seed": 0}, 0) == "0"
    assert env.step("I go right: 2").observation == "1"


def test_an_unparseable_action_is_an_observation_not_an_error():
    env = GymEnv("FrozenLake-v1")
    env.reset({"seed": 0}, 0)
    result = env.step("up please")
    assert result.observation.startswith("invalid action: reply with an integer action from 0 to 3")
    assert not result.done and result.info["valid"] is False


def test_an_unknown_gym_id_is_a_clear_error():
    with pytest.raises(ValueError, match="gymnasium cannot make 'NoSuchEnv-v0'"):
        GymEnv("NoSuchEnv-v0")


def test_the_adapter_passes_the_env_contract_check():
    report = check_env(GymEnv, {"env_id": "FrozenLake-v1"})
    assert report.passed, report.render()
