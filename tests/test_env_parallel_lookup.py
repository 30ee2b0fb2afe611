"""parallel_lookup: one agent needs a turn per key, a team spawning a sub-agent per key is
done in 2 critical steps; partial credit, sub-task judging, the grammar, registration."""

from __future__ import annotations

import asyncio
import tomllib
from pathlib import Path

import pytest
from test_swarm_spawn import RuleEngine

from forge.env.tools import ToolCall
from forge.rollout.agent import EpisodeLimits, run_episode
from forge.rollout.engines.batching import BatchingEngine
from forge.rollout.spawn import Spawner, SwarmLimits
from forge_envs.parallel_lookup import ParallelLookupEnv

TASK = {"task_id": "t", "keys": [3, 0, 5, 6], "table": [9, 1, 2, 4, 8, 15, 0, 7]}
LIMITS = EpisodeLimits(max_turns=6, max_new_tokens=64, max_context_tokens=1 << 20, step_timeout_s=30,
                       episode_timeout_s=60)  # fmt: skip


class WordChat:
    """Text chat over a toy word vocabulary (ids are positions in a growing table)."""

    eos_token_id = turn_end_id = 0
    stop_token_ids = [0]

    def __init__(self):
        self.words = ["<eos>"]

    def encode(self, text):
        ids = []
        for word in text.split(" "):
            if word not in self.words:
                self.words.append(word)
            ids.append(self.words.index(word))
        return ids

    def prompt_ids(self, observation, system_prompt=None, tools=None):
        assert tools is None  # the env explains its own grammar: no schemas in the prompt
        return self.encode(f"user: {observation} | assistant:")

    def observation_ids(self, observation, role="user"):
        return self.encode(f"user: {observation} | assistant:")

    def decode(self, token_ids):
        return " ".join(self.words[t] for t in token_ids if t != 0)


def play(rule, swarm: bool):
    chat = WordChat()

    class Engine(RuleEngine):
        def generate(self, requests):
            from forge.rollout.engines.protocol import GenerationResult

            results = []
            for request in requests:
                text = chat.decode(request.token_ids)
                message = text.rsplit("user: ", 1)[1].removesuffix(" | assistant:")
                ids = chat.encode(self.rule(message, text)) + [0]
                results.append(GenerationResult(ids, [-0.1] * len(ids), True, 1, len(ids)))
            return results

    async def episode():
        batching = BatchingEngine(Engine(rule))
        env = ParallelLookupEnv(num_keys=8, k=4)
        spawner = None
        if swarm:
            spawner = Spawner(
                env, batching, batching, chat, LIMITS, SwarmLimits(subagent_max_turns=1), "t", "g", 1
            )
            spawner.attach()
        try:
            return await run_episode(env, TASK, 0, batching, chat, LIMITS, "g", spawner)
        finally:
            await batching.close()

    return asyncio.run(episode())


def serial(message, prompt):
    """Look up the first asked key whose value has not come back yet."""
    asked = prompt.split("find ", 1)[1].split(" |")[0].split()
    seen = {line.split()[0] for line in prompt.split("user: ")[2:] if " is " in line}
    return next(key for key in asked if key not in seen)


def team(message, prompt):
    if message.startswith("find ") and len(message.split()) > 2:
        return "spawn " + " ".join(message.split()[1:])
    return message.split()[1]  # a sub-agent on `find 3` looks 3 up


def test_one_agent_needs_a_turn_per_key_and_earns_a_quarter_per_key():
    trajectory = play(serial, swarm=False)
    assert trajectory.success and trajectory.outcome == pytest.approx(1.0)
    assert trajectory.num_turns == 4 and trajectory.critical_steps == 4


def test_a_team_spawning_a_subagent_per_key_is_done_in_two_critical_steps():
    trajectory = play(team, swarm=True)
    assert trajectory.success and trajectory.outcome == pytest.approx(1.0), trajectory.info
    assert trajectory.num_turns == 1 and len(trajectory.subagents) == 4
    assert all(sub.success and sub.num_turns == 1 for sub in trajectory.subagents)
    assert trajectory.critical_steps == 2 and trajectory.total_steps == 5


def test_wrong_keys_earn_nothing_and_a_helper_on_another_key_did_not_finish():
    env = ParallelLookupEnv(num_keys=8, k=4)
    env.reset(TASK, 0)
    result = asyncio.run(env.step("1"))  # key 1 exists but was not asked
    assert result.observation == "1 is 1" and result.reward == 0.0 and not result.done
    result = asyncio.run(env.step("5"))
    assert result.reward == pytest.approx(0.25) and result.info["found"] == 1
    assert env.subtask_succeeded("find 3", "3 is 4") and not env.subtask_succeeded("find 3", "2 is 2")
    assert not env.subtask_succeeded("find 12", "12 is 0")


def test_the_grammar():
    env = ParallelLookupEnv()
    assert env.parse_calls("guess 4 then 7") == ([ToolCall("lookup", {"key": 4})], [])
    assert env.parse_calls("spawn 3 a 9") == (
        [ToolCall("spawn", {"tasks": [{"prompt": "find 3"}, {"prompt": "find 9"}]})],
        [],
    )
    assert env.parse_calls("spawn the") == ([], ["invalid"])
    assert env.parse_calls("higher") == ([], ["invalid"])


def test_without_the_spawn_tool_a_spawn_reply_is_an_error():
    env = ParallelLookupEnv(num_keys=8, k=4)
    env.reset(TASK, 0)
    result = asyncio.run(env.step("spawn 3 0"))
    assert result.observation.startswith("error: unknown tool 'spawn'") and not result.done


def test_demonstrations_solve_their_tasks():
    tasks = ParallelLookupEnv.generate_tasks(5, seed=0, num_keys=8, k=4)
    for task, transcript in zip(tasks, ParallelLookupEnv.demonstrations(tasks), strict=True):
        env = ParallelLookupEnv(num_keys=8, k=4)
        assert env.reset(task, 0) == transcript[0]["content"]
        replies = [m["content"] for m in transcript if m["role"] == "assistant"]
        results = [asyncio.run(env.step(reply)) for reply in replies]
        assert results[-1].done and results[-1].info["success"] and len(replies) == 4


def test_team_demonstrations_are_a_spawn_of_every_key_and_each_sub_agents_lookup():
    transcripts = ParallelLookupEnv.demonstrations([TASK], spawn=True, num_keys=8, k=4)
    assert len(transcripts) == 1 + len(TASK["keys"])
    replies = {messages[0]["content"]: messages[1]["content"] for messages in transcripts}

    def demonstrated(message, prompt):
        return replies[message]

    trajectory = play(demonstrated, swarm=True)
    assert trajectory.success and trajectory.num_turns == 1 and trajectory.critical_steps == 2
    assert all(sub.success for sub in trajectory.subagents) and len(trajectory.subagents) == 4


def test_it_is_registered_as_an_entry_point():
    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    entry = pyproject["project"]["entry-points"]["forge.envs"]["parallel_lookup"]
    assert entry == "forge_envs.parallel_lookup:ParallelLookupEnv"
