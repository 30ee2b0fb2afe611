"""HFEngine: per-episode KV caches, mixed-turn batches, shared prompts, exact logprobs."""

from __future__ import annotations

import pytest
import torch

from forge.config import ModelConfig
from forge.rollout.engine import GenerationRequest, HFEngine


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
    context = prompt + first.token_ids + ([] if first.finished else [engine.stop_token_ids[0].item()]) + observation
    second = engine.generate([GenerationRequest(context, 3, episode_id="a")])[0]
    assert first.prefill_tokens == len(prompt)
    # The last sampled token was never fed through the model, so it is prefilled now.
    assert second.prefill_tokens == len(context) - len(prompt) - len(first.token_ids) + 1


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
