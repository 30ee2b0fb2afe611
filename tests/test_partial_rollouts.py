"""Partial rollouts: an episode that spans a weight update goes on under the new version.
Each token keeps the version that sampled it and that version's behaviour logprob, and the
trainer's importance ratios use those token by token."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from forge.config import Config, ModelConfig, TrainConfig, TrainerConfig
from forge.env import Env, StepResult
from forge.rollout.worker import RolloutWorker
from forge.train.trainer import Trainer
from forge.types import NO_VERSION, Sample, Trajectory

GROUP = 2


class GatedEnv(Env):
    """Four turns; after the second, every episode waits for the test to update the weights."""

    waiting = 0
    all_waiting: asyncio.Event
    gate: asyncio.Event

    async def reset(self, task, seed):
        self.steps = 0
        return "guess a number from 0 to 3"

    async def step(self, action):
        self.steps += 1
        if self.steps == 2:
            GatedEnv.waiting += 1
            if GatedEnv.waiting == GROUP:
                GatedEnv.all_waiting.set()
            await GatedEnv.gate.wait()
        return StepResult("lower", done=self.steps == 4)


def perturbed(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        name: p.detach() + 0.05 * torch.randn(p.shape, generator=generator)
        for name, p in model.named_parameters()
    }


def token_logprobs(model: torch.nn.Module, trajectory: Trajectory) -> torch.Tensor:
    """log p(token t | tokens before t) for every t >= 1, from one plain forward."""
    ids = torch.tensor([trajectory.token_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]


@pytest.fixture(scope="module")
def spanning(tiny_checkpoint):
    """Two episodes of one group, weights updated to version 1 after each played 2 turns."""
    cfg = Config()
    cfg.rollout.max_new_tokens = 3
    cfg.rollout.max_turns = 4
    worker = RolloutWorker(str(tiny_checkpoint), cfg.model, cfg.env, cfg.rollout, 0.5, seed=0)
    worker.env_class = GatedEnv
    old = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval()
    new = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval()
    new.load_state_dict(perturbed(old), strict=False)

    async def play() -> list[Trajectory]:
        GatedEnv.waiting, GatedEnv.all_waiting, GatedEnv.gate = 0, asyncio.Event(), asyncio.Event()
        rollout = asyncio.ensure_future(worker.rollout([{"task_id": "t"}], GROUP))
        await asyncio.wait_for(GatedEnv.all_waiting.wait(), 60)
        worker.set_weights(dict(new.named_parameters()), 1)  # as a sync from the trainer arrives mid-episode
        GatedEnv.gate.set()
        return await rollout

    return asyncio.run(play()), old, new


def test_every_token_carries_the_version_that_sampled_it(spanning):
    trajectories, _, _ = spanning
    for t in trajectories:
        assert t.status == "ok" and t.num_turns == 4
        for number, turn in enumerate(t.turns):
            assert set(t.policy_versions[turn.start : turn.end]) == {0 if number < 2 else 1}
        generated = {i for turn in t.turns for i in range(turn.start, turn.end)}
        assert all((v == NO_VERSION) == (i not in generated) for i, v in enumerate(t.policy_versions))


def test_behaviour_logprobs_are_those_of_the_sampling_version(spanning):
    trajectories, old, new = spanning
    for t in trajectories:
        by_version = {0: token_logprobs(old, t), 1: token_logprobs(new, t)}
        for i, version in enumerate(t.policy_versions):
            if version == NO_VERSION:
                continue
            other = by_version[1 - version][i - 1].item()
            assert t.behaviour_logprobs[i] == pytest.approx(by_version[version][i - 1].item(), abs=1e-4)
            assert abs(t.behaviour_logprobs[i] - other) > 1e-3  # the versions differ, so the check can fail


def test_the_trainer_weighs_each_token_by_its_own_versions_logprob(spanning, tiny_checkpoint):
    """A trainer still at version 0 sees ratio 1 on the version-0 tokens and
    p_0 / p_1 on the version-1 tokens: its mean is the mean of exactly those."""
    trajectories, old, _ = spanning
    trainer = Trainer(tiny_checkpoint, ModelConfig(path=str(tiny_checkpoint)), TrainConfig(loss="pg"),
                      TrainerConfig(packing="tree"), seed=0)  # fmt: skip
    expected = []
    for t in trajectories:
        current = token_logprobs(old, t)
        expected += [torch.exp(current[i - 1] - t.behaviour_logprobs[i]).item()
                     for i, v in enumerate(t.policy_versions) if v != NO_VERSION]  # fmt: skip
    metrics = trainer.train_step([Sample.from_trajectory(t, advantage=1.0) for t in trajectories])
    assert metrics["importance_ratio_mean"] == pytest.approx(sum(expected) / len(expected), rel=1e-4)
    assert abs(sum(expected) / len(expected) - 1.0) > 1e-3  # a trainer blind to the versions would see 1
