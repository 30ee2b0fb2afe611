"""The spawn tool of agent clusters, played through the agent loop with a rule-scripted
model: answers come back as the tool result, limits, timeouts and failures give error
results, sub-agents run concurrently, and trajectories keep the links."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import byte_chat
import pytest
from byte_chat import EOS

from forge.env import ToolEnv, tool
from forge.rollout.agent import EpisodeLimits, run_episode
from forge.rollout.engines.batching import BatchingEngine
from forge.rollout.engines.protocol import GenerationResult
from forge.rollout.spawn import Spawner, SwarmLimits
from forge.types import Trajectory, Turn

FACTS = {"a": "1", "b": "2", "c": "3", "d": "4"}


class ByteChat(byte_chat.ByteChat):
    """Every observation, tool results included, reads as a user message: the rule engine
    below answers the text after the last `user: `."""

    def observation_ids(self, observation, role="user"):
        return super().observation_ids(observation, "user")


class RuleEngine:
    """Replies `rule(last user message, whole prompt)`; records every batch's prompts."""

    def __init__(self, rule, policy_version: int = 3) -> None:
        self.rule = rule
        self.policy_version = policy_version
        self.batches: list[list[str]] = []

    def generate(self, requests):
        prompts = [ByteChat().decode(r.token_ids) for r in requests]
        self.batches.append(prompts)
        results = []
        for prompt in prompts:
            reply = self.rule(prompt.rsplit("user: ", 1)[1].removesuffix("\nassistant: "), prompt)
            if isinstance(reply, Exception):
                raise reply
            ids = ByteChat().encode(reply) + [EOS]
            results.append(GenerationResult(ids, [-0.5] * len(ids), True, self.policy_version, len(ids)))
        return results

    def release(self, episode_id):
        pass


class FactsEnv(ToolEnv):
    """Find the values of some keys; `lookup` reads one. Solved by an answer naming them all."""

    system_prompt = "facts"
    subagent_system_prompt = "helper"

    @tool
    async def lookup(self, key: str) -> str:
        """Read one key's value."""
        if key == "slow":
            await asyncio.sleep(3600)
        return f"{key}={FACTS[key]}"

    def reset(self, task, seed):
        self.keys = task["keys"]
        return "find " + " ".join(self.keys)

    def score_answer(self, answer):
        wanted = " ".join(FACTS.get(k, "?") for k in self.keys)
        return self.done(1.0 if answer == wanted else 0.0, answer == wanted)


def call(name: str, **arguments) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def team_rule(message: str, prompt: str) -> str:
    """The orchestrator spawns one helper per key, then answers from their results; a
    helper looks its key up, then answers with the value."""
    if message.startswith("find "):
        return call("spawn", tasks=[{"prompt": f"key {k}"} for k in message.split()[1:]])
    if message.startswith("key "):
        return call("lookup", key=message.split()[1])
    if "=" in message and "[1]" not in message:  # a helper's lookup result
        return f"<answer>{message.split('=')[1].split()[0]}</answer>"
    answers = [line.split("] ", 1)[1] for line in message.splitlines() if line.startswith("[")]
    return f"<answer>{' '.join(answers)}</answer>"


LIMITS = EpisodeLimits(max_turns=4, max_new_tokens=4096, max_context_tokens=1 << 20, step_timeout_s=30,
                       episode_timeout_s=60)  # fmt: skip


def play(keys, rule=team_rule, swarm=None, subagent_rule=None, env_class=None):
    """One orchestrator episode on FactsEnv (or `env_class`); sub-agents on a second engine
    when `subagent_rule`."""
    swarm = swarm or SwarmLimits()
    engine = RuleEngine(rule)
    sub_engine = RuleEngine(subagent_rule, policy_version=0) if subagent_rule else engine

    async def episode():
        batching = BatchingEngine(engine)
        sub_batching = BatchingEngine(sub_engine) if subagent_rule else batching
        env = (env_class or FactsEnv)()
        spawner = Spawner(env, sub_batching, batching, ByteChat(), LIMITS, swarm, "t", "g/0", seed=7)
        spawner.attach()
        try:
            return await run_episode(env, {"task_id": "t", "keys": keys}, 0, batching, ByteChat(), LIMITS, "g",
                                     spawner)  # fmt: skip
        finally:
            await batching.close()
            await sub_batching.close()

    return asyncio.run(episode()), engine, sub_engine


def tool_result(engine: RuleEngine, turn: int) -> str:
    """What the orchestrator read after its `turn`-th reply (0-based)."""
    prompts = [p for batch in engine.batches for p in batch if p.startswith("facts")]
    return prompts[turn + 1].rsplit("user: ", 1)[1]


def test_subagents_answers_come_back_as_the_spawn_result_and_the_episode_succeeds():
    trajectory, engine, _ = play(["a", "b", "c"])
    assert trajectory.status == "ok" and trajectory.success, trajectory.error
    assert "[1] 1\n[2] 2\n[3] 3" in tool_result(engine, 0)
    assert [sub.info["answer"] for sub in trajectory.subagents] == ["1", "2", "3"]


def test_each_subagent_counts_its_own_tool_calls_and_errors():
    def rule(message, prompt):  # helper b also calls a tool it is not given
        if message == "key b":
            return call("lookup", key="b") + call("nope")
        return team_rule(message, prompt)

    trajectory, _, _ = play(["a", "b"], rule=rule)
    assert trajectory.info["tool_calls"] == 1 and trajectory.info["tool_errors"] == 0  # its one spawn call
    counts = [(sub.info["tool_calls"], sub.info["tool_errors"]) for sub in trajectory.subagents]
    assert counts == [(1, 0), (2, 1)]


def test_a_subagents_calls_past_max_calls_per_turn_are_refused_with_an_error_as_the_agents_are():
    class TwoCallsEnv(FactsEnv):
        max_calls_per_turn = 2

    def rule(message, prompt):  # the helper looks its key up three times in one reply
        if message.startswith("key "):
            return call("lookup", key=message.split()[1]) * 3
        return team_rule(message, prompt)

    trajectory, engine, _ = play(["a"], rule=rule, env_class=TwoCallsEnv)
    helper = trajectory.subagents[0]
    helper_prompts = [p for batch in engine.batches for p in batch if p.startswith("helper")]
    assert "error: at most 2 tool calls per turn; the rest were ignored" in helper_prompts[1]
    assert helper.info["tool_calls"] == 2 and helper.info["tool_errors"] == 1


def test_the_spawn_tool_is_offered_in_the_prompt():
    _, engine, _ = play(["a"])
    first = engine.batches[0][0]
    assert '"name": "spawn"' in first and '"name": "lookup"' in first


def test_trajectories_link_each_subagent_to_the_turn_that_started_it():
    trajectory, _, _ = play(["a", "b"])
    assert len(trajectory.subagents) == 2
    for sub in trajectory.subagents:
        assert sub.parent_turn == 0 and sub.depth == 1 and sub.success and sub.num_turns == 2
        assert sub.token_ids[: sub.prompt_length] != trajectory.token_ids[: trajectory.prompt_length]
        assert sum(sub.loss_mask) > 0 and set(sub.policy_versions) == {-1, 3}
    # spawn turn: 1 + 2 (the longest helper), then the answer turn
    assert trajectory.critical_steps == 4 and trajectory.total_steps == 2 + 2 * 2


def test_subagents_generate_concurrently_in_shared_batches():
    _, engine, _ = play(["a", "b", "c", "d"])
    helper_batches = [sum(p.startswith("helper") for p in batch) for batch in engine.batches]
    # all four helpers' first turns in one batch, their second turns in another
    assert helper_batches.count(4) == 2 and sum(helper_batches) == 8


def test_subagents_sample_from_the_engine_they_are_given():
    def helper_rule(message, prompt):
        return team_rule(message, prompt)

    trajectory, engine, sub_engine = play(["a", "b"], subagent_rule=helper_rule)
    assert trajectory.success
    assert all(set(s.policy_versions) == {-1, 0} for s in trajectory.subagents)  # the frozen engine's version
    assert all(p.startswith("helper") for batch in sub_engine.batches for p in batch)
    assert not any(p.startswith("helper") for batch in engine.batches for p in batch)


def test_a_call_past_max_subagents_per_call_gets_errors_for_the_rest():
    trajectory, engine, _ = play(["a", "b", "c"], swarm=SwarmLimits(max_per_call=2))
    result = tool_result(engine, 0)
    assert "[1] 1\n[2] 2\n[3] error: at most 2 sub-agents per spawn call" in result
    assert len(trajectory.subagents) == 2


def test_an_episode_past_max_subagents_per_episode_gets_errors():
    def twice(message, prompt):
        if message.startswith("find "):
            return call("spawn", tasks=[{"prompt": "key a"}, {"prompt": "key b"}])
        if "[2] 2" in message and prompt.count("[1]") == 1:
            return call("spawn", tasks=[{"prompt": "key c"}, {"prompt": "key d"}])
        return team_rule(message, prompt)

    trajectory, engine, _ = play(["a", "b", "c", "d"], rule=twice, swarm=SwarmLimits(max_per_episode=3))
    assert "[1] 3\n[2] error: this episode already started 3 sub-agents" in tool_result(engine, 1)
    assert [s.parent_turn for s in trajectory.subagents] == [0, 0, 1]


def test_a_subagent_past_the_timeout_returns_an_error_and_the_orchestrator_goes_on():
    started = time.monotonic()
    trajectory, engine, _ = play(["a", "slow"], swarm=SwarmLimits(timeout_s=0.3))
    assert time.monotonic() - started < 10
    result = tool_result(engine, 0)
    assert "[1] 1\n[2] error: the sub-agent did not finish within swarm.timeout_s=0.3s" in result
    slow = trajectory.subagents[1]
    assert slow.status == "truncated" and not slow.success
    assert slow.info["tool_calls"] == 1  # the call it hung in counts
    assert trajectory.num_turns == 2 and trajectory.status == "ok"  # it answered after the error


def test_a_subagent_that_fails_returns_an_error_result():
    def rule(message, prompt):
        if message.startswith("key b"):
            return RuntimeError("engine fell over")
        return team_rule(message, prompt)

    def one_at_a_time(message, prompt):  # b alone in its call, so its batch holds no other helper
        if message.startswith("find "):
            return call("spawn", tasks=[{"prompt": "key b"}])
        return rule(message, prompt)

    trajectory, engine, _ = play(["b"], rule=one_at_a_time)
    assert "[1] error: the sub-agent failed: RuntimeError: engine fell over" in tool_result(engine, 0)
    assert trajectory.subagents[0].status == "error" and trajectory.num_turns == 2


def test_malformed_spawn_calls_come_back_as_errors():
    def rule(message, prompt):
        if message.startswith("find "):
            return call("spawn", tasks=[{"prompt": "key a", "tools": ["nope"]}, {"task": "x"}, "key b"])
        return team_rule(message, prompt)

    trajectory, engine, _ = play(["a"], rule=rule)
    result = tool_result(engine, 0)
    assert "[1] error: no such tools ['nope'] (tools: lookup)" in result
    assert '[2] error: each task must be {"prompt"' in result and "[3] 2" in result
    assert len(trajectory.subagents) == 1


def nesting_rule(message, prompt):
    """The team's rule, but each helper spawns one nested helper (which looks its key up)
    and answers with what that one returned."""
    if message.startswith("key ") and prompt.count("helper") == 1 and "nested" not in message:
        return call("spawn", tasks=[{"prompt": f"{message} nested"}])
    if message.startswith("key ") and "nested" in message:
        return call("lookup", key=message.split()[1])
    if "[1]" in message and prompt.startswith("helper"):
        return f"<answer>{message.split('] ', 1)[1]}</answer>"
    return team_rule(message, prompt)


def test_subagents_cannot_spawn_at_depth_1_and_can_at_depth_2():
    shallow, engine, _ = play(["a"], rule=nesting_rule)
    assert "error: tool 'spawn' is not available to this sub-agent (tools: lookup)" in json.dumps(
        [p for batch in engine.batches for p in batch]
    )
    assert shallow.subagents[0].subagents == []

    deep, _, _ = play(["a"], rule=nesting_rule, swarm=SwarmLimits(depth=2))
    assert deep.success, [s.info for s in deep.all_subagents()]
    child = deep.subagents[0]
    assert [s.depth for s in deep.all_subagents()] == [1, 2] and child.subagents[0].parent_turn == 0
    # orchestrator: spawn (1 + child's critical path 1 + 2) then answer; child: spawn then answer
    assert child.critical_steps == 1 + 2 + 1 and deep.critical_steps == 1 + 4 + 1


def built(turns: int, subagents=(), parent_turn=None) -> Trajectory:
    return Trajectory("t", "g", [], [], [], [], 0, turns=[Turn(0, 0, 0) for _ in range(turns)],
                      subagents=list(subagents), parent_turn=parent_turn)  # fmt: skip


@pytest.mark.parametrize(
    ("orchestrator", "critical", "total"),
    [
        (built(3), 3, 3),  # no sub-agents: critical steps are turns
        (
            built(2, [built(4, parent_turn=0), built(1, parent_turn=0)]),
            1 + 4 + 1,
            2 + 5,
        ),  # only the longest counts
        (built(3, [built(2, parent_turn=0), built(3, parent_turn=2)]), (1 + 2) + 1 + (1 + 3), 3 + 5),
    ],
)
def test_critical_steps_count_each_turn_plus_its_longest_subagent(orchestrator, critical, total):
    assert orchestrator.critical_steps == critical and orchestrator.total_steps == total


def test_max_subagents_per_episode_counts_every_level():
    trajectory, engine, _ = play(["a", "b"], rule=nesting_rule, swarm=SwarmLimits(depth=2, max_per_episode=3))
    assert len(trajectory.all_subagents()) == 3
    prompts = json.dumps([p for batch in engine.batches for p in batch])
    assert "this episode already started 3 sub-agents (swarm.max_subagents_per_episode)" in prompts


def test_a_huge_subagent_answer_leaves_room_for_the_others():
    class HugeEnv(FactsEnv):
        max_observation_chars = 1000

        @tool
        async def lookup(self, key: str) -> str:
            """Read one key's value."""
            return "x" * 100_000 if key == "a" else f"{key}={FACTS[key]}"

    def rule(message, prompt):  # helpers end on their lookup (one turn): its output is the answer
        if message.startswith("find "):
            return call("spawn", tasks=[{"prompt": "key a"}, {"prompt": "key b"}])
        return team_rule(message, prompt)

    trajectory, engine, _ = play(
        ["a", "b"], rule=rule, swarm=SwarmLimits(subagent_max_turns=1), env_class=HugeEnv
    )
    assert "[2] b=2" in tool_result(engine, 0)
    assert len(trajectory.subagents[0].info["answer"]) < 1100


def test_a_subagent_whose_judge_raises_fails_at_the_users_line():
    class BadJudgeEnv(FactsEnv):
        def subtask_succeeded(self, prompt, answer):
            raise KeyError("judge broke")

    trajectory, engine, _ = play(["a"], env_class=BadJudgeEnv)
    helper = trajectory.subagents[0]
    assert helper.status == "error" and not helper.success
    assert (
        helper.error.splitlines()[1].startswith(f"  at {__file__}:") and "subtask_succeeded" in helper.error
    )
    assert "[1] error: the sub-agent failed: KeyError" in tool_result(engine, 0)


def test_spawn_calls_in_one_turn_share_one_timeout():
    def rule(message, prompt):  # three spawn calls in one reply, each with a helper that hangs
        if message.startswith("find "):
            return call("spawn", tasks=[{"prompt": "key slow"}]) * 3
        return team_rule(message, prompt)

    trajectory, engine, _ = play(["a"], rule=rule, swarm=SwarmLimits(timeout_s=0.3))
    result = tool_result(engine, 0)
    assert result.count("error: the sub-agent did not finish within swarm.timeout_s=0.3s") == 1
    assert (
        result.count("this turn's spawn calls already took swarm.timeout_s=0.3s; this one was not started")
        == 2
    )
    assert len(trajectory.subagents) == 1 and trajectory.status == "ok" and trajectory.num_turns == 2


def test_a_subagent_whose_judge_hangs_is_cut_at_the_timeout_and_the_episode_goes_on():
    release = threading.Event()

    class HangingJudgeEnv(FactsEnv):
        def subtask_succeeded(self, prompt, answer):  # a grader that blocks: it must not stall the loop
            release.wait(60)
            return True

    started = time.monotonic()
    try:
        trajectory, engine, _ = play(["a"], swarm=SwarmLimits(timeout_s=0.5), env_class=HangingJudgeEnv)
    finally:
        release.set()
    assert time.monotonic() - started < 10
    assert "[1] error: the sub-agent did not finish within swarm.timeout_s=0.5s" in tool_result(engine, 0)
    assert trajectory.status == "ok" and trajectory.num_turns == 2
