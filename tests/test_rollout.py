"""Token-in-token-out bookkeeping of the agent loop, on the real tiny model."""

from __future__ import annotations

import asyncio

import pytest
import torch

from forge.config import Config
from forge.rollout.engines.hf import HFEngine
from forge.rollout.worker import RolloutWorker
from forge.tree import microbatches
from forge.types import NO_VERSION, Sample


class RecordingEngine:
    """Wraps the worker's engine and keeps every generation result it hands out."""

    def __init__(self, inner: HFEngine) -> None:
        self.inner = inner
        self.results = []

    @property
    def policy_version(self) -> int:
        return self.inner.policy_version

    def generate(self, requests):
        results = self.inner.generate(requests)
        self.results.extend(results)
        return results

    def load_weights(self, state_dict, version):
        self.inner.load_weights(state_dict, version)

    def release(self, episode_id):
        self.inner.release(episode_id)


@pytest.fixture(scope="module")
def played(tiny_checkpoint):
    cfg = Config()
    cfg.rollout.max_new_tokens = 3
    cfg.rollout.max_turns = 4
    worker = RolloutWorker(str(tiny_checkpoint), cfg.model, cfg.env, cfg.rollout, 0.5, seed=0)
    worker.engine = RecordingEngine(worker.engine)
    tasks = [{"task_id": "t0", "secret": 3, "n": 16}, {"task_id": "t1", "secret": 11, "n": 16}]
    trajectories = asyncio.run(worker.rollout(tasks, group_size=4))
    return worker, trajectories


def test_generated_ids_enter_the_trajectory_exactly_as_sampled(played):
    worker, trajectories = played
    generated = sorted(tuple(r.token_ids) for r in worker.engine.results)
    in_trajectories = sorted(
        tuple(t.token_ids[turn.start : turn.end]) for t in trajectories for turn in t.turns
    )
    assert in_trajectories == generated


def test_only_generated_tokens_are_in_the_loss(played):
    _, trajectories = played
    for t in trajectories:
        trainable = {i for turn in t.turns for i in range(turn.start, turn.end)}
        assert {i for i, m in enumerate(t.loss_mask) if m} == trainable
        assert all(t.loss_mask[i] == 0 for i in range(t.prompt_length))


def test_observation_tokens_come_from_the_chat_template(played):
    worker, trajectories = played
    for t in trajectories:
        for turn in t.turns[:-1]:
            observation = t.token_ids[turn.end : turn.obs_end]
            # The turn's end closing a turn cut off by max_new_tokens is the harness's, not the model's.
            if turn.truncated:
                assert observation[0] == worker.chat.turn_end_id == worker.chat.eos_token_id
                observation = observation[1:]
            text = worker.tokenizer.decode(observation, skip_special_tokens=True).split()
            assert text[0] == "user" and text[1] in {"higher", "lower", "invalid"}


def test_per_token_versions_and_logprobs_mark_generated_tokens(played):
    _, trajectories = played
    for t in trajectories:
        for mask, version, logprob in zip(t.loss_mask, t.policy_versions, t.behaviour_logprobs, strict=True):
            if mask:
                assert version == 0 and logprob <= 0.0
            else:
                assert version == NO_VERSION and logprob == 0.0


def test_behaviour_logprobs_match_a_fresh_forward(played):
    worker, trajectories = played
    samples = [Sample.from_trajectory(t, 0.0) for t in trajectories]
    (batch,) = microbatches(samples, "padded", 1 << 20)
    with torch.no_grad():
        logprobs = batch.forward_logprobs(worker.model)
    for index, fresh in zip(batch.sample_indices, logprobs, strict=True):
        sample = samples[index]
        mask = torch.tensor(sample.loss_mask[1:], dtype=torch.bool)
        recorded = torch.tensor(sample.behaviour_logprobs[1:])
        assert torch.allclose(fresh[mask], recorded[mask], atol=1e-4)


def test_every_episode_ends_with_a_status(played):
    _, trajectories = played
    assert len(trajectories) == 8
    for t in trajectories:
        assert t.status in {"ok", "truncated"}
        assert t.success == (t.status == "ok")
        assert 1 <= t.num_turns <= 4


def test_cached_renderings_equal_fresh_ones_and_cannot_be_mutated_through(tiny_checkpoint):
    from forge.models.loading import load_tokenizer
    from forge.rollout.chat import CACHE_MAX_CHARS, ChatFormat

    cached, fresh = ChatFormat(load_tokenizer(tiny_checkpoint)), ChatFormat(load_tokenizer(tiny_checkpoint))
    for text in ("higher", "lower", "x " * CACHE_MAX_CHARS):  # the last one is too long to cache
        first = cached.observation_ids(text)
        first.append(-1)  # a caller extending the list it got must not change the next answer
        assert cached.observation_ids(text) == fresh._observation_ids(text, "user") == first[:-1]
    prompt = cached.prompt_ids("guess a number", "be quick")
    prompt.clear()
    assert cached.prompt_ids("guess a number", "be quick") == fresh._prompt_ids(
        "guess a number", "be quick", None
    )
    assert cached.prompt_ids("guess a number", "be quick")
