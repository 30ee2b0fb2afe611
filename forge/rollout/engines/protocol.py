"""The engine protocol: token ids in, sampled token ids and their logprobs out.

Every engine (in-process or a server's client) answers `InferenceEngine`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class GenerationRequest:
    token_ids: list[int]
    max_new_tokens: int
    episode_id: str = ""  # lets an engine keep an episode's state between its turns


@dataclass
class GenerationResult:
    token_ids: list[int]
    logprobs: list[float]
    finished: bool  # ended on a stop token; False means max_new_tokens cut it off
    policy_version: int
    prefill_tokens: int  # context tokens this call ran through prefill


class InferenceEngine(Protocol):
    policy_version: int

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]: ...

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None: ...

    def release(self, episode_id: str) -> None: ...
