"""Built-in tool envs played through the rollout agent loop with a scripted model: tool
calls, sandboxed tests and the env's info reach the Trajectory."""

from __future__ import annotations

import asyncio
import json

from byte_chat import EOS, ByteChat

from forge.rollout.agent import EpisodeLimits, run_episode
from forge.rollout.engines.batching import BatchingEngine
from forge.rollout.engines.protocol import GenerationResult
from forge_envs.countdown import CountdownEnv
from forge_envs.python_coding import PythonCodingEnv


class ScriptedEngine:
    """Replies with the next scripted text, whatever the prompt."""

    policy_version = 3

    def __init__(self, replies: list[str]) -> None:
        self.replies = list(replies)
        self.prompts: list[str] = []

    def generate(self, requests):
        results = []
        for request in requests:
            self.prompts.append(ByteChat().decode(request.token_ids))
            ids = ByteChat().encode(self.replies.pop(0)) + [EOS]
            results.append(
                GenerationResult(ids, [-0.5] * len(ids), True, self.policy_version, len(request.token_ids))
            )
        return results

    def load_weights(self, state_dict, version):
        pass

    def release(self, episode_id):
        pass


def play(env, task, replies):
    engine = ScriptedEngine(replies)
    limits = EpisodeLimits(
        max_turns=5, max_new_tokens=4096, max_context_tokens=1 << 20, step_timeout_s=30, episode_timeout_s=60
    )

    async def episode():
        batching = BatchingEngine(engine)
        try:
            return await run_episode(env, task, 0, batching, ByteChat(), limits, "group")
        finally:
            await batching.close()

    return asyncio.run(episode()), engine


def call(name: str, **arguments) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def test_a_coding_episode_debugs_in_the_sandbox_and_succeeds():
    task = next(t for t in PythonCodingEnv.generate_tasks(40, seed=0) if t["function_name"] == "dedupe")
    replies = [
        call("run_tests", code="def dedupe(xs):\n    return sorted(set(xs))\n"),
        call("run_tests", code="def dedupe(xs):\n    return list(dict.fromkeys(xs))\n"),
    ]
    trajectory, engine = play(PythonCodingEnv(), task, replies)
    assert trajectory.status == "ok" and trajectory.success and trajectory.outcome == 1.0, trajectory.error
    assert trajectory.num_turns == 2 and all(turn.env_seconds > 0 for turn in trajectory.turns)
    assert trajectory.info["tool_calls"] == 2 and trajectory.info["tool_seconds"] > 0
    assert '"name": "run_tests"' in engine.prompts[0]  # the tool schema reached the prompt
    assert "first failure: dedupe(" in engine.prompts[1]  # the sandbox's feedback reached the model


def test_a_countdown_episode_with_a_malformed_call_still_finishes():
    task = {"task_id": "t", "numbers": [2, 3, 4], "target": 24}
    replies = [
        "<tool_call>{calculator: 2*3}</tool_call>",
        call("calculator", expression="2*3*4"),
        "<answer>2*3*4</answer>",
    ]
    trajectory, engine = play(CountdownEnv(), task, replies)
    assert trajectory.status == "ok" and trajectory.success
    assert "error: tool call is not valid JSON" in engine.prompts[1] and "24" in engine.prompts[2]
    assert trajectory.info["turns"] == 3 and trajectory.info["outcome"] == "success"


def test_requests_that_arrive_while_the_batcher_closes_are_still_served():
    """One rollout call closing the batcher while another's episodes start (an async-mode
    worker runs overlapping calls) must neither strand their requests nor drop the new
    runner task."""
    engine = ScriptedEngine(["a", "b", "c"])

    def request(episode_id):
        from forge.rollout.engines.protocol import GenerationRequest

        return GenerationRequest(token_ids=[5, 6], max_new_tokens=4, episode_id=episode_id)

    async def scenario():
        batching = BatchingEngine(engine)
        batching.register()
        first = await batching.generate(request("first"))
        batching.unregister()
        closing = asyncio.create_task(batching.close())
        await asyncio.sleep(0)  # close has cancelled the runner and awaits it
        batching.register()
        later = asyncio.create_task(batching.generate(request("later")))
        await closing
        assert batching._runner is not None and not batching._runner.done()  # the new runner is kept
        second = await asyncio.wait_for(later, timeout=5)
        batching.unregister()
        await batching.close()
        return first, second

    first, second = asyncio.run(scenario())
    assert [ByteChat().decode(r.token_ids) for r in (first, second)] == ["a", "b"]
