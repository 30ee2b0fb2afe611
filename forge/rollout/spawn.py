"""The spawn tool of agent clusters: an agent's call names sub-tasks, Forge plays one
sub-agent episode per sub-task concurrently on the same worker and engine (each with its
own context), and their answers come back as the tool's result.

Any `ToolEnv` gets the tool from config (`swarm.enabled`): the worker attaches a `Spawner`
to each episode's env. A sub-agent plays a `SubagentEnv`: its prompt as the first message,
the parent env's tools (those the call named, never spawn past `swarm.depth`), and it ends
with an answer: a reply with no tool call (its `<answer>`, else its text), or, when its
turns run out on a tool call, that call's response. A sub-agent that fails, errs or runs
past `swarm.timeout_s` returns an error result; the parent never waits longer than that.
"""

from __future__ import annotations

import asyncio
import inspect
import random
import time
from dataclasses import dataclass, replace
from typing import Any

from forge.env.base import Env, StepResult
from forge.env.tools import ToolCall, ToolEnv, calls_past_limit, in_thread, parse_answer, truncate
from forge.rollout.agent import run_episode
from forge.types import TIMEOUT, Trajectory

SPAWN_TOOL = "spawn"
# Past swarm.timeout_s the sub-agent's own deadline ends it; this is the backstop for an
# inline env call that cannot be interrupted.
TIMEOUT_GRACE_S = 1.0

SPAWN_SCHEMA: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": SPAWN_TOOL,
        "description": "Start sub-agents that work on sub-tasks at the same time; returns each one's answer.",
        "parameters": {
            "type": "object",
            "properties": {
                "tasks": {
                    "type": "array",
                    "description": "one entry per sub-agent",
                    "items": {
                        "type": "object",
                        "properties": {
                            "prompt": {
                                "type": "string",
                                "description": "the sub-task, as the sub-agent reads it",
                            },
                            "tools": {
                                "type": "array",
                                "items": {"type": "string"},
                                "description": "tool names the sub-agent may call (default: all but spawn)",
                            },
                        },
                        "required": ["prompt"],
                    },
                }
            },
            "required": ["tasks"],
        },
    },
}


@dataclass(frozen=True)
class SwarmLimits:
    """The `swarm.*` settings a spawner enforces."""

    max_per_call: int = 8
    max_per_episode: int = 16
    depth: int = 1
    timeout_s: float = 60.0
    subagent_max_turns: int = 4


@dataclass(frozen=True)
class SubTask:
    prompt: str
    tools: tuple[str, ...] | None = None  # None: every tool of the parent but spawn


def swarm_env_problem(env_class: type, env_name: str) -> str | None:
    """Why `swarm.enabled` cannot play env `env_name` (its class), or None: spawn is a tool, and
    only a ToolEnv has tools to offer it beside."""
    if issubclass(env_class, ToolEnv):
        return None
    return (
        f"swarm.enabled: env {env_name!r} ({env_class.__name__}) is not a forge.env.ToolEnv, so it has no "
        "tools to offer spawn beside; use a ToolEnv or set swarm.enabled: false"
    )


def tool_names(env: Env) -> list[str]:
    return [schema["function"]["name"] for schema in env.tools or []]


def read_subtask(item: Any, known_tools: list[str]) -> SubTask | str:
    """One entry of a spawn call's `tasks` as a SubTask, or what is wrong with it."""
    if isinstance(item, str):
        item = {"prompt": item}
    if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"].strip():
        return 'each task must be {"prompt": "<text>", "tools": [<names>]} with a non-empty prompt'
    unknown = set(item) - {"prompt", "tools"}
    if unknown:
        return f"unknown task fields {sorted(unknown)}: a task takes prompt and tools"
    tools = item.get("tools")
    if tools is None:
        return SubTask(item["prompt"])
    if not isinstance(tools, list) or not all(isinstance(name, str) for name in tools):
        return "tools must be a list of tool names"
    missing = [name for name in tools if name not in known_tools]
    if missing:
        return f"no such tools {missing} (tools: {', '.join(known_tools)})"
    return SubTask(item["prompt"], tuple(tools))


class SubagentEnv(Env):
    """A sub-agent's episode on its parent's env: the sub-task's prompt, the parent's tools
    (its parser, its formatting, its state), and an answer to end it."""

    def __init__(
        self, parent: ToolEnv, tools: list[str], max_turns: int, spawner: Spawner | None = None
    ) -> None:
        self.parent = parent
        self.allowed = list(tools) + ([SPAWN_TOOL] if spawner is not None else [])
        schemas = {schema["function"]["name"]: schema for schema in parent.tools or []}
        self.tools = [schemas.get(name, SPAWN_SCHEMA) for name in self.allowed] or None
        self.render_tools = parent.render_tools
        self.system_prompt = parent.subagent_system_prompt
        self.max_turns = max_turns
        self.spawner = spawner
        self.turns = 0
        # The sub-agent's own tool calls and error responses, as a ToolEnv counts its agent's
        # (the parent's counters hold the parent's calls; the step metrics add up every level).
        self.tool_calls = 0
        self.tool_errors = 0

    async def reset(self, task: dict[str, Any], seed: int) -> str:
        self.turns = self.tool_calls = self.tool_errors = 0
        self.prompt = str(task["prompt"])
        return self.prompt

    def info(self, **extra: Any) -> dict[str, Any]:
        return {"turns": self.turns, "tool_calls": self.tool_calls, "tool_errors": self.tool_errors, **extra}

    async def answer(self, answer: str) -> StepResult:
        answer = truncate(answer, self.parent.max_observation_chars)  # a tool's huge output, kept once
        # In a thread, as a ToolEnv grades its answers: a judge that blocks (a grader, a sandbox)
        # must not stall the worker's loop, where the sub-agent's timeout could not end it.
        success = await in_thread(self.parent.subtask_succeeded, self.prompt, answer)
        return StepResult(
            answer, reward=float(success), done=True, info=self.info(answer=answer, success=success)
        )

    async def step(self, action: str) -> StepResult:
        self.turns += 1
        calls, errors = self.parent.parse_calls(action)
        if not calls and not errors:
            found = parse_answer(action)
            return await self.answer(action.strip() if found is None else found)
        responses = [f"error: {message}" for message in errors]
        if len(calls) > self.parent.max_calls_per_turn:
            responses.append(calls_past_limit(self.parent.max_calls_per_turn))
        for call in calls[: self.parent.max_calls_per_turn]:
            self.tool_calls += 1
            responses.append(await self._call(call))
        self.tool_errors += sum(response.startswith("error:") for response in responses)
        if self.turns >= self.max_turns:  # out of turns: the last tool response is the answer
            return await self.answer(responses[-1])
        return StepResult(self.parent.format_responses(responses), info=self.info())

    async def _call(self, call: ToolCall) -> str:
        if call.name not in self.allowed:
            return f"error: tool {call.name!r} is not available to this sub-agent (tools: {', '.join(self.allowed)})"
        if call.name == SPAWN_TOOL:
            result: Any = await self.spawner.call(call.arguments)
        else:
            result = await self.parent._call(call)
        return result.observation if isinstance(result, StepResult) else str(result)


class Spawner:
    """One episode's spawn tool: runs the sub-agents of each call concurrently, keeps their
    trajectories (linked to the turn that started them) and counts them against the limits.

    `engine` is what sub-agents sample from (a frozen snapshot or the current policy);
    `parent_engine` is the one the spawning episode is registered with: it steps aside
    while it waits, so batches do not wait for it."""

    def __init__(
        self,
        env: ToolEnv,
        engine: Any,
        parent_engine: Any,
        chat: Any,
        limits: Any,
        swarm: SwarmLimits,
        task_id: str,
        group_id: str,
        seed: int,
        depth: int = 1,
        started: list[int] | None = None,
    ) -> None:
        self.env = env
        self.engine = engine
        self.parent_engine = parent_engine
        self.chat = chat
        self.limits = replace(limits, max_turns=swarm.subagent_max_turns, episode_timeout_s=swarm.timeout_s)
        self.swarm = swarm
        self.task_id = task_id
        self.group_id = group_id
        self.depth = depth
        self.rng = random.Random(seed)
        self.turn = 0  # the parent's current turn; the agent loop sets it before each env step
        # Sub-agents started in the whole episode, every level: nested spawners share it so
        # swarm.max_subagents_per_episode caps them all, as the README and the metrics count.
        self.started = started if started is not None else [0]
        self.trajectories: list[Trajectory] = []
        # One turn may hold several spawn calls, played one after another: they share one
        # swarm.timeout_s, so the turn never waits longer than wait_limit_s in all.
        self.waiting_turn = -1
        self.turn_deadline = 0.0

    @property
    def wait_limit_s(self) -> float:
        """The longest one spawn call waits: a sub-agent's own deadline (nested levels
        included) is swarm.timeout_s, the grace is the backstop's."""
        return self.swarm.timeout_s + TIMEOUT_GRACE_S

    def attach(self) -> None:
        """Offer the spawn tool on the episode's env."""

        async def spawn(tasks: list) -> str:
            return await self.call({"tasks": tasks})

        self.env.add_tool(SPAWN_SCHEMA, spawn)

    async def call(self, arguments: dict[str, Any]) -> str:
        """One spawn call: its sub-agents' answers (or errors), one per task, in order."""
        try:
            inspect.signature(lambda tasks: None).bind(**arguments)
        except TypeError:
            return 'error: spawn takes {"tasks": [{"prompt": "...", "tools": [...]}, ...]}'
        tasks = arguments["tasks"]
        if not isinstance(tasks, list) or not tasks:
            return 'error: spawn takes {"tasks": [{"prompt": "...", "tools": [...]}, ...]} with at least one task'
        known = [name for name in tool_names(self.env) if name != SPAWN_TOOL]
        if self.turn != self.waiting_turn:
            self.waiting_turn, self.turn_deadline = self.turn, time.monotonic() + self.swarm.timeout_s
        left_s = self.turn_deadline - time.monotonic()
        results: list[str] = [""] * len(tasks)
        runnable: list[tuple[int, SubTask]] = []
        for index, item in enumerate(tasks):
            task = read_subtask(item, known)
            if isinstance(task, str):
                results[index] = f"error: {task}"
            elif left_s <= 0:
                results[index] = (
                    f"error: this turn's spawn calls already took swarm.timeout_s={self.swarm.timeout_s:g}s; "
                    "this one was not started"
                )
            elif len(runnable) >= self.swarm.max_per_call:
                results[index] = (
                    f"error: at most {self.swarm.max_per_call} sub-agents per spawn call "
                    "(swarm.max_subagents_per_call); this one was not started"
                )
            elif self.started[0] >= self.swarm.max_per_episode:
                results[index] = (
                    f"error: this episode already started {self.swarm.max_per_episode} sub-agents "
                    "(swarm.max_subagents_per_episode); this one was not started"
                )
            else:
                self.started[0] += 1
                runnable.append((index, task))
        turn = self.turn
        self.parent_engine.unregister()
        try:
            finished = await asyncio.gather(*(self._run(task, known, left_s) for _, task in runnable))
        finally:
            self.parent_engine.register()
        for (index, _), trajectory in zip(runnable, finished, strict=True):
            trajectory.parent_turn = turn
            trajectory.depth = self.depth
            self.trajectories.append(trajectory)
            results[index] = subagent_result(trajectory, self.swarm.timeout_s)
        # Each answer gets its share of the observation limit, so one huge answer cannot push
        # the others out of what the spawning agent reads.
        share = max(1, self.env.max_observation_chars // len(results))
        return "\n".join(f"[{i + 1}] {truncate(result, share)}" for i, result in enumerate(results))

    async def _run(self, task: SubTask, known: list[str], left_s: float) -> Trajectory:
        seed = self.rng.getrandbits(31)
        nested = None
        if self.depth < self.swarm.depth:
            nested = Spawner(self.env, self.engine, self.engine, self.chat, self.limits, self.swarm,
                             self.task_id, f"{self.group_id}/sub", seed, self.depth + 1, self.started)  # fmt: skip
        env = SubagentEnv(self.env, list(task.tools) if task.tools is not None else known,
                          self.swarm.subagent_max_turns, nested)  # fmt: skip
        row = {"task_id": f"{self.task_id}/sub", "prompt": task.prompt}
        limits = replace(self.limits, episode_timeout_s=min(left_s, self.swarm.timeout_s))
        try:
            trajectory = await asyncio.wait_for(
                run_episode(
                    env,
                    row,
                    seed,
                    self.engine,
                    self.chat,
                    limits,
                    f"{self.group_id}/sub",
                    spawner=nested,
                ),  # fmt: skip
                timeout=limits.episode_timeout_s + TIMEOUT_GRACE_S,
            )
        except TimeoutError:
            trajectory = stand_in(
                row["task_id"], self.group_id, "truncated", f"{TIMEOUT} ran past {self.swarm.timeout_s}s"
            )
        except Exception as exc:  # run_episode records env failures itself; this is the engine or a bug
            trajectory = stand_in(row["task_id"], self.group_id, "error", f"{type(exc).__name__}: {exc}")
        # The env's own counts: a step cut off (by a timeout) returned no info, but its calls were made.
        trajectory.info.update(env.info())
        return trajectory


def subagent_result(trajectory: Trajectory, timeout_s: float) -> str:
    """What the parent reads for one sub-agent: its answer, or why there is none."""
    if trajectory.success:
        return str(trajectory.info.get("answer", ""))
    if trajectory.timed_out:
        return f"error: the sub-agent did not finish within swarm.timeout_s={timeout_s:g}s"
    if trajectory.error:
        return f"error: the sub-agent failed: {trajectory.error.splitlines()[0][:300]}"
    answer = trajectory.info.get("answer")
    if answer:
        return str(answer)
    return f"error: the sub-agent gave no answer in {trajectory.num_turns} turns"


def stand_in(task_id: str, group_id: str, status: str, error: str) -> Trajectory:
    """A sub-agent that left no trajectory (cut off from outside)."""
    return Trajectory(task_id=task_id, group_id=f"{group_id}/sub", token_ids=[], loss_mask=[],
                      behaviour_logprobs=[], policy_versions=[], prompt_length=0, status=status,  # type: ignore[arg-type]
                      error=error)  # fmt: skip


def with_subagents(
    trajectories: list[Trajectory],
    advantages: list[float],
    train_subagents: bool,
    estimator: str = "grpo",
    negative_weight: float = 1.0,
) -> tuple[list[Trajectory], list[float]]:
    """The episodes to train on and their advantages: the given ones and, with
    `train_subagents`, every sub-agent under each (of an episode that was not lost). A
    sub-agent is credited for its own sub-task: its outcome (1 when it finished) against
    the other sub-agents of its orchestrator's group, by `estimator`, its negative advantages
    times `negative_weight` like the orchestrators'. (Handing it the team's
    advantage instead was too noisy a signal for a sub-agent to learn its job from.)"""
    if not train_subagents:
        return trajectories, advantages
    from forge.reward.shaping import trajectory_advantages

    subagents = [sub for t in trajectories if t.status != "lost" for sub in t.all_subagents()]
    if not subagents:
        return trajectories, advantages
    own = trajectory_advantages(subagents, estimator, negative_weight=negative_weight)
    return [*trajectories, *subagents], [*advantages, *own]
