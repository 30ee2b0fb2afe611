"""Inference engines: token ids in, sampled token ids and their logprobs out.

`HFEngine` runs a transformers causal LM with a KV cache per call. `BatchingEngine`
lets many concurrent episodes (asyncio tasks) share one engine: requests that arrive
together run as one batch, while episodes waiting on their env do not hold others up.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

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


class HFEngine:
    """Batched sampling from a transformers model (left-padded, KV-cached decode)."""

    def __init__(
        self,
        model: Any,
        stop_token_ids: list[int],
        pad_token_id: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.model = model
        self.stop_token_ids = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long)
        self.pad_token_id = pad_token_id
        self.temperature = temperature
        self.top_p = top_p
        self.policy_version = 0
        self.device = next(model.parameters()).device
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        # Weights never change under a running batch: a sync waits for it to finish.
        self._lock = threading.Lock()

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        with self._lock:
            missing, unexpected = _load_matching(self.model, state_dict)
            if unexpected:
                raise ValueError(f"weight sync sent {len(unexpected)} unknown tensors, e.g. {unexpected[:3]}")
            self.policy_version = version

    def release(self, episode_id: str) -> None:
        """Nothing is kept between calls by this engine."""

    def _sample(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logprobs = torch.log_softmax(logits.float() / self.temperature, dim=-1)
        probs = logprobs.exp()
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs > self.top_p
            sorted_probs = sorted_probs.masked_fill(outside, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        tokens = torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)
        # Behaviour logprobs are those of the full tempered distribution, as the trainer
        # computes them; top-p truncation is recorded as an off-policy effect.
        return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        if not requests:
            return []
        with self._lock, torch.no_grad():
            return self._generate(requests)

    def _generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        batch = len(requests)
        lengths = [len(r.token_ids) for r in requests]
        width = max(lengths)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)
        for row, request in enumerate(requests):
            input_ids[row, width - lengths[row] :] = torch.tensor(request.token_ids)
            attention_mask[row, width - lengths[row] :] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        limits = torch.tensor([r.max_new_tokens for r in requests], device=self.device)
        steps = int(limits.max())

        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True
        )
        cache = out.cache
        logits = out.logits[:, -1, :]
        next_position = position_ids[:, -1:] + 1
        generated = torch.full((batch, steps), self.pad_token_id, dtype=torch.long, device=self.device)
        generated_logprobs = torch.zeros((batch, steps), device=self.device)
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        lengths_out = torch.zeros(batch, dtype=torch.long, device=self.device)
        stop_ids = self.stop_token_ids.to(self.device)
        for step in range(steps):
            tokens, logprobs = self._sample(logits)
            tokens = torch.where(done, torch.full_like(tokens, self.pad_token_id), tokens)
            active = ~done
            generated[:, step] = tokens
            generated_logprobs[:, step] = torch.where(active, logprobs, torch.zeros_like(logprobs))
            lengths_out += active.long()
            stopped = active & torch.isin(tokens, stop_ids)
            finished |= stopped
            done |= stopped | (lengths_out >= limits)
            if bool(done.all()) or step == steps - 1:
                break
            attention_mask = torch.cat([attention_mask, active.long()[:, None]], dim=-1)
            out = self.model(
                input_ids=tokens[:, None],
                attention_mask=attention_mask,
                position_ids=next_position,
                cache=cache,
                use_cache=True,
            )
            cache = out.cache
            logits = out.logits[:, -1, :]
            next_position = next_position + 1

        results = []
        for row in range(batch):
            n = int(lengths_out[row])
            results.append(
                GenerationResult(
                    token_ids=generated[row, :n].tolist(),
                    logprobs=generated_logprobs[row, :n].tolist(),
                    finished=bool(finished[row]),
                    policy_version=self.policy_version,
                    prefill_tokens=lengths[row],
                )
            )
        return results


def _load_matching(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Copy `state_dict` into `model` in place; a partial dict (LoRA adapters) is fine."""
    own = model.state_dict()
    unexpected = [name for name in state_dict if name not in own]
    with torch.no_grad():
        for name, tensor in state_dict.items():
            if name in own:
                own[name].copy_(tensor.to(own[name].device, own[name].dtype))
    missing = [name for name in own if name not in state_dict]
    return missing, unexpected


class BatchingEngine:
    """Async front for an engine: concurrent `generate` calls are gathered into batches.

    A batch is launched when every registered episode is waiting, or `max_wait_s` after
    the first request arrived, so an episode stuck in a slow env step never stalls the
    others. Generation runs in a thread, leaving the event loop free for env steps.
    """

    def __init__(self, engine: InferenceEngine, max_batch_size: int = 256, max_wait_s: float = 0.005) -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.active_episodes = 0
        self._pending: list[tuple[GenerationRequest, asyncio.Future]] = []
        self._arrived: asyncio.Event | None = None
        self._runner: asyncio.Task | None = None
        self.generation_seconds = 0.0
        self.prefill_tokens = 0

    def register(self) -> None:
        self.active_episodes += 1

    def unregister(self) -> None:
        self.active_episodes -= 1
        if self._arrived is not None:
            self._arrived.set()

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        if self._runner is None or self._runner.done():
            self._arrived = asyncio.Event()
            self._runner = asyncio.create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        self._pending.append((request, future))
        self._arrived.set()
        return await future

    async def close(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            try:
                await self._runner
            except asyncio.CancelledError:
                pass
            self._runner = None

    async def _run(self) -> None:
        assert self._arrived is not None
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            if not self._pending:
                continue
            deadline = time.monotonic() + self.max_wait_s
            while len(self._pending) < min(self.active_episodes, self.max_batch_size):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except asyncio.TimeoutError:
                    break
                self._arrived.clear()
            batch = self._pending[: self.max_batch_size]
            self._pending = self._pending[self.max_batch_size :]
            if self._pending:
                self._arrived.set()
            live = [(request, future) for request, future in batch if not future.cancelled()]
            if not live:
                continue
            started = time.perf_counter()
            try:
                results = await asyncio.to_thread(self.engine.generate, [request for request, _ in live])
            except Exception as exc:  # surfaced to each waiting episode, which records it
                for _, future in live:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.generation_seconds += time.perf_counter() - started
            for (_, future), result in zip(live, results, strict=True):
                self.prefill_tokens += result.prefill_tokens
                if not future.done():
                    future.set_result(result)
