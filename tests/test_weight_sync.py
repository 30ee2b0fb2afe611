"""Weight sync through the Ray object store: a sync really changes what a worker samples,
and the tokens generated after it carry the new policy version."""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch

from forge.config import Config
from forge.types import NO_VERSION, Sample
from forge.weights import pack_weights, unpack_weights

PROBE = [5, 6, 7, 8]
TASKS = [{"task_id": "t0", "secret": 3, "n": 16}]


def make_config(lora: bool) -> Config:
    cfg = Config()
    cfg.model.lora.enabled = lora
    # One Adam step moves every weight by about the learning rate: at 0.05 it overshoots on the
    # tiny Llama (token 9's logprob fell, -3.96 to -4.51); at 0.003 it rises on Llama and Qwen2,
    # full (to -2.73, -1.98) and LoRA (-3.45, -3.43).
    cfg.train.learning_rate = 0.003
    cfg.rollout.max_new_tokens = 2
    cfg.rollout.max_turns = 2
    cfg.trainer.packing = "padded"
    return cfg


def start(ray, checkpoint, cfg: Config):
    from forge.rollout.worker import RolloutWorker
    from forge.train.trainer import Trainer

    trainer = ray.remote(Trainer).remote(str(checkpoint), cfg.model, cfg.train, cfg.trainer, 0, 1)
    worker = ray.remote(RolloutWorker).remote(str(checkpoint), cfg.model, cfg.env, cfg.rollout, 0.5, 7, 1)
    return trainer, worker


def push_one_step(ray, trainer, worker) -> int:
    """One training step that pushes up the probability of token 9 after PROBE, then a sync."""
    sample = Sample(PROBE + [9], [0, 0, 0, 0, 1], [0.0] * 5, [NO_VERSION] * 4 + [0], advantage=1.0)
    ray.get(trainer.train_step.remote([sample, sample]))
    wrapped, version = ray.get(trainer.publish_weights.remote())
    return ray.get(worker.set_weights.remote(wrapped[0], version))


def generated_versions(ray, worker) -> set[int]:
    trajectories = ray.get(worker.rollout.remote(TASKS, 2))
    return {v for t in trajectories for v, m in zip(t.policy_versions, t.loss_mask, strict=True) if m}


@pytest.mark.parametrize("lora", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["full", "lora"])
def test_a_sync_changes_the_worker_distribution_and_advances_token_versions(
    ray_session, tiny_checkpoint, lora
):
    ray = ray_session
    trainer, worker = start(ray, tiny_checkpoint, make_config(lora))
    try:
        before = ray.get(worker.next_token_logprobs.remote(PROBE))
        assert generated_versions(ray, worker) == {0}
        version = push_one_step(ray, trainer, worker)
        after = ray.get(worker.next_token_logprobs.remote(PROBE))
        assert version == 1
        assert after[9] > before[9] + 1e-3
        assert generated_versions(ray, worker) == {1}
    finally:
        ray.kill(worker)
        ray.kill(trainer)


def test_lora_weights_are_adapters_only(tiny_checkpoint):
    from forge.train.trainer import Trainer

    cfg = make_config(lora=True)
    trainer = Trainer(tiny_checkpoint, cfg.model, cfg.train, cfg.trainer, 0, 1)
    weights = trainer.weights()
    assert weights and all("lora_" in name for name in weights)
    full = make_config(lora=False)
    everything = Trainer(tiny_checkpoint, full.model, full.train, full.trainer, 0, 1).weights()
    assert sum(t.numel() for t in weights.values()) < sum(t.numel() for t in everything.values()) / 4


def test_a_sync_with_unknown_tensor_names_fails_loudly(tiny_checkpoint):
    from forge.rollout.worker import RolloutWorker

    cfg = make_config(lora=False)
    worker = RolloutWorker(str(tiny_checkpoint), cfg.model, cfg.env, cfg.rollout, 0.5, 7, 1)
    with pytest.raises(ValueError, match="unknown tensors"):
        worker.set_weights({"base_model.model.lora_A.weight": torch.zeros(2)}, version=1)
    assert worker.get_policy_version() == 0


def test_packed_weights_round_trip_every_dtype_and_shape():
    state = {
        "w": torch.randn(3, 4),
        "half": torch.randn(5).to(torch.bfloat16),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "ints": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "strided": torch.randn(4, 6).t(),
    }
    packed = pickle.loads(pickle.dumps(pack_weights(state), protocol=5))
    for value in packed.values():
        value[0].flags.writeable = False  # as Ray's object store hands arrays out
    unpacked = unpack_weights(packed)
    assert unpacked.keys() == state.keys()
    for name, tensor in state.items():
        assert unpacked[name].dtype == tensor.dtype and unpacked[name].shape == tensor.shape
        assert torch.equal(unpacked[name], tensor)
    plain = {"w": state["w"]}
    assert unpack_weights(plain)["w"] is state["w"]


def test_unpacking_the_object_stores_read_only_bytes_copies_nothing_and_warns_nothing():
    packed = pack_weights({"w": torch.randn(64, 64)})
    data = packed["w"][0].copy()
    data.flags.writeable = False  # as Ray's object store hands arrays out
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unpacked = unpack_weights({"w": (data, *packed["w"][1:])})
    assert unpacked["w"].data_ptr() == data.ctypes.data
