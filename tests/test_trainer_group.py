"""`train.num_trainers=2`: two trainer actors (DDP, or FSDP2 sharding the model between
them) take the step one trainer takes, and publish and save what it does."""

from __future__ import annotations

import pytest
import torch

from forge.config import load_config


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_trainer_processes_train_the_same_first_step_as_one(ray_session, tmp_path, monkeypatch, strategy):
    from safetensors.torch import load_file

    from forge.orchestrator import train

    overrides = [
        "train.max_steps=1", "rollout.tasks_per_step=8", "rollout.group_size=8", "rollout.num_workers=1",
        "train.minibatches_per_step=1", "train.num_cpus=1", "trainer.packing=padded",
        "logging.tensorboard=false", "train.checkpoint_every=0",
    ]
    from forge import orchestrator

    groups = []

    class RecordingRun(orchestrator.Run):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            groups.append(getattr(self.trainer, "world_size", 1))

    monkeypatch.setattr(orchestrator, "Run", RecordingRun)
    single = train(load_config("configs/smoke.yaml", overrides), tmp_path / "one", progress=False)
    group = [*overrides, "train.num_trainers=2", f"train.strategy={strategy}"]
    double = train(load_config("configs/smoke.yaml", group), tmp_path / "two", progress=False)

    assert groups == [1, 2]  # the second run trained in a real two-process group
    initial = load_file(str(tmp_path / "one" / "initial_model" / "model.safetensors"))
    one = load_file(str(single.checkpoint / "model.safetensors"))
    two = load_file(str(double.checkpoint / "model.safetensors"))
    assert one.keys() == two.keys()
    assert any(not torch.equal(one[name], initial[name]) for name in one)  # the step did train
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=2e-5)
