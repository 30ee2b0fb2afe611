"""Server-mode engines get the trainer's weights exactly, by each path of
`rollout.weight_sync` (object store, folder, broadcast group), full and LoRA."""

from __future__ import annotations

import pytest
import torch

from forge.config import load_config


def perturb(trainer) -> None:
    """Change the trainer's trainable weights as a step would."""
    with torch.no_grad():
        for parameter in trainer.model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn_like(parameter))


def trainer_logprobs(trainer, token_ids: list[int], temperature: float) -> list[float]:
    with torch.no_grad():
        logits = trainer.model(input_ids=torch.tensor([token_ids])).logits[0, -1]
        return torch.log_softmax(logits.float() / temperature, dim=-1).tolist()


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_every_weight_sync_path_gives_the_engines_the_trainers_weights(ray_session, tmp_path, lora):
    import sys

    import ray
    from ray import cloudpickle

    from forge.models.loading import resolve_model_path
    from forge.rollout.engines.pool import EnginePool
    from forge.run.context import make_trainer

    overrides = ["rollout.engine=server", "rollout.num_engines=2", "rollout.num_cpus_per_engine=0"]
    cfg = load_config("configs/smoke.yaml", overrides + ([f"model.lora.enabled={lora}"]))
    model = resolve_model_path(cfg.model, tmp_path / "model", seed=0)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # perturb & co run inside the trainer
    trainer = make_trainer(cfg, model)  # loads while the engines do (EnginePool.start waits for them)
    try:
        pool = EnginePool.start(cfg, model)
    except BaseException:
        ray.kill(trainer)
        raise
    prompt = [2, 6, 9, 10, 11, 3, 2, 7]
    try:
        for version, method in enumerate(["object_store", "folder", "broadcast", "broadcast"], start=1):
            cfg.rollout.weight_sync = method
            ray.get(trainer.__ray_call__.remote(perturb))
            wrapped, _ = ray.get(trainer.publish_weights.remote())
            pool.sync(wrapped, version, trainer)
            expected = torch.tensor(ray.get(trainer.__ray_call__.remote(trainer_logprobs, prompt, 1.0)))
            for actor in pool.actors:
                assert ray.get(actor.get_policy_version.remote()) == version
                got = torch.tensor(ray.get(actor.next_token_logprobs.remote(prompt)))
                assert torch.allclose(got, expected, atol=1e-5), (method, (got - expected).abs().max())
    finally:
        pool.shutdown()
        ray.kill(trainer)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], "object_store"),  # the fastest measured on CPU engines, full weights and adapters
        (["model.lora.enabled=true"], "object_store"),
        (["rollout.num_gpus_per_engine=1"], "object_store"),  # the broadcast is gloo: host memory too
        (["rollout.num_gpus_per_engine=1", "model.lora.enabled=true"], "object_store"),
        (["rollout.weight_sync=folder"], "folder"),  # a choice the user makes stands
        (["rollout.weight_sync=broadcast", "train.mode=async"], "object_store"),  # the published version
    ],
)
def test_auto_weight_sync_follows_the_measured_numbers(overrides, expected):
    from forge.rollout.engines.actor_sync import weight_sync_method

    cfg = load_config("configs/smoke.yaml", ["rollout.engine=server", *overrides])
    assert weight_sync_method(cfg.rollout.weight_sync, cfg.train.mode, trainer=object()) == expected


def test_the_weight_sync_bench_calls_a_near_tie_for_the_object_store():
    from bench.weight_sync import fastest

    assert fastest({"object_store": 0.0223, "folder": 0.0217, "broadcast": 0.186}) == "object_store"
    assert fastest({"object_store": 2.33, "folder": 3.25, "broadcast": 1.48}) == "broadcast"
