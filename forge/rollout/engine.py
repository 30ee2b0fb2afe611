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


@dataclass
class _EpisodeKV:
    """An episode's KV cache: per layer (keys, values) of shape [1, heads, len, dim] for
    exactly the tokens in `token_ids`, no padding."""

    token_ids: list[int]
    layers: list[tuple[torch.Tensor, torch.Tensor]]


class HFEngine:
    """Batched sampling from a transformers model with a KV cache kept per episode.

    A request that names an `episode_id` leaves its KV behind when it returns; the next
    request of that episode, whose tokens extend the cached ones, prefills only the new
    tokens (the observation). Requests at different turns share one batch: row i is laid
    out as `[pad][cached KV][pad][new tokens]`, with the attention mask hiding the pads
    and explicit position ids, so each row computes what it would alone. Rows that start
    from the same tokens with no cache (a group's samples) are prefilled once.
    """

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
        self._episodes: dict[str, _EpisodeKV] = {}
        # Weights never change under a running batch: a sync waits for it to finish.
        self._lock = threading.Lock()

    @property
    def cached_episodes(self) -> int:
        return len(self._episodes)

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        with self._lock:
            missing, unexpected = _load_matching(self.model, state_dict)
            if unexpected:
                raise ValueError(f"weight sync sent {len(unexpected)} unknown tensors, e.g. {unexpected[:3]}")
            self.policy_version = version
            # Cached KV came from the old weights; the next turn re-prefills its history so
            # that new tokens' behaviour logprobs are exactly the new policy's.
            self._episodes.clear()

    def release(self, episode_id: str) -> None:
        """Drop an episode's cached KV (call when the episode ends)."""
        self._episodes.pop(episode_id, None)

    def next_token_logprobs(self, token_ids: list[int]) -> torch.Tensor:
        """The tempered next-token distribution after `token_ids` (log space, fp32)."""
        with self._lock, torch.no_grad():
            logits = self.model(input_ids=torch.tensor([token_ids], device=self.device)).logits[0, -1]
            return torch.log_softmax(logits.float() / self.temperature, dim=-1).cpu()

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

    def _past_for(self, request: GenerationRequest) -> _EpisodeKV | None:
        past = self._episodes.pop(request.episode_id, None) if request.episode_id else None
        if past is None:
            return None
        n = len(past.token_ids)
        if n < len(request.token_ids) and request.token_ids[:n] == past.token_ids:
            return past
        return None  # the episode's tokens diverged from what was cached: prefill afresh

    def _prefill(self, pasts: list[_EpisodeKV | None], news: list[list[int]]) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """Run the new tokens of each row after its cached KV. Returns the cache, the
        attention mask over it and the last position's logits."""
        rows = len(news)
        past_lengths = [len(p.token_ids) if p is not None else 0 for p in pasts]
        new_lengths = [len(n) for n in news]
        width_past, width_new = max(past_lengths), max(new_lengths)
        input_ids = torch.full((rows, width_new), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((rows, width_past + width_new), dtype=torch.long)
        positions = torch.zeros((rows, width_new), dtype=torch.long)
        for row, (p, n) in enumerate(zip(past_lengths, new_lengths, strict=True)):
            input_ids[row, width_new - n :] = torch.tensor(news[row])
            mask[row, width_past - p : width_past] = 1
            mask[row, width_past + width_new - n :] = 1
            positions[row, width_new - n :] = torch.arange(p, p + n)
        cache = None
        if width_past:
            from transformers import DynamicCache

            template = next(p for p in pasts if p is not None).layers
            layers = []
            for layer, (keys, values) in enumerate(template):
                k = keys.new_zeros((rows, keys.shape[1], width_past, keys.shape[3]))
                v = values.new_zeros((rows, values.shape[1], width_past, values.shape[3]))
                for row, past in enumerate(pasts):
                    if past is not None:
                        k[row, :, width_past - past_lengths[row] :] = past.layers[layer][0][0]
                        v[row, :, width_past - past_lengths[row] :] = past.layers[layer][1][0]
                layers.append((k, v))
            cache = DynamicCache(ddp_cache_data=layers)
        mask = mask.to(self.device)
        out = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=mask,
            position_ids=positions.to(self.device),
            cache=cache,
            use_cache=True,
        )
        return out.cache, mask, out.logits[:, -1, :]

    def _generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        batch = len(requests)
        pasts = [self._past_for(r) for r in requests]
        news = [
            r.token_ids[len(p.token_ids) :] if p is not None else list(r.token_ids)
            for r, p in zip(requests, pasts, strict=True)
        ]
        # Rows with no cache and the same tokens (a group's first turn) are prefilled once.
        unique: dict[tuple, int] = {}
        expand: list[int] = []
        for row, (past, new) in enumerate(zip(pasts, news, strict=True)):
            key = ("row", row) if past is not None else ("prompt", tuple(new))
            expand.append(unique.setdefault(key, len(unique)))
        firsts = [expand.index(u) for u in range(len(unique))]
        cache, attention_mask, logits = self._prefill([pasts[r] for r in firsts], [news[r] for r in firsts])
        prefill_counts = [len(news[row]) if row in firsts else 0 for row in range(batch)]
        if len(unique) < batch:
            index = torch.tensor(expand, device=self.device)
            cache.batch_select_indices(index)
            attention_mask, logits = attention_mask[index], logits[index]

        next_position = torch.tensor([len(r.token_ids) for r in requests], device=self.device)[:, None]
        limits = torch.tensor([r.max_new_tokens for r in requests], device=self.device)
        steps = int(limits.max())
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
        for row, request in enumerate(requests):
            n = int(lengths_out[row])
            tokens_out = generated[row, :n].tolist()
            if request.episode_id:
                self._keep(request, row, tokens_out, cache, attention_mask)
            results.append(
                GenerationResult(
                    token_ids=tokens_out,
                    logprobs=generated_logprobs[row, :n].tolist(),
                    finished=bool(finished[row]),
                    policy_version=self.policy_version,
                    prefill_tokens=prefill_counts[row],
                )
            )
        return results

    def _keep(self, request: GenerationRequest, row: int, generated: list[int], cache: Any, mask: torch.Tensor) -> None:
        """Store the row's KV without padding: the request's tokens plus the generated
        tokens that were fed back (all but the last one sampled, unless decoding went on)."""
        columns = mask[row].nonzero().squeeze(-1)
        fed = columns.numel() - len(request.token_ids)
        layers = [(layer.keys[row : row + 1, :, columns], layer.values[row : row + 1, :, columns])
                  for layer in cache.layers]
        self._episodes[request.episode_id] = _EpisodeKV(list(request.token_ids) + generated[:fed], layers)


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

    def release(self, episode_id: str) -> None:
        release = getattr(self.engine, "release", None)  # scripted test engines keep no state
        if release is not None:
            release(episode_id)

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
            # Rows in a fixed order, not arrival order (which depends on thread timing), so
            # the sampler hands the same tokens to the same episodes in every rerun.
            live.sort(key=lambda item: item[0].episode_id)
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
