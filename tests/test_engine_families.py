"""The rollout engine on every family of the matrix: behaviour logprobs from its kept KV
caches (ragged multi-turn batches with pad holes, shared prompts, sliding windows shorter than
the contexts) equal a fresh forward's, and a weight sync makes it sample the new policy."""

from __future__ import annotations

import pytest
import torch

from forge.models.families import FAMILIES, WINDOW
from forge.models.loading import choose_attn_implementation
from forge.rollout.engines.hf import HFEngine
from forge.rollout.engines.protocol import GenerationRequest

TOLERANCE = 1e-5
STOP = 1  # the families' eos id


def rollout_model(name: str, seed: int = 0) -> torch.nn.Module:
    family = FAMILIES[name]
    config = family.build("eager", seed).config
    implementation = choose_attn_implementation(config, "auto", "cpu", "rollout.attn_implementation")
    return family.build(implementation, seed)


def fresh_logprobs(model, context: list[int], generated: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([context + generated])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return torch.tensor([logprobs[len(context) - 1 + i, t].item() for i, t in enumerate(generated)])


def play_ragged(engine: HFEngine, model, turns: int, seed: int) -> int:
    """Episodes that share a prompt, sit out turns, stop at different lengths and get
    observations of different lengths (pad holes in the kept batch); every sampled token's
    logprob is checked against a fresh forward. Returns the longest context seen."""
    prompt = [5, 6, 7, 8]
    contexts = {f"e{i}": prompt + [9 + i] for i in range(4)}
    longest = 0
    for turn in range(turns):
        names = [n for i, n in enumerate(contexts) if (turn + i) % 5 != 0]
        requests = [
            GenerationRequest(contexts[n], 1 + (turn + i) % 4, episode_id=n) for i, n in enumerate(names)
        ]
        for i, (request, result) in enumerate(zip(requests, engine.generate(requests), strict=True)):
            want = fresh_logprobs(model, request.token_ids, result.token_ids)
            got = torch.tensor(result.logprobs)
            assert (got - want).abs().max().item() <= TOLERANCE, (turn, request.episode_id)
            observation = [20 + turn] * (1 + (i * 3 + turn + seed) % 7)
            contexts[request.episode_id] = request.token_ids + result.token_ids + observation
            longest = max(longest, len(contexts[request.episode_id]))
    return longest


@pytest.mark.parametrize("name", list(FAMILIES))
def test_engine_behaviour_logprobs_equal_a_fresh_forward(name):
    model = rollout_model(name)
    engine = HFEngine(model, [STOP], pad_token_id=0, seed=3)
    assert play_ragged(engine, model, turns=8, seed=0) > 4 * WINDOW  # far past every window


# Tied embeddings (gemma2) and expert weights (qwen3_moe) in the fast run; every family in the slow one.
SYNC_FAST = {"gemma2", "qwen3_moe"}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[] if n in SYNC_FAST else [pytest.mark.slow]) for n in FAMILIES]
)
def test_weight_sync_makes_the_engine_sample_the_new_policy(name):
    model, trained = rollout_model(name), rollout_model(name, seed=1)
    engine = HFEngine(model, [STOP], pad_token_id=0, seed=3)
    play_ragged(engine, model, turns=2, seed=0)  # caches from the old weights
    engine.load_weights({k: v.clone() for k, v in trained.state_dict().items()}, version=1)
    assert engine.policy_version == 1
    play_ragged(engine, trained, turns=3, seed=1)
