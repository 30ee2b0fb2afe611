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


def test_discrete_actions_are_read_from_the_reply_as_a_number_or_a_name():
    env = GymEnv("FrozenLake-v1", is_slippery=False)
    env.reset({"seed": 0}, 0)
    assert env.step("I go right: 2").observation.splitlines()[1:] == ["S[F]FF", "FHFH", "FFFH", "HFFG"]
    assert env.step("now down").observation.splitlines()[1:] == ["SFFF", "F[H]FH", "FFFH", "HFFG"]


def test_an_unparseable_action_is_an_observation_not_an_error():
    env = GymEnv("FrozenLake-v1")
    env.reset({"seed": 0}, 0)
    result = env.step("jump please")
    assert result.observation.startswith("invalid action: Actions: 0 = left, 1 = down, 2 = right, 3 = up.")
    assert not result.done and result.info["valid"] is False


def test_an_ansi_render_is_the_observation_with_the_agents_cell_in_brackets():
    env = GymEnv("FrozenLake-v1")
    assert env.reset({"seed": 0}, 0) == "[S]FFF\nFHFH\nFFFH\nHFFG"
    assert "\x1b" not in env.step("right").observation


def test_the_system_prompt_describes_the_task_and_the_action_space():
    lake = GymEnv("FrozenLake-v1", description="Walk from S to G over the frozen lake; H is a hole.")
    assert lake.system_prompt == (
        "Walk from S to G over the frozen lake; H is a hole.\n"
        "Actions: 0 = left, 1 = down, 2 = right, 3 = up. Reply with one action, its number or its name."
    )
    assert GymEnv(env=EchoEnv()).system_prompt.endswith(
        "Reply with your action as text of at most 10000 characters."
    )
    unnamed = GymEnv("FrozenLake-v1", action_names=None)
    assert "0 = left" in unnamed.system_prompt  # the table knows FrozenLake


def test_a_user_function_turns_observations_into_text():
    def describe(observation, gym_env):
        player, dealer, usable_ace = observation
        return f"Your hand: {player}. Dealer shows {dealer}." + (
            " You hold a usable ace." if usable_ace else ""
        )

    env = GymEnv("Blackjack-v1", observation_fn=describe)
    assert env.reset({"seed": 0}, 0) == "Your hand: 11. Dealer shows 10."
    assert "0 = stick, 1 = hit" in env.system_prompt


def test_action_names_must_match_the_action_space():
    with pytest.raises(ValueError, match="action_names has 2 names for action space Discrete\\(4\\)"):
        GymEnv("FrozenLake-v1", action_names=["left", "right"])


class TwoRewards(gym.Env):
    """Pays 0.25 on the first step and 0.75 on the second, which ends it."""

    observation_space = gym.spaces.Text(max_length=8)
    action_space = gym.spaces.Text(max_length=8)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.steps = 0
        return "go", {}

    def step(self, action):
        self.steps += 1
        return "ok", [0.25, 0.75][self.steps - 1], self.steps == 2, False, {}


def test_the_episode_outcome_is_the_sum_of_step_rewards(tiny_checkpoint):
    """The reward rule (StepResult, README): the gymnasium return is the outcome."""
    import asyncio

    from forge.config import Config
    from forge.rollout.worker import RolloutWorker

    cfg = Config()
    cfg.rollout.max_turns = 4
    cfg.rollout.max_new_tokens = 2
    worker = RolloutWorker(str(tiny_checkpoint), cfg.model, cfg.env, cfg.rollout, 0.9, seed=0)
    worker.env_class, worker.env_kwargs = GymEnv, {"env": TwoRewards()}
    [episode] = asyncio.run(worker.rollout([{"task_id": "t", "seed": 1}], 1))
    assert episode.status == "ok" and episode.num_turns == 2
    assert episode.outcome == 1.0 and episode.success  # 0.25 + 0.75 reaches the 0.9 threshold


def test_an_unknown_gym_id_is_a_clear_error():
    with pytest.raises(ValueError, match="gymnasium cannot make 'NoSuchEnv-v0'"):
        GymEnv("NoSuchEnv-v0")


def test_the_adapter_passes_the_env_contract_check():
    report = check_env(GymEnv, {"env_id": "FrozenLake-v1"})
    assert report.passed, report.render()


def test_box_actions_are_read_as_the_replys_numbers_within_the_bounds():
    env = GymEnv("Pendulum-v1")
    assert "Reply with 1 number from -2 to 2." in env.system_prompt
    env.reset({"seed": 0}, 0)
    result = env.step("torque 1.5 please")
    assert result.info["valid"] is True and result.reward < 0  # Pendulum's cost, not the invalid-action 0
    outside = env.step("5")
    assert outside.info["valid"] is False and "outside" in outside.observation
    assert env.step("none").info["valid"] is False


class MultiDiscreteEnv(gym.Env):
    observation_space = gym.spaces.Discrete(2)
    action_space = gym.spaces.MultiDiscrete([2, 3])

    def reset(self, seed=None, options=None):
        return 0, {}

    def step(self, action):
        return 0, 0.0, True, False, {}


def test_an_action_space_it_cannot_read_is_refused_when_built_not_on_every_reply():
    with pytest.raises(ValueError, match="MultiDiscrete action spaces need GymEnv.parse_action overridden"):
        GymEnv(env=MultiDiscreteEnv())

    class Pairs(GymEnv):
        def parse_action(self, action):
            return [int(c) for c in action.split()[:2]]

    assert Pairs(env=MultiDiscreteEnv()).step("1 2").info["valid"] is True
