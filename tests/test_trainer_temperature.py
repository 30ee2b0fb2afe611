"""The trainer trains the policy its engines sample from: at `rollout.temperature` T other
than 1 the engine samples from softmax(logits / T), and the trainer's logprobs (policy,
reference, entropy) are taken at the same T, so an on-policy step sees every importance
ratio at 1."""

from __future__ import annotations

import pytest

from forge.config import Config, ModelConfig, TrainConfig, TrainerConfig
from forge.run.context import trainer_arguments
from forge.train.trainer import Trainer
from forge.types import Sample

TEMPERATURE = 0.7


def engine_samples(tiny_checkpoint, temperature: float) -> list[Sample]:
    """Six replies of a group sampled by the in-process engine at `temperature`, with its
    behaviour logprobs, and advantages of both signs."""
    from forge.models.loading import load_model, load_tokenizer
    from forge.rollout.engines.hf import HFEngine
    from forge.rollout.engines.protocol import GenerationRequest

    tokenizer = load_tokenizer(tiny_checkpoint)
    model = load_model(tiny_checkpoint, ModelConfig())
    engine = HFEngine(
        model, [tokenizer.eos_token_id], tokenizer.pad_token_id, temperature=temperature, seed=0
    )
    prompt = tokenizer("what is 3 plus 4")["input_ids"]
    requests = [GenerationRequest(prompt, 12, episode_id=str(i), group_id="g") for i in range(6)]
    samples = []
    for i, result in enumerate(engine.generate(requests)):
        tokens = prompt + result.token_ids
        reply = len(result.token_ids)
        samples.append(
            Sample(
                tokens,
                [0] * len(prompt) + [1] * reply,
                [0.0] * len(prompt) + result.logprobs,
                [0] * len(tokens),
                (-1.0) ** i,
            )
        )
    return samples


@pytest.mark.parametrize("packing", ["tree", "padded"])
def test_an_on_policy_step_at_a_temperature_other_than_one_sees_every_ratio_at_one(tiny_checkpoint, packing):
    samples = engine_samples(tiny_checkpoint, TEMPERATURE)
    metrics = {}
    for temperature in (1.0, TEMPERATURE):
        trainer = Trainer(
            tiny_checkpoint,
            ModelConfig(path=str(tiny_checkpoint)),
            TrainConfig(loss="ppo_clip", minibatches_per_step=1),
            TrainerConfig(packing=packing),
            temperature=temperature,
        )
        metrics[temperature] = trainer.train_step(samples)
    # Taken at temperature 1, the trainer's policy is not the one that sampled.
    assert metrics[1.0]["mismatch_kl"] > 1e-3
    assert metrics[1.0]["clip_fraction"] > 0
    assert metrics[TEMPERATURE]["mismatch_kl"] <= 1e-9
    assert abs(metrics[TEMPERATURE]["importance_ratio_mean"] - 1.0) <= 1e-5
    assert metrics[TEMPERATURE]["clip_fraction"] == 0.0


def test_a_runs_trainer_takes_the_rollout_temperature():
    cfg = Config()
    cfg.rollout.temperature = 0.6
    *_, temperature = trainer_arguments(cfg, "/some/model")
    assert temperature == 0.6
