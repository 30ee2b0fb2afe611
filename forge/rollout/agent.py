"""The multi-turn agent loop: one episode, token in, token out.

Generated ids go into the trajectory exactly as sampled (loss mask 1, behaviour
logprob, policy version); a reply not ended by the template's turn end is closed with it,
and observations are appended through the chat template (mask 0).
The harness, not the env, enforces step and episode time limits.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Protocol

from forge.env.base import Env, reset_problem, step_problem
from forge.env.calls import EnvTimeout, call_env
from forge.env.errors import EnvContractError, describe_env_error
from forge.env.latency import unwrapped
from forge.rollout.chat import ChatFormat
from forge.rollout.engines.batching import BatchingEngine
from forge.rollout.engines.protocol import GenerationRequest
from forge.rollout.engines.remote import EngineLost
from forge.types import NO_VERSION, TIMEOUT, Trajectory, Turn


@dataclass(frozen=True)
class EpisodeLimits:
    max_turns: int
    max_new_tokens: int
    max_context_tokens: int
    step_timeout_s: float
    episode_timeout_s: float
    success_threshold: float = 0.5


class EpisodeSpawner(Protocol):
    """What the loop needs of an episode's spawn tool (`forge.rollout.spawn.Spawner`, which
    plays its sub-agents with `run_episode`): how long a step may wait for sub-agents, the
    turn that starts them, and the trajectories they left."""

    turn: int
    trajectories: list[Trajectory]

    @property
    def wait_limit_s(self) -> float: ...


def context_full(tokens: int, turns: int, limits: EpisodeLimits) -> tuple[str, str]:
    """The status and error of an episode whose `tokens` leave no room for a reply of
    rollout.max_new_tokens within rollout.max_context_tokens, after `turns` replies."""
    over = (
        f"{tokens} tokens plus rollout.max_new_tokens={limits.max_new_tokens} are over "
        f"rollout.max_context_tokens={limits.max_context_tokens}"
    )
    fix = "raise rollout.max_context_tokens (within the model's context) or lower rollout.max_new_tokens"
    if turns == 0:
        return (
            "error",
            f"context full before any reply: the prompt's {over}; {fix}, or shorten the env's prompt",
        )
    return (
        "truncated",
        f"context full: after {turns} replies the episode's {over}; {fix}, or lower rollout.max_turns",
    )


async def run_episode(
    env: Env,
    task: dict[str, Any],
    seed: int,
    engine: BatchingEngine,
    chat: ChatFormat,
    limits: EpisodeLimits,
    group_id: str,
    spawner: EpisodeSpawner | None = None,
) -> Trajectory:
    """Play one episode of `env` on `task`. With a `spawner` (agent clusters) the env
    offers the spawn tool; the sub-agents it ran come back in `Trajectory.subagents`."""
    started = time.monotonic()
    deadline = started + limits.episode_timeout_s
    token_ids: list[int] = []
    loss_mask: list[int] = []
    logprobs: list[float] = []
    versions: list[int] = []
    turns: list[Turn] = []
    outcome = 0.0
    status = "truncated"  # unless the env says done
    error: str | None = None
    info: dict[str, Any] = {}
    prompt_length = 0

    def append(ids: list[int], trainable: bool, lps: list[float] | None = None, version: int = NO_VERSION):
        token_ids.extend(ids)
        loss_mask.extend([1 if trainable else 0] * len(ids))
        logprobs.extend(lps if lps is not None else [0.0] * len(ids))
        versions.extend([version if trainable else NO_VERSION] * len(ids))

    # A step that spawns sub-agents may also wait for them, each bounded by swarm.timeout_s.
    step_limit = limits.step_timeout_s + (spawner.wait_limit_s if spawner is not None else 0.0)

    def remaining(limit: float = limits.step_timeout_s) -> float:
        return min(limit, deadline - time.monotonic())

    # The engine keeps this episode's KV cache under its id, and orders a batch's rows by
    # it: derived from the seeded group id and episode seed, so a rerun samples the same.
    episode_id = f"{group_id}/{seed:08x}"
    engine.register()
    try:
        observation = await call_env(env.reset, task, seed, timeout_s=remaining())
        problem = reset_problem(observation, env.system_prompt)
        if problem is not None:
            inner = unwrapped(env)  # the user's env, not the env.latency wrapper
            raise EnvContractError(f"{type(inner).__name__}.reset {problem}", inner.reset)
        # An env whose system prompt explains its own tool syntax shows no schemas.
        tools = env.tools if getattr(env, "render_tools", True) else None
        append(chat.prompt_ids(observation, env.system_prompt, tools), trainable=False)
        prompt_length = len(token_ids)
        for _ in range(limits.max_turns):
            if len(token_ids) + limits.max_new_tokens > limits.max_context_tokens:
                info["stop_reason"] = "context_full"
                # Said (once per kind, forge.failures.FailureWatch) and counted: before any
                # reply the episode is an error (nothing to train on), after one it is cut short.
                status, error = context_full(len(token_ids), len(turns), limits)
                break
            gen_started = time.monotonic()
            request = GenerationRequest(
                token_ids=list(token_ids), max_new_tokens=limits.max_new_tokens, episode_id=episode_id
            )
            result = await asyncio.wait_for(
                engine.generate(request), timeout=max(deadline - time.monotonic(), 0)
            )
            turn = Turn(
                start=len(token_ids), end=0, obs_end=0, generation_seconds=time.monotonic() - gen_started
            )
            info["context_tokens"] = info.get("context_tokens", 0) + len(request.token_ids)
            info["prefill_tokens"] = info.get("prefill_tokens", 0) + result.prefill_tokens
            append(result.token_ids, trainable=True, lps=result.logprobs, version=result.policy_version)
            turn.end = len(token_ids)
            turn.truncated = not result.finished
            if result.token_ids[-1:] != [chat.turn_end_id]:
                # Cut at max_new_tokens, or stopped at another end id (an eos beside the template's
                # turn end, one the generation config lists): closed with the turn end, so what
                # follows is what the template renders after an assistant message. The model did
                # not sample this token: it is not trained on.
                append([chat.turn_end_id], trainable=False)
            turns.append(turn)

            env_started = time.monotonic()
            if spawner is not None:
                spawner.turn = len(turns) - 1
            step = await call_env(env.step, chat.decode(result.token_ids), timeout_s=remaining(step_limit))
            turn.env_seconds = time.monotonic() - env_started
            problem = step_problem(step)
            if problem is not None:
                inner = unwrapped(env)
                raise EnvContractError(f"{type(inner).__name__}.step {problem}", inner.step)
            outcome += float(step.reward)
            info.update(step.info)
            if step.done:
                status = "ok"
                turn.obs_end = len(token_ids)
                break
            append(chat.observation_ids(str(step.observation)), trainable=False)
            turn.obs_end = len(token_ids)
        else:
            info["stop_reason"] = "max_turns"
    except EngineLost as exc:  # infrastructure, not the policy: counted, never trained on
        status, error = "lost", str(exc)
    except (TimeoutError, EnvTimeout) as exc:
        status, error = "truncated", f"{TIMEOUT} {exc}" if str(exc) else f"{TIMEOUT} episode time limit"
    except Exception as exc:
        status, error = "error", describe_env_error(exc, env)
    finally:
        engine.unregister()
        engine.release(episode_id)

    success = status == "ok" and bool(info.get("success", outcome >= limits.success_threshold))
    return Trajectory(
        task_id=str(task.get("task_id", "")),
        group_id=group_id,
        token_ids=token_ids,
        loss_mask=loss_mask,
        behaviour_logprobs=logprobs,
        policy_versions=versions,
        prompt_length=prompt_length,
        turns=turns,
        outcome=outcome,
        reward=outcome,
        success=success,
        status=status,  # type: ignore[arg-type]
        error=error,
        wall_seconds=time.monotonic() - started,
        info=info,
        subagents=list(spawner.trajectories) if spawner is not None else [],
    )
