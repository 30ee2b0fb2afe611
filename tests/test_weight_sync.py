"""Versioned weight sync from the trainer to rollout workers."""

from __future__ import annotations

import asyncio

import torch

from forge.config import Config
from forge.rollout.worker import RolloutWorker
from forge.train.trainer import Trainer
from forge.types import Sample


def _setup(tiny_checkpoint):
    cfg = Config()
    cfg.rollout.max_new_tokens = 2
    cfg.rollout.max_turns = 2
    cfg.train.learning_rate = 1e-2
    worker = RolloutWorker(str(tiny_checkpoint), cfg.model, cfg.env, cfg.rollout, 0.5, seed=0)
    trainer = Trainer(tiny_checkpoint, cfg.model, cfg.train, cfg.trainer, seed=0)
    return worker, trainer


def test_each_train_step_bumps_the_policy_version_and_new_tokens_carry_it(tiny_checkpoint):
    worker, trainer = _setup(tiny_checkpoint)
    tasks = [{"task_id": "a", "secret": 5, "n": 16}]
    trajectories = asyncio.run(worker.rollout(tasks, 4))
    assert {v for t in trajectories for v, m in zip(t.policy_versions, t.loss_mask, strict=False) if m} == {0}

    samples = [Sample.from_trajectory(t, 1.0 if i % 2 else -1.0) for i, t in enumerate(trajectories)]
    trainer.train_step(samples)
    trainer.train_step(samples)
    assert trainer.policy_version == 2

    worker.set_weights(trainer.weights(), trainer.policy_version)
    trajectories = asyncio.run(worker.rollout(tasks, 4))
    assert {v for t in trajectories for v, m in zip(t.policy_versions, t.loss_mask, strict=False) if m} == {2}


def test_sync_changes_what_the_worker_computes(tiny_checkpoint):
    worker, trainer = _setup(tiny_checkpoint)
    probe = torch.tensor([worker.chat.prompt_ids("guess a number from 0 to 15")])
    with torch.no_grad():
        before = worker.model(input_ids=probe).logits[0, -1].log_softmax(-1)
    trajectories = asyncio.run(worker.rollout([{"task_id": "a", "secret": 5, "n": 16}], 4))
    trainer.train_step([Sample.from_trajectory(t, 1.0) for t in trajectories])
    worker.set_weights(trainer.weights(), trainer.policy_version)
    with torch.no_grad():
        after = worker.model(input_ids=probe).logits[0, -1].log_softmax(-1)
        trained = trainer.model(input_ids=probe).logits[0, -1].log_softmax(-1)
    assert (after - before).abs().max() > 1e-3
    assert torch.allclose(after, trained, atol=1e-5)
