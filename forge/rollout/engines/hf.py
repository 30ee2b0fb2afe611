"""`HFEngine`: batched sampling from a transformers causal LM, keeping episodes' KV caches
across their turns (the last batch's cache stays in place; see the class).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache

from forge.rollout.engines.episode_kv import EpisodeKV, borrowed, common_starts, kept_part
from forge.rollout.engines.kv import _RoomyLayer
from forge.rollout.engines.protocol import GenerationRequest, GenerationResult
from forge.rollout.engines.sampling import RowSampling
from forge.rollout.engines.shared_prefix import (
    SHARED_KWARG,
    SharedPromptLayer,
    can_share_prompt,
    use_shared_prompt_attention,
)
from forge.rollout.engines.windows import positional_masks, sliding_windows


@dataclass
class _BatchKV:
    """The last batch's KV, kept as it was decoded so that the same episodes' next turn
    appends to it: row i holds episode `episode_ids[i]`'s `token_ids[i]` at the columns
    where `mask[i]` is 1 (the other columns are pads). A released row's id is ""."""

    episode_ids: list[str]
    token_ids: list[list[int]]
    cache: Any
    mask: torch.Tensor

    def holes(self) -> int:
        return self.mask.shape[1] - max(len(ids) for ids in self.token_ids)


# Tokens per prefill forward when not configured: a CPU forward of 2048 tokens of a small
# model takes about as long as a GPU's of 16384 of a 0.5B one, and chunks any smaller would
# cost a GPU's prefill its throughput (each chunk launches every kernel again).
CPU_PREFILL_CHUNK = 2048
GPU_PREFILL_CHUNK = 16384


def default_prefill_chunk(device: torch.device) -> int:
    return CPU_PREFILL_CHUNK if device.type == "cpu" else GPU_PREFILL_CHUNK


class HFEngine:
    """Batched sampling from a transformers model with a KV cache kept per episode.

    A request that names an `episode_id` leaves its KV behind when it returns; the next
    request of that episode, whose tokens extend the cached ones, prefills only the new
    tokens (the observation). Requests at different turns share one batch: row i is laid
    out as `[pad][cached KV][pad][new tokens]`, with the attention mask hiding the pads
    and explicit position ids, so each row computes what it would alone. A request whose
    tokens part from its episode's cached ones keeps the KV before they part; one with no
    cache of its own starts from the longest prefix another episode's cache holds; new rows
    of one call that start alike run their common start once. Rows that start
    from the same tokens with no cache (a group's samples) are prefilled once, and where the
    model's attention is plain sdpa (`share_prompt`) that prompt's KV stays one copy that
    all the rows read (forge.rollout.engines.shared_prefix); else it is copied into each row.
    A sliding window (or attention chunk) longer than `max_context_tokens`, the most tokens a
    row may hold (refused past it), never binds: its layers attend as full attention, and the
    prompt is shared (Phi-3-mini-128k's 262143, PhiMoE's 131072).

    The batch's KV stays as it is after a call. When the next call brings back the same
    episodes (or some of them), their new tokens are appended to it in place, so a turn
    costs no copying of the history: cache layers have room to grow (`_RoomyLayer`).
    Only when a call brings an episode the batch does not hold is the batch split into
    per-episode caches and a new one laid out.

    New tokens are prefilled in chunks of at most `prefill_chunk_tokens` (rows x columns, pads
    included; 0 or None: one forward) over the growing cache, the heartbeat beating before each:
    a long agent context neither holds the loop past the stuck guard's limit in one forward nor
    needs activations for its whole block at once.
    """

    def __init__(
        self,
        model: Any,
        stop_token_ids: list[int],
        pad_token_id: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        share_prompt: bool = True,
        self_check: bool = True,
        max_context_tokens: int | None = None,
        prefill_chunk_tokens: int | None = None,
    ) -> None:
        self.model = model
        self.stop_token_ids = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long)
        self.pad_token_id = pad_token_id
        self.temperature = temperature
        self.top_p = top_p
        self.policy_version = 0
        self.device = next(model.parameters()).device
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self._num_layers = model.config.get_text_config().num_hidden_layers
        if max_context_tokens is not None and max_context_tokens < 1:
            raise ValueError(
                f"max_context_tokens={max_context_tokens}: give a positive count (rollout.max_context_tokens)"
            )
        self.max_context_tokens = max_context_tokens
        if prefill_chunk_tokens is not None and prefill_chunk_tokens < 0:
            raise ValueError(
                f"prefill_chunk_tokens={prefill_chunk_tokens}: give a positive count, or 0 for one forward "
                "(rollout.prefill_chunk_tokens)"
            )
        if prefill_chunk_tokens is None:
            prefill_chunk_tokens = default_prefill_chunk(self.device)
        self.prefill_chunk_tokens = prefill_chunk_tokens or None
        self._windows = sliding_windows(model.config, longest=max_context_tokens)
        # Mixture-of-experts: no router load-balancing loss (nothing here trains on it).
        self._no_router = (
            {"output_router_logits": False} if hasattr(model.config, "output_router_logits") else {}
        )
        from forge.rollout.engines.engine_check import (
            past_positions_message,
            position_limit,
            rope_switch_limit,
            rope_switch_message,
        )

        self._position_limit = position_limit(model)
        if self._position_limit is not None and (max_context_tokens or 0) > self._position_limit:
            from forge.config import ConfigError

            # Here, not at the first long request, and not as the self-check's failure (whose
            # advice, another engine, would not help): the context is the setting to change.
            raise ConfigError(
                past_positions_message(max_context_tokens, self._position_limit, type(model).__name__)
            )
        switch = rope_switch_limit(model.config)
        if switch is not None and (max_context_tokens or 0) > switch[0]:
            from forge.config import ConfigError

            raise ConfigError(rope_switch_message(max_context_tokens, *switch, type(model).__name__))
        if self_check:
            # A family nobody has tested: sample a few tiny turns against fresh forwards first;
            # drop the shared prompt where it disagrees, refuse where the copy does too.
            from forge.rollout.engines.engine_check import check_engine

            share_prompt = check_engine(
                type(self),
                model,
                pad_token_id,
                share_prompt,
                max_context_tokens,
                self.prefill_chunk_tokens is not None,
            )
        # A group's prompt KV is kept once for all its rows where the attention allows
        # (forge.rollout.engines.shared_prefix); else copied into each row.
        self._attention_before = model.config._attn_implementation
        self.share_prompt = share_prompt and can_share_prompt(model, self._windows)
        if self.share_prompt:
            use_shared_prompt_attention(model)
        self._episodes: dict[str, EpisodeKV] = {}
        # Ended episodes' KV kept for other episodes to borrow from (`retire`), until released.
        self._retired: dict[str, EpisodeKV] = {}
        self._batch: _BatchKV | None = None
        # (episode, whether its KV stays as a donor) for each release not yet applied.
        self._released: collections.deque[tuple[str, bool]] = collections.deque()
        # Weights never change under a running batch: a sync waits for it to finish.
        self._lock = threading.Lock()
        # Called before each prefill chunk and each decode step: a batch that runs on a guarded
        # event loop says it is making progress (forge.rollout.stuck.LoopGuard.beat).
        self.heartbeat: Callable[[], None] | None = None

    def restore_attention(self) -> None:
        """Give the model back the attention it had before this engine (the engine check's
        probes, which share the model with the engine that follows)."""
        self.model.config._attn_implementation = self._attention_before

    @property
    def cached_episodes(self) -> int:
        in_batch = sum(1 for name in self._batch.episode_ids if name) if self._batch is not None else 0
        return len(self._episodes) + in_batch

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        with self._lock:
            missing, unexpected = _load_matching(self.model, state_dict)
            if unexpected:
                raise ValueError(f"weight sync sent {len(unexpected)} unknown tensors, e.g. {unexpected[:3]}")
            self.policy_version = version
            # Cached KV came from the old weights; the next turn re-prefills its history so
            # that new tokens' behaviour logprobs are exactly the new policy's.
            self._episodes.clear()
            self._retired.clear()
            self._batch = None

    @property
    def retired_episodes(self) -> int:
        return len(self._retired)

    def release(self, episode_id: str) -> None:
        """Drop an episode's cached KV (call when the episode ends), or the KV `retire` kept.
        Never waits for a running batch: the release is applied before the next one if it
        cannot be now."""
        self._queue_release(episode_id, keep=False)

    def retire(self, episode_id: str) -> None:
        """End an episode but keep its KV for a later episode to start from (`borrowed`: the
        rest of its group, tasks under the same system prompt), as vLLM's prefix cache keeps a
        finished request's blocks until it needs the room; `release` drops it. For a caller
        that bounds what is kept (`ServedEngine`); new weights drop it too."""
        self._queue_release(episode_id, keep=True)

    def _queue_release(self, episode_id: str, keep: bool) -> None:
        self._released.append((episode_id, keep))
        if self._lock.acquire(blocking=False):
            try:
                self._apply_releases()
            finally:
                self._lock.release()

    def _apply_releases(self) -> None:
        while self._released:
            episode_id, keep = self._released.popleft()
            kv = self._episodes.pop(episode_id, None)
            batch = self._batch
            if batch is not None and episode_id in batch.episode_ids:
                row = batch.episode_ids.index(episode_id)
                if keep:
                    kv = _row_kv(batch, row)
                batch.episode_ids[row] = ""
                if not any(batch.episode_ids):
                    self._batch = None
            if keep and kv is not None:
                self._retired[episode_id] = kv
            elif not keep:
                self._retired.pop(episode_id, None)

    def next_token_logprobs(self, token_ids: list[int]) -> torch.Tensor:
        """The tempered next-token distribution after `token_ids` (log space, fp32)."""
        with self._lock, torch.no_grad():
            logits = self.model(
                input_ids=torch.tensor([token_ids], device=self.device), **self._no_router
            ).logits[0, -1]
            return torch.log_softmax(logits.float() / self.temperature, dim=-1).cpu()

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        if not requests:
            return []
        if any(not request.token_ids for request in requests):
            raise ValueError("a request with no tokens: the engine samples after a prompt's last token")
        if self._position_limit is not None or self.max_context_tokens is not None:
            self._check_lengths(requests)
        with self._lock, torch.no_grad():
            self._apply_releases()
            return self._generate(requests)

    def _check_lengths(self, requests: list[GenerationRequest]) -> None:
        """Refuse a request whose row could grow past the engine's context (its windows are
        judged by it) or a learned position table (an IndexError from inside the model
        otherwise), naming the settings that bound it."""
        context, limit = self.max_context_tokens, self._position_limit
        for request in requests:
            if context is not None and len(request.token_ids) + request.max_new_tokens > context:
                raise ValueError(
                    f"a request of {len(request.token_ids)} tokens plus up to {request.max_new_tokens} new ones "
                    f"is over the engine's context of {context} tokens (rollout.max_context_tokens): "
                    "shorten the request or lower its max_new_tokens"
                )
            if limit is not None and len(request.token_ids) + request.max_new_tokens > limit:
                raise ValueError(
                    f"a request of {len(request.token_ids)} tokens plus up to {request.max_new_tokens} new ones "
                    f"runs past the {limit} positions {type(self.model).__name__} has learned embeddings for; "
                    f"set rollout.max_context_tokens to at most {limit}"
                )

    def _past_for(self, request: GenerationRequest) -> EpisodeKV | None:
        """What of its episode's own cache (taken out) this request starts from, if any: an
        episode called again after `retire` takes its kept KV back."""
        past = None
        if request.episode_id:
            past = self._episodes.pop(request.episode_id, None) or self._retired.pop(request.episode_id, None)
        return kept_part(past, request.token_ids) if past is not None else None

    def _start_kv(self, tokens: list[int]) -> EpisodeKV:
        """The KV of `tokens` alone, run as a batch of one row."""
        cache, _, _ = self._prefill([None], [tokens], room=0)
        return _kv_of(cache, 0, torch.arange(len(tokens), device=self.device), list(tokens))

    def _batch_rows(self, requests: list[GenerationRequest]) -> list[int] | None:
        """Each request's row in the kept batch, or None if any request cannot extend
        one, or if pads have come to fill over half the batch's width."""
        batch = self._batch
        if batch is None or batch.holes() > batch.mask.shape[1] // 2:
            return None
        row_of = {name: row for row, name in enumerate(batch.episode_ids) if name}
        rows = []
        for request in requests:
            row = row_of.pop(request.episode_id, None) if request.episode_id else None
            if row is None:
                return None
            cached = batch.token_ids[row]
            if not (len(cached) < len(request.token_ids) and request.token_ids[: len(cached)] == cached):
                return None
            rows.append(row)
        return rows

    def _set_aside(self, batch: _BatchKV, rows: Any) -> None:
        """Copy these rows of a kept batch out into per-episode caches, without pads."""
        for row in rows:
            if batch.episode_ids[row]:
                self._episodes[batch.episode_ids[row]] = _row_kv(batch, row)

    def _new_block(
        self, news: list[list[int]], starts: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input ids, attention mask and position ids for each row's new tokens, left-padded
        to one width; row i's tokens take positions from `starts[i]` on."""
        rows, width = len(news), max(len(n) for n in news)
        input_ids = torch.full((rows, width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((rows, width), dtype=torch.long)
        positions = torch.zeros((rows, width), dtype=torch.long)
        for row, (new, start) in enumerate(zip(news, starts, strict=True)):
            input_ids[row, width - len(new) :] = torch.tensor(new)
            mask[row, width - len(new) :] = 1
            positions[row, width - len(new) :] = torch.arange(start, start + len(new))
        return input_ids.to(self.device), mask.to(self.device), positions.to(self.device)

    def _extend(
        self, rows: list[int], requests: list[GenerationRequest], room: int
    ) -> tuple[Any, torch.Tensor, torch.Tensor, list[int]]:
        """Prefill each request's new tokens after its row of the kept batch, in place."""
        batch, self._batch = self._batch, None
        self._set_aside(batch, sorted(set(range(len(batch.episode_ids))) - set(rows)))  # they may come back
        cache, mask = batch.cache, batch.mask
        if rows != list(range(len(batch.episode_ids))):
            index = torch.tensor(rows, device=self.device)
            cache.batch_select_indices(index)
            mask = mask[index]
        starts = [len(batch.token_ids[row]) for row in rows]
        news = [request.token_ids[start:] for request, start in zip(requests, starts, strict=True)]
        input_ids, new_mask, positions = self._new_block(news, starts)
        for layer in cache.layers:
            layer.reserve(input_ids.shape[1] + room)
        mask = torch.cat([mask, new_mask], dim=-1)
        cache, logits = self._run_new_tokens(input_ids, mask, positions, cache)
        return cache, mask, logits, [len(new) for new in news]

    def _prefill(
        self, pasts: list[EpisodeKV | None], news: list[list[int]], room: int
    ) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """Run the new tokens of each row after its cached KV. Returns the cache, the
        attention mask over it and the last position's logits."""
        rows = len(news)
        past_lengths = [len(p.token_ids) if p is not None else 0 for p in pasts]
        width_past = max(past_lengths)
        input_ids, new_mask, positions = self._new_block(news, past_lengths)
        mask = torch.zeros((rows, width_past), dtype=torch.long, device=self.device)
        for row, p in enumerate(past_lengths):
            mask[row, width_past - p :] = 1
        mask = torch.cat([mask, new_mask], dim=-1)
        if width_past:
            template = next(p for p in pasts if p is not None).layers
            width = width_past + input_ids.shape[1] + room
            layers = []
            for layer, held in enumerate(template):
                if held is None:  # a layer that reads another layer's KV (Gemma 3n) keeps none
                    layers.append(_RoomyLayer(room=room))
                    continue
                keys, values = held
                k = keys.new_zeros((rows, keys.shape[1], width, keys.shape[3]))
                v = values.new_zeros((rows, values.shape[1], width, values.shape[3]))
                for row, past in enumerate(pasts):
                    if past is not None:
                        k[row, :, width_past - past_lengths[row] : width_past] = past.layers[layer][0][0]
                        v[row, :, width_past - past_lengths[row] : width_past] = past.layers[layer][1][0]
                layers.append(_RoomyLayer.holding(k, v, width_past))
        else:
            # Sized when the first chunk's keys arrive: their length plus the rest of the block
            # and `room`, once (adding the new tokens here too made every buffer twice the
            # prompt, copied again per sample; growing per chunk would copy it per chunk).
            rest = input_ids.shape[1] - self._chunk_columns(*input_ids.shape)
            layers = [_RoomyLayer(room=rest + room) for _ in range(self._num_layers)]
        cache, logits = self._run_new_tokens(input_ids, mask, positions, Cache(layers=layers))
        return cache, mask, logits

    def _chunk_columns(self, rows: int, width: int) -> int:
        """How many of the new block's columns one prefill forward takes."""
        if self.prefill_chunk_tokens is None:
            return width
        return max(1, min(width, self.prefill_chunk_tokens // rows))

    def _run_new_tokens(
        self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any
    ) -> tuple[Any, torch.Tensor]:
        """Run the new block (`input_ids`, the last columns of `mask`) through the model after
        the KV `cache` holds, in chunks of columns, each appended to the cache before the next;
        returns the cache and the last column's logits. Each chunk's queries see the keys before
        them and none after, as in one forward, so the result is that forward's."""
        rows, width = input_ids.shape
        held = mask.shape[1] - width
        step = self._chunk_columns(rows, width)
        for start in range(0, width, step):
            end = min(start + step, width)
            if self.heartbeat is not None:
                self.heartbeat()
            out = self.model(
                input_ids=input_ids[:, start:end],
                attention_mask=self._attention(mask[:, : held + end], end - start),
                position_ids=positions[:, start:end],
                cache=cache,
                use_cache=True,
                logits_to_keep=1,  # only the last position is sampled from: no [tokens, vocab] logits
                **self._no_router,
                **self._shared(cache),
            )
            cache = out.cache
        return cache, out.logits[:, -1, :]

    def _shared(self, cache: Any) -> dict[str, Any]:
        """The keyword that hands a cache holding a shared prompt to the attention calls."""
        if self.share_prompt and any(isinstance(layer, SharedPromptLayer) for layer in cache.layers):
            return {SHARED_KWARG: cache}
        return {}

    def _attention(self, mask: torch.Tensor, new_tokens: int) -> Any:
        """The 2-D `mask` for transformers, or on a sliding-window model the masks that count
        the window in positions, not in the batch's columns (forge.rollout.engines.windows).
        Windows that cannot bind keep the 2-D mask while the batch's columns (pad holes and
        all) are fewer than them: transformers' column-counted window then reaches them all."""
        windows = self._windows
        if windows is None or (not windows.binds and windows.reached_in(mask.shape[1])):
            return mask
        return positional_masks(
            mask, new_tokens, self._windows, self.model.get_input_embeddings().weight.dtype
        )

    def _generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        batch = len(requests)
        steps = max(r.max_new_tokens for r in requests)
        rows = self._batch_rows(requests)
        if rows is not None:
            cache, attention_mask, logits, prefill_counts = self._extend(rows, requests, room=steps)
        else:
            if self._batch is not None:
                self._set_aside(self._batch, range(len(self._batch.episode_ids)))
                self._batch = None
            cache, attention_mask, logits, prefill_counts = self._prefill_afresh(requests, room=steps)

        next_position = torch.tensor([len(r.token_ids) for r in requests], device=self.device)[:, None]
        limits = torch.tensor([r.max_new_tokens for r in requests], device=self.device)
        generated = torch.full((batch, steps), self.pad_token_id, dtype=torch.long, device=self.device)
        generated_logprobs = torch.zeros((batch, steps), device=self.device)
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        lengths_out = torch.zeros(batch, dtype=torch.long, device=self.device)
        stop_ids = self.stop_token_ids.to(self.device)
        # The mask has its decode columns from the start: a step writes one column in place
        # and passes a view (a torch.cat per step copied the whole mask for every token).
        width = attention_mask.shape[1]
        full_mask = attention_mask.new_zeros((batch, width + steps))
        full_mask[:, :width] = attention_mask
        attention_mask = full_mask[:, :width]
        # Behaviour logprobs are those of the full tempered distribution, as the trainer
        # computes them; top-p truncation is recorded as an off-policy effect.
        sampling = RowSampling.of(requests, self.temperature, self.top_p, self.device)
        top_k = sampling.top_k_logprobs
        if top_k:
            top_values = torch.zeros((batch, steps, top_k), device=self.device)
            top_ids = torch.zeros((batch, steps, top_k), dtype=torch.long, device=self.device)
        watchers = [(row, r.on_token) for row, r in enumerate(requests) if r.on_token is not None]
        # Rows whose caller may give them up (the gateway's calls): a set flag ends the row at
        # this step, read on the host, so no step waits on the device for it.
        cancellable = [(row, r.cancel) for row, r in enumerate(requests) if r.cancel is not None]
        shared = self._shared(cache)
        heartbeat = self.heartbeat
        # Per-token work outside the model's forward is kept to a few in-place tensor ops:
        # on a GPU each op is a kernel launch and Python's cost per token adds up.
        for step in range(steps):
            if heartbeat is not None:
                heartbeat()
            tokens, logprobs, distribution = sampling.sample(logits, self.generator)
            active = ~done
            tokens.masked_fill_(done, self.pad_token_id)
            generated[:, step] = tokens
            generated_logprobs[:, step] = logprobs.masked_fill_(done, 0.0)
            if top_k:
                top_values[:, step], top_ids[:, step] = distribution.topk(top_k, dim=-1)
            lengths_out += active
            stopped = torch.isin(tokens, stop_ids).logical_and_(active)
            if watchers:
                stopped |= self._watch(
                    watchers,
                    step,
                    active,
                    tokens,
                    logprobs,
                    (top_ids[:, step], top_values[:, step]) if top_k else None,
                    requests,
                )
            finished |= stopped
            done |= stopped.logical_or_(lengths_out >= limits)
            if cancellable and any(flag.is_set() for _, flag in cancellable):
                given_up = [row for row, flag in cancellable if flag.is_set()]
                done[torch.tensor(given_up, device=self.device)] = True
                cancellable = [(row, flag) for row, flag in cancellable if row not in given_up]
            if step == steps - 1 or bool(done.all()):
                break
            full_mask[:, width + step] = active
            attention_mask = full_mask[:, : width + step + 1]
            out = self.model(
                input_ids=tokens[:, None],
                attention_mask=self._attention(attention_mask, 1),
                position_ids=next_position,
                cache=cache,
                use_cache=True,
                **self._no_router,
                **shared,
            )
            if shared and step == 0:
                _check_shared_reads(cache)
            cache = out.cache
            logits = out.logits[:, -1, :]
            next_position = next_position + 1

        results, kept = [], []
        fed = (
            attention_mask.sum(-1) - torch.tensor([len(r.token_ids) for r in requests], device=self.device)
        ).tolist()
        for row, request in enumerate(requests):
            n = int(lengths_out[row])
            tokens_out = generated[row, :n].tolist()
            # The cache holds the request's tokens plus the generated ones fed back: all
            # but the last one sampled, unless decoding went on for other rows.
            kept.append(list(request.token_ids) + tokens_out[: fed[row]])
            k = request.top_logprobs
            tops = None
            if k:
                tops = [
                    list(zip(ids, values, strict=True))
                    for ids, values in zip(
                        top_ids[row, :n, :k].tolist(), top_values[row, :n, :k].tolist(), strict=True
                    )
                ]
            results.append(
                GenerationResult(
                    token_ids=tokens_out,
                    logprobs=generated_logprobs[row, :n].tolist(),
                    finished=bool(finished[row]),
                    policy_version=self.policy_version,
                    prefill_tokens=prefill_counts[row],
                    top_logprobs=tops,
                )
            )
        self._batch = _BatchKV([r.episode_id for r in requests], kept, cache, attention_mask)
        if not any(self._batch.episode_ids):
            self._batch = None
        return results

    def _watch(
        self,
        watchers: list,
        step: int,
        active: torch.Tensor,
        tokens: torch.Tensor,
        logprobs: torch.Tensor,
        tops: tuple[torch.Tensor, torch.Tensor] | None,
        requests: list[GenerationRequest],
    ) -> torch.Tensor:
        """Hand each watched active row its new token; the rows whose callback says stop."""
        live, token_list, logprob_list = active.tolist(), tokens.tolist(), logprobs.tolist()
        top_lists = (tops[0].tolist(), tops[1].tolist()) if tops is not None else None
        stop = [False] * len(live)
        for row, on_token in watchers:
            if live[row]:
                k = requests[row].top_logprobs
                top = (
                    list(zip(top_lists[0][row][:k], top_lists[1][row][:k], strict=True))
                    if top_lists and k
                    else []
                )
                stop[row] = bool(on_token(token_list[row], logprob_list[row], top))
        return torch.tensor(stop, device=self.device)

    def _prefill_afresh(
        self, requests: list[GenerationRequest], room: int
    ) -> tuple[Any, torch.Tensor, torch.Tensor, list[int]]:
        """Lay out a new batch from per-episode caches (or none) and prefill what they lack."""
        batch = len(requests)
        owns = [self._past_for(r) for r in requests]
        # Rows with no cache and the same tokens (a group's first turn) are prefilled once,
        # from what another episode's cache holds of them where it holds enough.
        unique: dict[tuple, int] = {}
        expand: list[int] = []
        for row, (request, own) in enumerate(zip(requests, owns, strict=True)):
            key = ("row", row) if own is not None else ("prompt", tuple(request.token_ids))
            expand.append(unique.setdefault(key, len(unique)))
        firsts = [expand.index(u) for u in range(len(unique))]
        pasts = list(owns)
        donors = [own for own in owns if own is not None] + [
            *self._episodes.values(),
            *self._retired.values(),
        ]
        for row in firsts:
            if owns[row] is None and donors:
                pasts[row] = borrowed(requests[row].token_ids, donors)
        # Rows still with none that start alike (tasks under one system prompt) run their
        # common start once, apart, and each starts from it.
        apart = [0] * batch
        for run, length in common_starts([row for row in firsts if pasts[row] is None], requests):
            start = self._start_kv(requests[run[0]].token_ids[:length])
            for row in run:
                pasts[row] = start
            apart[run[0]] = length
        news = [
            r.token_ids[len(p.token_ids) :] if p is not None else list(r.token_ids)
            for r, p in zip(requests, pasts, strict=True)
        ]
        shared = self.share_prompt and len(unique) == 1 and batch > 1 and owns[0] is None
        # A shared prompt's KV is sized to it exactly: the rows' own tokens go elsewhere.
        cache, attention_mask, logits = self._prefill(
            [pasts[r] for r in firsts], [news[r] for r in firsts], 0 if shared else room
        )
        prefill_counts = [len(news[row]) + apart[row] if row in firsts else 0 for row in range(batch)]
        if shared:
            cache = Cache(
                layers=[
                    SharedPromptLayer(layer.keys, layer.values, room) if layer.is_initialized else layer
                    for layer in cache.layers
                ]
            )
            index = torch.tensor(expand, device=self.device)
            attention_mask, logits = attention_mask[index], logits[index]
        elif len(unique) < batch:
            index = torch.tensor(expand, device=self.device)
            cache.batch_select_indices(index)
            attention_mask, logits = attention_mask[index], logits[index]
        return cache, attention_mask, logits, prefill_counts


def _row_kv(batch: _BatchKV, row: int) -> EpisodeKV:
    """A kept batch's row as an episode's own cache, without its pads."""
    return _kv_of(batch.cache, row, batch.mask[row].nonzero().squeeze(-1), batch.token_ids[row])


def _kv_of(cache: Any, row: int, columns: torch.Tensor, tokens: list[int]) -> EpisodeKV:
    """Row `row` of a batch cache at these columns, the KV of `tokens` (copied out)."""
    return EpisodeKV(tokens, [layer.row(row, columns) for layer in cache.layers])


def _check_shared_reads(cache: Any) -> None:
    """Every shared-prompt layer was read by Forge's attention in the last forward: model code
    that drops the keyword would attend to the rows' own keys alone, silently."""
    layers = [layer for layer in cache.layers if isinstance(layer, SharedPromptLayer)]
    if any(layer.reads == 0 for layer in layers):
        raise RuntimeError(
            "the model's attention did not receive the engine's shared prompt (its code drops keyword "
            "arguments on the way to attention); construct HFEngine with share_prompt=False"
        )


def _load_matching(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor]
) -> tuple[list[str], list[str]]:
    """Copy `state_dict` into `model` in place; a partial dict (LoRA adapters) is fine."""
    own = model.state_dict()
    unexpected = [name for name in state_dict if name not in own]
    with torch.no_grad():
        for name, tensor in state_dict.items():
            if name in own:
                own[name].copy_(tensor.to(own[name].device, own[name].dtype))
    missing = [name for name in own if name not in state_dict]
    return missing, unexpected
