"""`train.num_trainers=2`: two trainer actors (DDP, or FSDP2 sharding the model between
them) take the step one trainer takes, and publish and save what it does."""

from __future__ import annotations

import pytest
import torch

from forge.config import load_config

FIRST_STEP = [
    "train.max_steps=1",
    "rollout.tasks_per_step=8",
    "rollout.group_size=8",
    "rollout.num_workers=1",
    "train.minibatches_per_step=1",
    "train.num_cpus=1",
    "trainer.packing=padded",
    "logging.tensorboard=false",
    "train.checkpoint_every=0",
]


def train_recording_group_sizes(overrides: list[str], output_dir) -> tuple[object, list[int]]:
    """The run's result, and for each run context it built, how many processes its trainer
    trains in."""
    from forge.run import context
    from forge.run.launch import train

    sizes = []

    class RecordingRun(context.Run):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            sizes.append(getattr(self.trainer, "world_size", 1))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(context, "Run", RecordingRun)
        result = train(load_config("configs/smoke.yaml", overrides), output_dir, progress=False)
    return result, sizes


@pytest.fixture(scope="module")
def one_trainer_first_step(ray_session, tmp_path_factory):
    """The one-trainer run both strategies compare with (it is the same for both)."""
    output_dir = tmp_path_factory.mktemp("one")
    result, sizes = train_recording_group_sizes(FIRST_STEP, output_dir)
    assert sizes == [1]
    return output_dir, result


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_trainer_processes_train_the_same_first_step_as_one(one_trainer_first_step, tmp_path, strategy):
    from safetensors.torch import load_file

    one_dir, single = one_trainer_first_step
    group = [*FIRST_STEP, "train.num_trainers=2", f"train.strategy={strategy}"]
    double, sizes = train_recording_group_sizes(group, tmp_path / "two")

    assert sizes == [2]  # the run trained in a real two-process group
    initial = load_file(str(one_dir / "initial_model" / "model.safetensors"))
    one = load_file(str(single.checkpoint / "model.safetensors"))
    two = load_file(str(double.checkpoint / "model.safetensors"))
    assert one.keys() == two.keys()
    assert any(not torch.equal(one[name], initial[name]) for name in one)  # the step did train
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=2e-5)


@pytest.mark.slow
def test_an_async_run_on_two_sharded_trainer_ranks_trains_checkpoints_and_saves(ray_session, tmp_path):
    """Async mode calls train_and_publish, checkpoints and the final save on the group; under
    FSDP2 each of those gathers the shards on both ranks."""
    import json

    from safetensors.torch import load_file

    from forge.run.launch import train

    overrides = [
        "train.mode=async",
        "train.max_steps=3",
        "train.checkpoint_every=2",
        "rollout.tasks_per_step=4",
        "rollout.group_size=4",
        "rollout.num_workers=1",
        "train.num_cpus=0.5",
        "train.num_trainers=2",
        "train.strategy=fsdp",
        "logging.tensorboard=false",
    ]
    result = train(load_config("configs/smoke.yaml", overrides), tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert result.steps == 3 and [r["policy_version"] for r in records] == [1.0, 2.0, 3.0]
    saved = torch.load(tmp_path / "checkpoints" / "step-000002" / "trainer.pt", weights_only=False)
    assert saved["policy_version"] == 2
    initial = load_file(str(tmp_path / "initial_model" / "model.safetensors"))
    for name, tensor in saved["trainable"].items():  # whole tensors, gathered from both ranks
        assert tensor.shape == initial[name].shape, name
    assert (result.checkpoint / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_rank_that_fails_to_load_stops_the_group_at_once_and_no_rank_is_left_waiting(
    ray_session, tmp_path, tiny_checkpoint
):
    # Under FSDP2 only rank 0 reads the weights; the others build from the config and wait for
    # its broadcast. Unreadable weights fail rank 0: the group must say so and end the other
    # rank too, not leave it blocked in the broadcast.
    import shutil
    import time

    from forge.config import ModelConfig, TrainConfig, TrainerConfig
    from forge.train.group import TrainerGroup

    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    args = (str(broken), ModelConfig(path=str(broken)), TrainConfig(), TrainerConfig(), 0, 1)
    created = []

    class Recorded(TrainerGroup):
        def __init__(self, *a, **k):
            try:
                super().__init__(*a, **k)
            finally:
                created.append(self)

    started = time.monotonic()
    with pytest.raises(Exception, match="safetensors|header|Error"):
        Recorded(2, 1, 0, args, {"strategy": "fsdp", "mixed_precision": "no"})
    assert time.monotonic() - started < 120
    deadline = time.monotonic() + 30  # every rank ends (ray.kill is asynchronous), none waits in a collective
    for actor in created[0].actors:
        while True:
            try:
                ray_session.get(actor.address.remote(), timeout=10)
            except ray_session.exceptions.RayActorError:
                break
            assert time.monotonic() < deadline, "a rank outlived the failed group"
            time.sleep(0.5)
