"""Episodes of black-box agents: their task, their env (the verifier), and every model call
they made, recorded token-exact, until they are finished and turned into training data.

Each call becomes its own `Sample` (prompt ids as rendered, generated ids as sampled);
all calls of an episode share the episode's advantage, computed over the group of
episodes that played the same task.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from forge.env.base import Env, StepResult, reset_problem, step_problem
from forge.env.calls import EnvTimeout, build_env, call_env, in_threads
from forge.env.closing import close_env
from forge.env.errors import EnvContractError, describe_env_error, error_headline
from forge.env.latency import unwrapped
from forge.types import NO_VERSION, EpisodeStatus, Sample, Trajectory, Turn


@dataclass
class CallRecord:
    """One model call: the prompt exactly as the gateway rendered and tokenized it, and
    the ids the engine sampled, with their behaviour logprobs and policy version."""

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    policy_version: int
    finished: bool  # ended on a stop token, not cut by max_tokens
    seconds: float = 0.0

    def to_sample(self, advantage: float, group_id: str) -> Sample:
        return Sample(
            token_ids=self.prompt_ids + self.completion_ids,
            loss_mask=[0] * len(self.prompt_ids) + [1] * len(self.completion_ids),
            behaviour_logprobs=[0.0] * len(self.prompt_ids) + list(self.logprobs),
            policy_versions=[NO_VERSION] * len(self.prompt_ids)
            + [self.policy_version] * len(self.completion_ids),
            advantage=advantage,
            group_id=group_id,
        )


# The error of an episode still live when its server stopped; how much longer than the step
# limit a server's shutdown waits for closes already running (they give up at that limit), and
# for calls stopped at that limit to come back (half of it: the rest is the closes').
EPISODE_ID = re.compile(r"ep-\d{6}-[0-9a-f]{8}")  # the form of the ids start() gives
SHUT_DOWN = "the server shut down before the episode finished"
SHUTDOWN_GRACE_S = 1.0


@dataclass(eq=False)
class PendingCall:
    """A model call of an episode from its start until it is kept or dropped (`ended` is
    then done); `abort(reason)` stops its generation at the next token."""

    abort: Callable[[str], None]
    ended: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class EpisodeError(Exception):
    """A request about an episode that cannot be served; `status` is the HTTP code, `code`
    and `param` OpenAI's error code and the field at fault where the API has them.
    `episode_id`: an episode the failed request started and ended at once (its env could
    not be built), kept in the store as an error for the caller to take or record."""

    def __init__(
        self,
        status: int,
        message: str,
        episode_id: str | None = None,
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.episode_id = episode_id
        self.code = code
        self.param = param


@dataclass
class Episode:
    episode_id: str
    task: dict[str, Any]
    group_id: str
    env: Env | None
    observation: str
    started: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    calls: list[CallRecord] = field(default_factory=list)
    steps: int = 0
    outcome: float = 0.0
    env_done: bool = False
    finished: bool = False
    status: EpisodeStatus = "ok"
    error: str | None = None
    wall_seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    handed_on: bool = False  # given to the store's `on_finished` (a recorder): once only
    # Calls still generating; an ended episode is sealed (recorded, or taken for training)
    # once they are done (or stopped, see `EpisodeStore._drain`): a call ending after that is
    # not kept, so what is recorded and what is trained on are the same calls.
    in_flight: set[PendingCall] = field(default_factory=set)
    sealed: bool = False

    def to_trajectory(self, success_threshold: float) -> Trajectory:
        """The episode as one Trajectory for reward shaping and metrics: its calls laid
        end to end, one Turn each (the trainer never sees this layout, only the samples)."""
        token_ids: list[int] = []
        mask: list[int] = []
        logprobs: list[float] = []
        versions: list[int] = []
        turns = []
        for call in self.calls:
            token_ids += call.prompt_ids
            start = len(token_ids)
            token_ids += call.completion_ids
            mask += [0] * len(call.prompt_ids) + [1] * len(call.completion_ids)
            logprobs += [0.0] * len(call.prompt_ids) + call.logprobs
            versions += [NO_VERSION] * len(call.prompt_ids) + [call.policy_version] * len(call.completion_ids)
            turns.append(
                Turn(start, len(token_ids), len(token_ids), call.seconds, truncated=not call.finished)
            )
        return Trajectory(
            task_id=str(self.task.get("task_id", "")),
            group_id=self.group_id,
            token_ids=token_ids,
            loss_mask=mask,
            behaviour_logprobs=logprobs,
            policy_versions=versions,
            prompt_length=len(self.calls[0].prompt_ids) if self.calls else 0,
            turns=turns,
            outcome=self.outcome,
            success=self.status in ("ok", "truncated") and self.outcome >= success_threshold,
            status=self.status,
            error=self.error,
            wall_seconds=self.wall_seconds,
            info={
                "episode_id": self.episode_id,
                "model_calls": len(self.calls),
                "env_steps": self.steps,
                **self.info,
            },
        )


class EpisodeStore:
    """All live and finished episodes of one gateway. Used from the server's event loop;
    `start`/`finish`/`take_finished` may also be awaited from the training loop's side
    through `GatewayServer.call`."""

    def __init__(
        self,
        env_factory: Any | None = None,
        step_timeout_s: float = 30.0,
        on_finished: Callable[[Episode], None] | None = None,
        keep_finished: int | None = None,
        max_live: int | None = None,
        env_name: str | None = None,
    ) -> None:
        self.env_factory = env_factory  # () -> Env; None: episodes carry no env
        self.env_name = env_name  # what messages call the env (default: the factory's name)
        # Building an env, like each reset and step, is given up on past this.
        self.step_timeout_s = step_timeout_s
        # A long-running gateway (forge serve) hands each finished episode to `on_finished`
        # (e.g. a recorder) and keeps only the last `keep_finished` of them; training takes
        # them itself and leaves both unset. Past `max_live` live episodes, the one used
        # least recently is ended to make room (see `over_capacity`).
        self.on_finished = on_finished
        self.keep_finished = keep_finished
        self.max_live = max_live
        self.episodes: dict[str, Episode] = {}
        self._finished: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._counter = itertools.count()
        self._locks: dict[str, asyncio.Lock] = {}
        # Ended episodes whose env is being closed or whose calls in flight are awaited, with that
        # work and the close alone (an episode past keep_finished is held here alone).
        self._settling: dict[str, tuple[Episode, asyncio.Future, asyncio.Future | None]] = {}

    def get(self, episode_id: str) -> Episode:
        episode = self.episodes.get(episode_id)
        if episode is None:
            raise EpisodeError(
                404,
                f"unknown episode {episode_id!r}: start one with POST /forge/episodes and send its id "
                "as the API key, the X-Forge-Episode header or the `user` field",
            )
        return episode

    def live(self, episode_id: str) -> Episode:
        episode = self.get(episode_id)
        if episode.finished:
            raise EpisodeError(409, f"episode {episode_id!r} is already finished; start a new one")
        episode.last_used = time.monotonic()
        return episode

    def over_capacity(self) -> list[str]:
        """Live episodes to end before one more starts, least recently used first."""
        if self.max_live is None:
            return []
        live = sorted((e for e in self.episodes.values() if not e.finished), key=lambda e: e.last_used)
        return [e.episode_id for e in live[: max(0, len(live) - self.max_live + 1)]]

    def lock(self, episode_id: str) -> asyncio.Lock:
        return self._locks.setdefault(episode_id, asyncio.Lock())

    async def start(
        self, task: dict[str, Any], group_id: str | None = None, seed: int | None = None
    ) -> Episode:
        """Start an episode: build its env and reset it on `task` (each within the step time
        limit). If either fails, the episode is ended as an error at once and `EpisodeError`
        says why (see `_failed_start`)."""
        episode_id = f"ep-{next(self._counter):06d}-{secrets.token_hex(4)}"  # EPISODE_ID's form
        group = group_id if group_id is not None else str(task.get("task_id", episode_id))
        env = None
        observation = str(task.get("prompt", ""))
        if self.env_factory is not None:
            started = time.monotonic()
            seed = seed if seed is not None else secrets.randbits(31)
            try:
                # This loop serves every agent: the constructor and reset run off it.
                with in_threads():
                    env = await build_env(self.env_factory, timeout_s=self.step_timeout_s, name=self.env_name)
                    observation = await call_env(env.reset, task, seed, timeout_s=self.step_timeout_s)
                problem = reset_problem(observation, env.system_prompt)
                if problem is not None:
                    inner = unwrapped(env)
                    raise EnvContractError(f"{type(inner).__name__}.reset {problem}", inner.reset)
            except Exception as exc:
                raise self._failed_start(episode_id, task, group, env, exc, started) from None
        episode = Episode(episode_id, dict(task), group, env, observation)
        self.episodes[episode_id] = episode
        return episode

    def _failed_start(
        self,
        episode_id: str,
        task: dict[str, Any],
        group: str,
        env: Env | None,
        exc: Exception,
        started: float,
    ) -> EpisodeError:
        """An episode whose env could not be built or reset, ended as an error (recorded, or
        taken by the training loop like any other; its env, if built, closed); the start
        request's error, an env fault: 504 when the call ran past the time limit, else 500."""
        episode = Episode(episode_id, dict(task), group, env, "", started=started)
        self.episodes[episode_id] = episode
        error = describe_env_error(exc, unwrapped(env) if env is not None else None)
        self._close(episode, "error", error)
        return EpisodeError(
            504 if isinstance(exc, EnvTimeout) else 500,
            f"episode {episode_id!r} could not start: {error_headline(error)}",
            episode_id=episode_id,
        )

    def begin_call(self, episode_id: str, abort: Callable[[str], None]) -> tuple[Episode, PendingCall]:
        """A model call of a live episode starts; it is in flight until `end_call`."""
        episode = self.live(episode_id)
        pending = PendingCall(abort)
        episode.in_flight.add(pending)
        return episode, pending

    def end_call(
        self, episode: Episode, pending: PendingCall, records: list[CallRecord], dropped: bool = False
    ) -> None:
        """A model call ended: its choices (`records`) are kept, or it is `dropped` (its client
        never saw it whole; counted in `calls_dropped`), or neither (it failed). A call that
        ends after its episode finished is kept like any other (the client raced its own
        finish: the tokens were sampled for it) unless the episode is sealed by then, when
        it raises `EpisodeError` (409) and nothing is kept."""
        if pending.ended.done():
            return
        pending.ended.set_result(None)
        episode.in_flight.discard(pending)
        if episode.sealed:  # a call dropped or failed now was counted when the episode was sealed
            if records:
                raise EpisodeError(
                    409,
                    f"episode {episode.episode_id!r} was finished while this call was generating and was "
                    "recorded (or taken for training) before the call ended: its reply is not kept",
                )
            return
        if dropped:
            episode.info["calls_dropped"] = episode.info.get("calls_dropped", 0) + 1
        episode.calls.extend(records)

    async def step(self, episode_id: str, action: str) -> StepResult:
        """Run the episode's env on `action` (a reply or a tool call): the agent's way to act
        in a built-in env and the env's way to score it."""
        episode = self.live(episode_id)
        if episode.env is None:
            raise EpisodeError(400, f"episode {episode_id!r} has no env to step; finish it with a reward")
        if episode.env_done:
            raise EpisodeError(409, f"episode {episode_id!r}: the env is done; finish the episode")
        async with self.lock(episode_id):
            try:
                with in_threads():  # this loop serves every agent: no env call runs on it
                    result = await call_env(episode.env.step, action, timeout_s=self.step_timeout_s)
            except Exception as exc:  # the env failed: the episode ends as an error, data kept
                self._close(episode, "error", describe_env_error(exc, episode.env))
                raise EpisodeError(
                    500, f"episode {episode_id!r}: env step failed: {type(exc).__name__}: {exc}"
                ) from None
            problem = step_problem(result)
            if problem is not None:
                raise EpisodeError(500, f"{type(unwrapped(episode.env)).__name__}.step {problem}")
            episode.steps += 1
            episode.info.update(result.info)
            if result.done:
                episode.env_done = True
                episode.outcome = float(result.reward)
            return result

    async def finish(
        self, episode_id: str, reward: float | None = None, answer: str | None = None
    ) -> Episode:
        """End an episode. Its outcome is `reward` if given; else the env scores `answer`
        (as a final step); else it is what the env's steps earned (0 if never done)."""
        episode = self.live(episode_id)
        if reward is None and answer is not None and episode.env is not None and not episode.env_done:
            await self.step(episode_id, answer)
            episode = self.get(episode_id)
            if episode.finished:  # the verifier raised
                return episode
        if reward is not None:
            episode.outcome = float(reward)
        status: EpisodeStatus = (
            "ok" if reward is not None or episode.env_done or episode.env is None else "truncated"
        )
        self._close(episode, status, None)
        return episode

    def abandon(self, episode_id: str, status: EpisodeStatus, error: str) -> None:
        """End an episode whose agent went away (crashed, timed out) without finishing it."""
        episode = self.get(episode_id)
        if not episode.finished:
            self._close(episode, status, error)

    def _close(self, episode: Episode, status: EpisodeStatus, error: str | None) -> None:
        episode.finished = True
        episode.status = status
        episode.error = error
        episode.wall_seconds = time.monotonic() - episode.started
        self._locks.pop(episode.episode_id, None)
        if episode.env is None and not episode.in_flight:
            self._hand_on(episode)
        else:  # closed off this loop and its calls awaited, within the step limit, unawaited
            try:
                asyncio.get_running_loop()
            except RuntimeError:  # called from plain code, not the server's loop: close here
                asyncio.run(self._settle(episode, None))
            else:
                closing = asyncio.ensure_future(self._close_env(episode)) if episode.env is not None else None
                settling = asyncio.ensure_future(self._settle(episode, closing))
                self._settling[episode.episode_id] = (episode, settling, closing)
        if self.keep_finished is not None:
            self._finished[episode.episode_id] = None
            while len(self._finished) > self.keep_finished:
                self.episodes.pop(self._finished.popitem(last=False)[0], None)

    def _seal(self, episode: Episode) -> None:
        """An ended episode's calls are final: any still in flight is counted as dropped here,
        and is not kept when it ends (`end_call`)."""
        if not episode.sealed:
            episode.sealed = True
            if episode.in_flight:
                episode.info["calls_dropped"] = episode.info.get("calls_dropped", 0) + len(episode.in_flight)

    def _hand_on(self, episode: Episode) -> None:
        """Seal an ended episode and give it to `on_finished` (a recorder), after its env's
        close and its calls in flight, once."""
        self._seal(episode)
        if self.on_finished is not None and not episode.handed_on:
            episode.handed_on = True
            self.on_finished(episode)

    async def _settle(self, episode: Episode, closing: asyncio.Future | None) -> None:
        """Close an ended episode's env (`closing`, or here when there is no loop to run it
        on) while its calls in flight end, then hand it on, its close's outcome and every
        call with it."""
        try:
            if closing is None and episode.env is not None:
                closing = asyncio.ensure_future(self._close_env(episode))
            await asyncio.gather(*([closing] if closing is not None else []), self._drain(episode))
        finally:
            self._settling.pop(episode.episode_id, None)
            self._hand_on(episode)

    async def _close_env(self, episode: Episode) -> None:
        """Close an ended episode's env; a close that raises or runs over is printed once
        per kind and noted as `info["close_error"]`, the episode's outcome untouched."""
        with in_threads():
            error = await close_env(unwrapped(episode.env), self.step_timeout_s)
        if error is not None:
            episode.info["close_error"] = error

    async def _drain(self, episode: Episode) -> None:
        """Wait for an ended episode's calls still generating (an agent that finished while
        one ran), up to the step limit; those still running then are stopped at their next
        token and not kept (their clients are told why), waited for a moment more."""
        waiting = {pending.ended for pending in episode.in_flight}
        if not waiting:
            return
        _, late = await asyncio.wait(waiting, timeout=self.step_timeout_s)
        if not late:
            return
        for pending in list(episode.in_flight):
            pending.abort(
                f"episode {episode.episode_id!r} was finished while this call was generating, and the "
                f"call ran on past the step limit ({self.step_timeout_s:g}s, env.step_timeout_s): it was "
                "stopped and its reply is not kept"
            )
        await asyncio.wait(late, timeout=SHUTDOWN_GRACE_S / 2)

    def stop_calls(self, episode_ids: list[str], reason: str) -> int:
        """Give up the calls still generating for these episodes, e.g. when no agent is left
        to read them: dropped now (not kept, counted in `calls_dropped`, not waited for), and
        stopped at the engine's next decode step (on an engine server: cancelled or aborted there);
        their clients, if any, are told `reason`. Returns how many."""
        stopped = 0
        for episode_id in episode_ids:
            episode = self.get(episode_id)
            for pending in list(episode.in_flight):
                pending.abort(reason)
                self.end_call(episode, pending, [], dropped=True)
                stopped += 1
        return stopped

    async def closed(self, episode_ids: list[str]) -> None:
        """Wait until these ended episodes are settled: their envs closed and their calls in
        flight ended (each within the step limit), so their close errors and every call
        kept are in what `take` returns, and no call is added after."""
        settling = [self._settling[e][1] for e in episode_ids if e in self._settling]
        if settling:
            await asyncio.wait(settling)

    async def shutdown(self) -> int:
        """The server is stopping: end every live episode (truncated), wait for the closes
        still running (each gives up at the step limit, so this waits at most about that
        long), and hand on every ended episode exactly once, its close's outcome noted; one
        whose close has still not ended is handed on with that said as its `close_error`.
        Returns how many closes it waited for."""
        for episode in [e for e in self.episodes.values() if not e.finished]:
            self._close(episode, "truncated", SHUT_DOWN)
        pending = list(self._settling.values())
        if pending:
            await asyncio.wait(
                [settling for _, settling, _ in pending], timeout=self.step_timeout_s + SHUTDOWN_GRACE_S
            )
        for episode, settling, closing in pending:
            if not settling.done():
                if (
                    closing is not None and not closing.done()
                ):  # an async close that ignored being given up on
                    episode.info["close_error"] = (
                        f"EnvTimeout: its close had not ended when the server shut down "
                        f"({self.step_timeout_s + SHUTDOWN_GRACE_S:g}s after)"
                    )
                    closing.cancel()
                self._hand_on(episode)  # a call still in flight is counted as dropped
                settling.cancel()
        return len(pending)

    def take(self, episode_ids: list[str]) -> list[Episode]:
        """Remove finished episodes from the store and return them."""
        taken = []
        for episode_id in episode_ids:
            episode = self.get(episode_id)
            if not episode.finished:
                raise EpisodeError(409, f"episode {episode_id!r} is still running")
            self._seal(episode)  # a call that ends later is not added to what was taken
            taken.append(self.episodes.pop(episode_id))
            self._finished.pop(episode_id, None)
        return taken


def episode_samples(episodes: list[Episode], advantages: list[float]) -> list[Sample]:
    """One sample per model call, each carrying its episode's advantage; lost episodes and
    calls that generated nothing are left out."""
    return [
        call.to_sample(advantage, episode.group_id)
        for episode, advantage in zip(episodes, advantages, strict=True)
        if episode.status != "lost"
        for call in episode.calls
        if call.completion_ids
    ]
