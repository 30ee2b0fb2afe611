"""Per-request sampling in HFEngine: temperature, greedy, seed, top logprobs, and the
per-token callback that ends a row (stop strings, streaming)."""

from __future__ import annotations

import pytest
import torch

from forge.config import ModelConfig
from forge.rollout.engines.hf import HFEngine
from forge.rollout.engines.protocol import GenerationRequest

PROMPT = [5, 6, 7, 8, 9]


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    from forge.models.loading import load_model

    return load_model(tiny_checkpoint, ModelConfig())


def no_stop_engine(model, seed: int = 0) -> HFEngine:
    """An engine with no stop token, so rows run to their limit unless a callback ends them."""
    return HFEngine(model, [], pad_token_id=0, seed=seed)


def next_logprobs(model, context: list[int], temperature: float = 1.0) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([context])).logits[0, -1].float()
    return torch.log_softmax(logits / temperature, dim=-1)


def test_a_callback_that_says_stop_ends_only_its_row_as_finished(model):
    engine = no_stop_engine(model)
    seen: list[int] = []

    def stop_at_third(token: int, logprob: float, top: list) -> bool:
        seen.append(token)
        return len(seen) == 3

    watched, free = engine.generate(
        [
            GenerationRequest(PROMPT, 12, "a", on_token=stop_at_third),
            GenerationRequest(PROMPT + [10], 12, "b"),
        ]
    )
    assert watched.token_ids == seen and len(seen) == 3 and watched.finished
    assert len(free.token_ids) == 12 and not free.finished


def test_the_turn_after_a_callback_stop_keeps_exact_logprobs(model):
    engine = no_stop_engine(model)
    first = engine.generate([GenerationRequest(PROMPT, 10, "a", on_token=lambda *_: True)])[0]
    context = PROMPT + first.token_ids + [7, 8]
    second = engine.generate([GenerationRequest(context, 4, "a")])[0]
    expected = [
        next_logprobs(model, context + second.token_ids[:i])[t].item() for i, t in enumerate(second.token_ids)
    ]
    assert second.logprobs == pytest.approx(expected, abs=1e-4)


def test_a_seeded_request_samples_the_same_tokens_whatever_its_batch(model):
    engine = no_stop_engine(model)
    alone = engine.generate([GenerationRequest(PROMPT, 8, seed=1234)])[0]
    engine.generate([GenerationRequest(PROMPT, 5)])  # moves the engine's own generator on
    batched = engine.generate([GenerationRequest(PROMPT + [3], 8), GenerationRequest(PROMPT, 8, seed=1234)])[
        1
    ]
    other_seed = engine.generate([GenerationRequest(PROMPT, 8, seed=99)])[0]
    assert batched.token_ids == alone.token_ids
    assert other_seed.token_ids != alone.token_ids


def test_temperature_zero_is_greedy_with_the_models_own_logprobs(model):
    result = no_stop_engine(model).generate([GenerationRequest(PROMPT, 5, temperature=0.0)])[0]
    context = list(PROMPT)
    for token, logprob in zip(result.token_ids, result.logprobs, strict=True):
        expected = next_logprobs(model, context)
        assert token == int(expected.argmax()) and logprob == pytest.approx(expected[token].item(), abs=1e-4)
        context.append(token)


def test_a_requests_temperature_sets_its_behaviour_logprobs(model):
    engine = no_stop_engine(model)
    hot, default = engine.generate(
        [GenerationRequest(PROMPT, 1, temperature=2.0), GenerationRequest(PROMPT + [4], 1)]
    )
    assert hot.logprobs[0] == pytest.approx(
        next_logprobs(model, PROMPT, 2.0)[hot.token_ids[0]].item(), abs=1e-4
    )
    assert default.logprobs[0] == pytest.approx(
        next_logprobs(model, PROMPT + [4])[default.token_ids[0]].item(), abs=1e-4
    )


def test_top_logprobs_are_the_k_most_likely_tokens_of_each_step(model):
    engine = no_stop_engine(model)
    asked, plain = engine.generate(
        [GenerationRequest(PROMPT, 3, top_logprobs=4), GenerationRequest(PROMPT + [4], 3)]
    )
    assert plain.top_logprobs is None
    assert len(asked.top_logprobs) == 3
    context = list(PROMPT)
    for token, top in zip(asked.token_ids, asked.top_logprobs, strict=True):
        values, ids = next_logprobs(model, context).topk(4)
        assert [t for t, _ in top] == ids.tolist()
        assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-4)
        context.append(token)


def test_top_logprobs_reach_the_callback(model):
    tops: list[list] = []
    no_stop_engine(model).generate(
        [GenerationRequest(PROMPT, 2, top_logprobs=2, on_token=lambda t, lp, top: tops.append(top) and False)]
    )
    assert len(tops) == 2 and all(len(top) == 2 for top in tops)
