"""One model call through the engine: n choices sampled from one prefill, each decoded as
it is sampled (stop strings end it token-exact; streaming sees each token), and recorded
as training samples once generation ends, unless the client went away first."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from forge.gateway.decoding import TextStream
from forge.gateway.episodes import CallRecord, EpisodeError
from forge.rollout.engines.protocol import GenerationRequest, GenerationResult
from forge.rollout.engines.remote import EngineLost, RequestAborted


@dataclass
class CallSpec:
    """A call as the engine runs it: the prompt (with any forced opening), its limits and
    sampling, and how its text is cut and held back."""

    prompt_ids: list[int]
    max_tokens: int
    n: int = 1
    temperature: float | None = None  # None: the engine's (the run's) setting
    top_p: float | None = None
    seed: int | None = None
    top_logprobs: int = 0
    stop: list[str] = field(default_factory=list)
    prefix: str = ""  # forced into the prompt; the reply's text goes on from it
    hold: Callable[[str], int] | None = None  # how much text is surely content (tool calls held back)
    # Makes, per choice, the finder of where its reply is complete (json mode), or None.
    end: Callable[[], Callable[[str], int | None]] | None = None


@dataclass
class Choice:
    index: int
    record: CallRecord
    text: str  # the reply's text, forced prefix included, cut before any stop string
    top_logprobs: list[list[tuple[int, float]]] | None


@dataclass
class TokenEvent:
    index: int
    text: str  # text settled by this token ("" while held back)
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


class CallRun:
    """Runs a `CallSpec` on the gateway's batching engine. With `stream`, every sampled
    token is put on `events` as it comes; `choices` resolves when all are done."""

    def __init__(self, gateway: Any, episode_id: str, spec: CallSpec, stream: bool) -> None:
        self.gateway = gateway
        self.episode_id = episode_id
        self.spec = spec
        self.stream = stream
        self.aborted = False
        # Set with `aborted`: the engine drops the call's rows at its next decode step (a call
        # with no token watcher, not streamed, would otherwise run on to its token limit).
        self.cancel = threading.Event()
        self.abort_reason: str | None = None  # why the gateway stopped it (its client did not leave)
        self.failure: str | None = None
        # In flight until the gateway keeps or drops it (`EpisodeStore.end_call`).
        self.episode, self.pending = gateway.store.begin_call(episode_id, self.abort)
        self.events: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.texts = [
            TextStream(
                gateway.tokenizer,
                spec.stop,
                gateway.hidden_ids,
                spec.prefix,
                spec.hold,
                spec.end() if spec.end is not None else None,
            )
            for _ in range(spec.n)
        ]
        self.task = asyncio.create_task(self._run())

    def abort(self, reason: str | None = None) -> None:
        """End generation at the next token and record nothing: the client is gone, or the
        gateway stopped the call for `reason` (which its client is told)."""
        self.aborted = True
        self.abort_reason = self.abort_reason or reason
        self.cancel.set()

    def sent_so_far(self, index: int) -> int:
        return self.texts[index].sent

    def _watcher(self, index: int, loop: asyncio.AbstractEventLoop) -> Callable | None:
        text = self.texts[index]
        if not (self.stream or text.stop or text.end):
            return None

        def on_token(token_id: int, logprob: float, top: list[tuple[int, float]]) -> bool:
            if self.aborted:
                return True
            try:
                stopped = text.push(token_id)
                piece = text.ready() if self.stream else ""
            except Exception as exc:  # never let one reply's decoding fail the engine's whole batch
                self.failure = f"decoding the reply failed: {type(exc).__name__}: {exc}"
                return True
            if self.stream:
                loop.call_soon_threadsafe(
                    self.events.put_nowait, TokenEvent(index, piece, token_id, logprob, top)
                )
            return stopped

        return on_token

    def _engine_name(self, index: int) -> str:
        # n > 1: every choice runs under its own name, so that none takes the episode's
        # cached KV and all share one prefill of the prompt.
        return self.episode_id if self.spec.n == 1 else f"{self.episode_id}#{index}"

    async def _run(self) -> list[Choice]:
        spec, loop = self.spec, asyncio.get_running_loop()
        requests, watchers = [], []
        group = self.episode.group_id or ""
        for index in range(spec.n):
            seed = None if spec.seed is None else (spec.seed + index) % 2**63
            name = self._engine_name(index)
            self.gateway.engine_names.setdefault(self.episode_id, set()).add(name)
            watchers.append(self._watcher(index, loop))
            requests.append(
                GenerationRequest(
                    list(spec.prompt_ids),
                    spec.max_tokens,
                    name,
                    temperature=spec.temperature,
                    top_p=spec.top_p,
                    seed=seed,
                    top_logprobs=spec.top_logprobs,
                    stop=list(self.texts[index].stop),
                    group_id=group,
                    on_token=watchers[-1],
                    cancel=self.cancel,
                )
            )
        started = time.monotonic()
        try:
            results: list[GenerationResult] = await asyncio.gather(
                *(self.gateway.batching.generate(request) for request in requests)
            )
        except EngineLost as exc:
            if isinstance(exc, RequestAborted):  # given up by the gateway: `finish_call` drops it
                raise EpisodeError(500, f"generation failed: {type(exc).__name__}: {exc}") from None
            # The engine server went away with the episode's context, not the agent or its
            # env: the episode is lost (never trained on, not an error), as on a rollout worker.
            await self.gateway.abandon_episode(self.episode_id, "lost", f"its engine was lost: {exc}")
            raise EpisodeError(
                503, f"episode {self.episode_id!r} is lost: its engine server was lost ({exc.reason})"
            ) from None
        except Exception as exc:
            raise EpisodeError(500, f"generation failed: {type(exc).__name__}: {exc}") from None
        seconds = time.monotonic() - started
        if self.failure is not None:
            raise EpisodeError(500, self.failure)
        choices = []
        for index, result in enumerate(results):
            text = self.texts[index]
            if watchers[index] is not None and not text.ids and result.token_ids:
                # An engine behind HTTP answers whole replies: its tokens go through the same
                # watcher now (a stream gets them all at once), cut where it says stop.
                result = self._replay(result, watchers[index])
                if self.failure is not None:
                    raise EpisodeError(500, self.failure)
            if len(text.ids) != len(result.token_ids):  # not watched
                text.take_all(result.token_ids)
            else:
                text.settle()
            record = CallRecord(
                list(spec.prompt_ids),
                list(result.token_ids),
                list(result.logprobs),
                result.policy_version,
                result.finished,
                seconds,
            )
            choices.append(Choice(index, record, text.final_text, result.top_logprobs))
        return choices

    @staticmethod
    def _replay(result: GenerationResult, on_token: Callable) -> GenerationResult:
        """A whole reply fed token by token to its watcher. Where the watcher stops it (a stop
        string, a closed JSON object), the reply ends there: the tokens after it were sampled
        but never shown to the client, so they are not part of the call. The rest are the
        engine's ids and logprobs, unchanged."""
        tops = result.top_logprobs
        for position, (token, logprob) in enumerate(zip(result.token_ids, result.logprobs, strict=True)):
            if on_token(token, logprob, tops[position] if tops else []):
                end = position + 1
                return GenerationResult(
                    result.token_ids[:end],
                    result.logprobs[:end],
                    True,
                    result.policy_version,
                    result.prefill_tokens,
                    tops[:end] if tops else tops,
                )
        return result
