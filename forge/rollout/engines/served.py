"""An engine as a server runs it: generation paused around weight updates, a bounded
cache of episodes' KV (least recently used evicted first), and the counts behind
`/forge/metrics` (requests, tokens, prefix-cache hits)."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from forge.rollout.engines.protocol import GenerationRequest, GenerationResult


class ServedEngine:
    """Wraps an engine (HFEngine) for many clients at once; itself an `InferenceEngine`.

    `pause()` holds new batches back and returns once the running one has finished, so a
    weight update never lands under a batch and every token's version is the one that
    sampled it. The wrapped engine keeps each episode's KV so that its next turn prefills
    only the new tokens, and an ended episode's for later episodes to start from (its group's
    prompt, a shared system prompt: `HFEngine.retire`); here that cache is bounded to
    `cache_tokens` tokens: past it, ended episodes are dropped first, then live ones (whose
    next turn is prefilled afresh), each the least recently used first."""

    def __init__(self, engine: Any, cache_tokens: int = 65536) -> None:
        if cache_tokens < 0:
            raise ValueError(f"cache_tokens={cache_tokens}: give 0 (keep no episode between calls) or more")
        self.engine = engine
        self.cache_tokens = cache_tokens
        # episode -> tokens it holds, least recently used first: live episodes, and ended ones
        # whose KV the engine keeps for later episodes (`HFEngine.retire`) until evicted.
        self._live: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._ended: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._state = threading.Condition()
        self._paused = False
        self._running = 0
        self.counts: dict[str, float] = collections.defaultdict(float)
        self.started = time.time()

    @property
    def policy_version(self) -> int:
        return self.engine.policy_version

    # -- pause / resume -------------------------------------------------------------
    def pause(self, timeout_s: float | None = None) -> None:
        """Stop starting batches; return once no batch is running. After `timeout_s` with one
        still running, raise TimeoutError with generation resumed (nothing else would resume it)."""
        with self._state:
            self._paused = True
            if not self._state.wait_for(lambda: self._running == 0, timeout_s):
                self._paused = False
                self._state.notify_all()
                raise TimeoutError(f"a generation batch was still running after {timeout_s:g}s")

    def resume(self) -> None:
        with self._state:
            self._paused = False
            self._state.notify_all()

    @property
    def paused(self) -> bool:
        return self._paused

    # -- generation -------------------------------------------------------------------
    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        with self._state:
            self._state.wait_for(lambda: not self._paused)
            self._running += 1
        try:
            results = self.engine.generate(requests)
        finally:
            with self._state:
                self._running -= 1
                self._state.notify_all()
        self._account(requests, results)
        return results

    def _account(self, requests: list[GenerationRequest], results: list[GenerationResult]) -> None:
        with self._state:
            self.counts["requests"] += len(requests)
            self.counts["batches"] += 1
            for request, result in zip(requests, results, strict=True):
                self.counts["prompt_tokens"] += len(request.token_ids)
                self.counts["prefill_tokens"] += result.prefill_tokens
                self.counts["generated_tokens"] += len(result.token_ids)
                if request.episode_id:
                    self._live.pop(request.episode_id, None)
                    self._ended.pop(request.episode_id, None)
                    self._live[request.episode_id] = len(request.token_ids) + len(result.token_ids)
            evicted = self._evict()
        for episode_id in evicted:
            self.engine.release(episode_id)

    def _evict(self) -> list[str]:
        """Take episodes out of the count until it is within bounds: ended ones first, then
        live ones, each the least recently used first (as vLLM evicts only freed blocks)."""
        evicted = []
        total = sum(self._live.values()) + sum(self._ended.values())
        for held in (self._ended, self._live):
            while held and total > self.cache_tokens:
                episode_id, tokens = held.popitem(last=False)
                total -= tokens
                evicted.append(episode_id)
        self.counts["evictions"] += len(evicted)
        return evicted

    def release(self, episode_id: str) -> None:
        """An episode has ended: its KV stays, counted as used now, for later episodes to
        start from until the bound needs its room (`HFEngine.retire`)."""
        with self._state:
            tokens = self._live.pop(episode_id, None)
            if tokens is None:  # ended before: counted as used now
                tokens = self._ended.pop(episode_id, None)
            if tokens is not None:
                self._ended[episode_id] = tokens
        if tokens is None:
            self.engine.release(episode_id)
            return
        self.engine.retire(episode_id)

    # -- weights ------------------------------------------------------------------------
    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        self.update(lambda: state_dict, version)

    def update(
        self, load: Callable[[], dict[str, torch.Tensor] | None], version: int, timeout_s: float | None = None
    ) -> None:
        """Between batches, run `load` (it returns the new tensors, or None when it changed
        the model itself) and load its tensors; later outputs carry `version`. Episodes'
        KV came from the old weights and is dropped (the engine re-prefills it). A batch
        still running after `timeout_s` raises TimeoutError, nothing loaded."""
        self.pause(timeout_s)
        try:
            self.engine.load_weights(load() or {}, version)
            with self._state:
                self._live.clear()
                self._ended.clear()
                self.counts["weight_updates"] += 1
        finally:
            self.resume()

    def next_token_logprobs(self, token_ids: list[int]) -> torch.Tensor:
        return self.engine.next_token_logprobs(token_ids)

    # -- metrics ------------------------------------------------------------------------
    def metrics(self) -> dict[str, float | int | bool]:
        with self._state:
            counts = dict(self.counts)
            cached_tokens = sum(self._live.values()) + sum(self._ended.values())
            ended = len(self._ended)
            cached_episodes = len(self._live)
        prompt = counts.get("prompt_tokens", 0.0)
        hits = prompt - counts.get("prefill_tokens", 0.0)
        return {
            "policy_version": self.policy_version,
            "paused": self._paused,
            "requests": int(counts.get("requests", 0)),
            "batches": int(counts.get("batches", 0)),  # engine batches the requests ran in
            "prompt_tokens": int(prompt),
            "prefill_tokens": int(counts.get("prefill_tokens", 0)),
            "generated_tokens": int(counts.get("generated_tokens", 0)),
            "prefix_cache_hit_tokens": int(hits),
            "prefix_cache_hit_rate": hits / prompt if prompt else 0.0,
            "prefix_cache_tokens": cached_tokens,
            "prefix_cache_episodes": cached_episodes,  # live ones
            "prefix_cache_ended_episodes": ended,  # kept for later episodes to start from
            "prefix_cache_capacity_tokens": self.cache_tokens,
            "prefix_cache_evictions": int(counts.get("evictions", 0)),
            "weight_updates": int(counts.get("weight_updates", 0)),
            "uptime_s": time.time() - self.started,
        }
