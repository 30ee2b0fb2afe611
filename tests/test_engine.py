"""HFEngine: per-episode KV caches, mixed-turn batches, shared prompts, exact logprobs."""

from __future__ import annotations

import pytest
import torch

from forge.config import ModelConfig
from forge.rollout.engines.episode_kv import BORROW_MIN_TOKENS, SHARED_START_MIN_TOKENS
from forge.rollout.engines.hf import HFEngine
from forge.rollout.engines.protocol import GenerationRequest


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_checkpoint):
    from forge.models.loading import load_model, load_tokenizer

    return load_model(tiny_checkpoint, ModelConfig()), load_tokenizer(tiny_checkpoint)


def make_engine(model_and_tokenizer, seed: int = 0) -> HFEngine:
    model, tokenizer = model_and_tokenizer
    return HFEngine(model, [tokenizer.eos_token_id], tokenizer.pad_token_id, seed=seed)


def reference_logprobs(model, context: list[int], generated: list[int]) -> list[float]:
    """Logprobs of `generated` after `context` from one fresh forward, no cache."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([context + generated])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [logprobs[len(context) - 1 + i, t].item() for i, t in enumerate(generated)]


def play(engine: HFEngine, prompts: dict[str, list[int]], turns: int, observation: list[int]):
    """Episodes whose turns interleave: odd turns leave the last episode out, so batches
    mix episodes at different turns. Yields (episode, context, result) per call."""
    contexts = {name: list(ids) for name, ids in prompts.items()}
    for turn in range(turns):
        names = list(contexts)[: len(contexts) - (turn % 2)]
        requests = [GenerationRequest(contexts[n], 4, episode_id=n) for n in names]
        for name, request, result in zip(names, requests, engine.generate(requests), strict=True):
            yield name, request.token_ids, result
            closing = [] if result.finished else [engine.stop_token_ids[0].item()]
            contexts[name] = request.token_ids + result.token_ids + closing + observation


def test_cached_turns_give_the_logprobs_of_a_fresh_full_forward(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = make_engine(model_and_tokenizer)
    prompt = tokenizer("1 2 3", add_special_tokens=False)["input_ids"]
    prompts = {f"e{i}": prompt + [i + 4] for i in range(3)}
    calls = list(play(engine, prompts, turns=4, observation=prompt))
    assert len(calls) >= 10
    for _, context, result in calls:
        expected = reference_logprobs(model, context, result.token_ids)
        assert result.logprobs == pytest.approx(expected, abs=1e-4)


def test_a_later_turn_prefills_only_the_tokens_after_the_cache(model_and_tokenizer):
    engine = make_engine(model_and_tokenizer)
    prompt = [5, 6, 7, 8, 9]
    first = engine.generate([GenerationRequest(prompt, 3, episode_id="a")])[0]
    observation = [10, 11]
    context = (
        prompt + first.token_ids + ([] if first.finished else [engine.stop_token_ids[0].item()]) + observation
    )
    second = engine.generate([GenerationRequest(context, 3, episode_id="a")])[0]
    assert first.prefill_tokens == len(prompt)
    # The last sampled token was never fed through the model, so it is prefilled now.
    assert second.prefill_tokens == len(context) - len(prompt) - len(first.token_ids) + 1


def test_a_turn_that_diverges_from_the_cache_reuses_the_tokens_before_it(model_and_tokenizer):
    """A reply the client re-rendered (or cut at a stop string) differs from the sampled
    tokens: the turn still starts from the cache up to there, with a fresh forward's logprobs.
    Of two episodes in one batch, one extends its cache and one diverges from it; then a
    retry of an episode's first prompt reuses all of it but the token it samples after."""
    model, _ = model_and_tokenizer
    engine = make_engine(model_and_tokenizer)
    prompts = {"a": [5, 6, 7, 8, 9], "b": [5, 6, 7, 8, 12, 13]}
    firsts = engine.generate([GenerationRequest(p, 3, episode_id=n) for n, p in prompts.items()])
    other = next(t for t in range(20, 40) if t != firsts[1].token_ids[0])
    extends = prompts["a"] + firsts[0].token_ids + [10, 11]
    diverges = prompts["b"] + [other, 10, 11]  # not the reply b sampled
    seconds = engine.generate(
        [GenerationRequest(extends, 3, episode_id="a"), GenerationRequest(diverges, 3, episode_id="b")]
    )
    assert seconds[0].prefill_tokens == len(extends) - len(prompts["a"]) - len(firsts[0].token_ids) + 1
    assert seconds[1].prefill_tokens == len(diverges) - len(prompts["b"])
    retry = engine.generate([GenerationRequest(prompts["a"], 3, episode_id="a")])[0]
    assert retry.prefill_tokens == 1
    for context, result in [(extends, seconds[0]), (diverges, seconds[1]), (prompts["a"], retry)]:
        assert result.logprobs == pytest.approx(
            reference_logprobs(model, context, result.token_ids), abs=1e-4
        )


def test_a_turn_that_shares_nothing_with_the_cache_is_prefilled_afresh(model_and_tokenizer):
    engine = make_engine(model_and_tokenizer)
    engine.generate([GenerationRequest([5, 6, 7], 2, episode_id="a")])
    again = engine.generate([GenerationRequest([9, 6, 7, 8], 2, episode_id="a")])[0]
    assert again.prefill_tokens == 4


def test_a_new_episode_starts_from_the_longest_prefix_another_episode_holds(model_and_tokenizer):
    """Within one call too (another row's own cache), and for a group of new rows at once;
    a common start shorter than BORROW_MIN_TOKENS is prefilled."""
    model, _ = model_and_tokenizer
    engine = make_engine(model_and_tokenizer)
    system = list(range(5, 5 + BORROW_MIN_TOKENS + 8))
    first = engine.generate([GenerationRequest(system + [40, 41], 3, episode_id="a")])[0]
    again = system + [40, 41] + first.token_ids + [42]
    calls = [
        # "a" extends its cache; "b" takes the first 20 tokens "a" holds
        [
            GenerationRequest(again, 3, episode_id="a"),
            GenerationRequest(system[:20] + [43], 3, episode_id="b"),
        ],
        [GenerationRequest(system + [44], 3, episode_id=f"g{i}") for i in range(3)],  # once, from a's cache
        [GenerationRequest(system[: BORROW_MIN_TOKENS - 1] + [45], 3, episode_id="c")],  # too short a start
    ]
    prefilled = []
    for requests in calls:
        results = engine.generate(requests)
        prefilled.append([r.prefill_tokens for r in results])
        for request, result in zip(requests, results, strict=True):
            expected = reference_logprobs(model, request.token_ids, result.token_ids)
            assert result.logprobs == pytest.approx(expected, abs=1e-4)
    assert prefilled == [
        [len(again) - len(system) - 2 - len(first.token_ids) + 1, 1],
        [1, 0, 0],
        [BORROW_MIN_TOKENS],
    ]


def test_new_rows_of_one_call_that_start_alike_run_their_common_start_once(model_and_tokenizer):
    """Two system prompts, two tasks under each (one more under the first, sharing a token more
    with one of them) and a task under neither, in one call with no episode cached: each system
    prompt runs once, apart; every row samples as a fresh forward."""
    model, _ = model_and_tokenizer
    engine = make_engine(model_and_tokenizer)
    systems = [[5 + (i * k) % 40 for i in range(SHARED_START_MIN_TOKENS)] for k in (3, 7)]
    requests = [GenerationRequest(systems[i % 2] + [50 + i, 51], 3, episode_id=f"t{i}") for i in range(4)]
    requests.append(GenerationRequest(systems[0] + [50, 60, 61], 3, episode_id="y"))  # t0's start, and more
    requests.append(
        GenerationRequest(systems[0][: SHARED_START_MIN_TOKENS - 1] + [52, 53], 3, episode_id="x")
    )
    results = engine.generate(requests)
    own = 4 * 2 + 3 + len(requests[-1].token_ids)
    assert sum(r.prefill_tokens for r in results) == 2 * SHARED_START_MIN_TOKENS + own
    for request, result in zip(requests, results, strict=True):
        expected = reference_logprobs(model, request.token_ids, result.token_ids)
        assert result.logprobs == pytest.approx(expected, abs=1e-4)


def test_a_group_prompt_is_prefilled_once(model_and_tokenizer):
    engine = make_engine(model_and_tokenizer)
    prompt = [5, 6, 7, 8, 9]
    results = engine.generate([GenerationRequest(prompt, 3, episode_id=f"g{i}") for i in range(4)])
    assert sum(r.prefill_tokens for r in results) == len(prompt)


def test_release_drops_the_cache_and_the_next_call_prefills_everything(model_and_tokenizer):
    engine = make_engine(model_and_tokenizer)
    prompt = [5, 6, 7, 8, 9]
    first = engine.generate([GenerationRequest(prompt, 2, episode_id="a")])[0]
    engine.release("a")
    assert engine.cached_episodes == 0
    context = prompt + first.token_ids + [10]
    again = engine.generate([GenerationRequest(context, 2, episode_id="a")])[0]
    assert again.prefill_tokens == len(context)


def test_a_retired_episode_kv_is_borrowed_exactly_until_it_is_released(model_and_tokenizer):
    """`retire` keeps an ended episode's KV (from the kept batch, or set aside) for new
    episodes to start from; `release` and new weights drop it; its own id takes it back."""
    model, _ = model_and_tokenizer
    engine = make_engine(model_and_tokenizer)
    system = list(range(5, 5 + BORROW_MIN_TOKENS + 8))
    firsts = engine.generate([GenerationRequest(system + [40 + i], 3, episode_id=f"a{i}") for i in range(2)])
    engine.retire("a0")  # a row of the kept batch: copied out
    engine.generate([GenerationRequest([7, 8, 9], 2, episode_id="other")])  # sets a1 aside
    engine.retire("a1")  # a set-aside cache
    assert engine.retired_episodes == 2 and engine.cached_episodes == 1
    calls = [
        [GenerationRequest(system + [40] + firsts[0].token_ids + [50], 3, episode_id="b")],  # all a0 held
        [GenerationRequest(system + [41, 51], 3, episode_id="c")],
    ]
    prefilled = []
    for requests in calls:
        results = engine.generate(requests)
        prefilled.append([r.prefill_tokens for r in results])
        for request, result in zip(requests, results, strict=True):
            assert result.logprobs == pytest.approx(
                reference_logprobs(model, request.token_ids, result.token_ids), abs=1e-4
            )
    # b: a0 held its prompt and all but its last sampled token (that token and 50 are run);
    # c: a1 held its prompt (51 is run).
    assert prefilled == [[2], [1]]
    for name in ("a0", "a1", "b", "c", "other"):
        engine.release(name)
    assert engine.retired_episodes == 0 and engine.cached_episodes == 0
    fresh = engine.generate([GenerationRequest(system + [41, 52], 3, episode_id="d")])[0]
    assert fresh.prefill_tokens == len(system) + 2  # nothing left to start from
    engine.retire("d")
    engine.load_weights({}, version=1)
    assert engine.retired_episodes == 0 and engine.cached_episodes == 0


def test_a_weight_sync_invalidates_cached_kv(model_and_tokenizer):
    model, _ = model_and_tokenizer
    engine = make_engine(model_and_tokenizer)
    engine.generate([GenerationRequest([5, 6, 7], 2, episode_id="a")])
    engine.load_weights({}, version=1)
    assert engine.cached_episodes == 0


def test_generation_past_max_new_tokens_is_cut_and_marked_unfinished(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    # The stop token is one the model never samples, so every row runs to its limit.
    engine = HFEngine(model, [tokenizer.vocab_size + 10**6], tokenizer.pad_token_id, seed=0)
    results = engine.generate([GenerationRequest([5, 6, 7], 3), GenerationRequest([5, 6], 5)])
    assert [len(r.token_ids) for r in results] == [3, 5]
    assert not any(r.finished for r in results)


def test_episodes_that_come_back_together_extend_the_kept_batch_without_setting_it_aside(model_and_tokenizer):
    engine = make_engine(model_and_tokenizer)
    contexts = {"a": [5, 6, 7], "b": [5, 6, 7], "c": [8, 9]}
    for turn in range(3):
        requests = [GenerationRequest(ids, 3, episode_id=name) for name, ids in contexts.items()]
        results = engine.generate(requests)
        for request, result in zip(requests, results, strict=True):
            contexts[request.episode_id] = request.token_ids + result.token_ids + [10, 11]
        if turn == 0:  # the shared prompt is prefilled once
            assert [r.prefill_tokens for r in results] == [3, 0, 2]
        else:  # the 2-token observation, and the last sampled token unless it was fed already
            assert all(r.prefill_tokens in (2, 3) for r in results)
        # All three live in the kept batch; none was copied out into its own cache.
        assert engine.cached_episodes == 3 and not engine._episodes
    # A call that leaves one out sets only that one aside; releasing the rest empties it all.
    engine.generate([GenerationRequest(contexts["a"], 2, episode_id="a")])
    assert sorted(engine._episodes) == ["b", "c"]
    for name in contexts:
        engine.release(name)
    assert engine.cached_episodes == 0 and engine._batch is None


def test_ragged_turns_over_many_calls_keep_exact_logprobs(model_and_tokenizer):
    """Rows that stop early or get observations of different lengths leave pads in the
    kept batch; once pads fill half of it the batch is laid out afresh. Every sampled
    token's logprob must still be the one a fresh forward gives."""
    model, tokenizer = model_and_tokenizer
    engine = make_engine(model_and_tokenizer, seed=3)
    contexts = {f"e{i}": [5 + i, 6, 7] for i in range(4)}
    relaid = 0
    for turn in range(10):
        names = [n for i, n in enumerate(contexts) if (turn + i) % 5 != 0]  # one sits out now and then
        requests = [
            GenerationRequest(contexts[n], 1 + (turn + i) % 4, episode_id=n) for i, n in enumerate(names)
        ]
        before = engine._batch
        results = engine.generate(requests)
        relaid += before is not None and before.cache is not engine._batch.cache
        for i, (request, result) in enumerate(zip(requests, results, strict=True)):
            expected = reference_logprobs(model, request.token_ids, result.token_ids)
            assert result.logprobs == pytest.approx(expected, abs=1e-4)
            observation = [10 + turn] * (1 + (i * 3 + turn) % 7)
            contexts[request.episode_id] = request.token_ids + result.token_ids + observation
    assert relaid >= 1  # the test did reach a fresh layout


def test_a_roomy_cache_layer_grows_in_place_and_keeps_what_it_holds():
    from forge.rollout.engines.kv import _RoomyLayer

    layer = _RoomyLayer(room=2)
    chunks = [torch.randn(3, 2, n, 4) for n in (3, 1, 1, 5, 1)]
    for i, chunk in enumerate(chunks):
        keys, values = layer.update(chunk, -chunk)
        expected = torch.cat(chunks[: i + 1], dim=2)
        assert torch.equal(keys, expected) and torch.equal(values, -expected)
        assert layer.get_seq_length() == expected.shape[2]
    layer.reserve(4)
    storage = layer._keys.data_ptr()
    layer.update(torch.zeros(3, 2, 4, 4), torch.zeros(3, 2, 4, 4))
    assert layer._keys.data_ptr() == storage  # the reserved room took the new states in place
    layer.batch_select_indices(torch.tensor([2, 0]))
    assert torch.equal(layer.keys[:, :, :11], torch.cat(chunks, dim=2)[[2, 0]])
    layer.crop(-4)
    assert layer.get_seq_length() == 11


def test_a_request_with_no_tokens_is_refused_saying_so(model_and_tokenizer):
    engine = make_engine(model_and_tokenizer)
    engine.generate([GenerationRequest([5, 6, 7] * 8, 2, episode_id="a")])  # a cache to borrow from
    with pytest.raises(ValueError, match="a request with no tokens"):
        engine.generate([GenerationRequest([], 2, episode_id="b")])
