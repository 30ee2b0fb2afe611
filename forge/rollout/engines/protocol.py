"""The engine protocol: token ids in, sampled token ids and their logprobs out.

Every engine (in-process or a server's client) answers `InferenceEngine`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class GenerationRequest:
    token_ids: list[int]
    max_new_tokens: int
    episode_id: str = ""  # lets an engine keep an episode's state between its turns
    # Per-request sampling; None takes the engine's own. Temperature 0 is greedy decoding.
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None  # the row draws from its own generator, seeded with this
    top_logprobs: int = 0  # also return the k most likely tokens at each step
    # Stop strings, for engines behind HTTP (which cannot call `on_token`): the server
    # decodes and ends the row at the token whose text completes one. In-process engines
    # leave them to the caller's `on_token`, which sees every token.
    stop: list[str] = field(default_factory=list)
    group_id: str = ""  # requests of one group share a prompt: a router sends them to one engine
    # Called on the engine's thread with (token id, logprob, top (id, logprob) pairs) after
    # each sampled token; returning True ends the row there as a stop (stop strings, streaming).
    on_token: Callable[[int, float, list[tuple[int, float]]], bool] | None = None
    # Set (from any thread) when no one will read the result: an in-process engine ends the
    # row at its next decode step, cut (finished False), reading only this host-side flag.
    cancel: threading.Event | None = None


@dataclass
class GenerationResult:
    token_ids: list[int]
    logprobs: list[float]
    finished: bool  # ended on a stop token; False means max_new_tokens cut it off
    policy_version: int
    prefill_tokens: int  # context tokens this call ran through prefill
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token, when asked for


class InferenceEngine(Protocol):
    policy_version: int

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]: ...

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None: ...

    def release(self, episode_id: str) -> None: ...
