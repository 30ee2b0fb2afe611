"""Checkpoints publish atomically, a damaged one is refused naming its file, a full disk
stops a run with the file it could not write, and a trainer restored from a checkpoint
continues bit for bit."""

import errno
import os
import pickle
import resource
import signal
import types
import zipfile

import pytest
import torch
import yaml

from forge.config import ConfigError, ModelConfig, TrainConfig, TrainerConfig
from forge.train.checkpoint import (
    CheckpointError,
    check_checkpoint,
    checkpoint_root,
    drop_rows_after,
    latest_checkpoint,
    write_checkpoint,
)
from forge.types import Sample


def fill(step: int):
    def write(directory):
        torch.save(
            {"policy_version": step, "trainable": {"w": torch.arange(4096.0)}}, directory / "trainer.pt"
        )
        (directory / "run_state.pkl").write_bytes(pickle.dumps({"step": step}))

    return write


def test_latest_names_the_newest_complete_checkpoint(tmp_path):
    write_checkpoint(tmp_path, 1, fill(1))
    write_checkpoint(tmp_path, 2, fill(2))
    assert latest_checkpoint(tmp_path).name == "step-000002"
    assert torch.load(latest_checkpoint(tmp_path) / "trainer.pt")["policy_version"] == 2


def test_a_checkpoint_that_dies_while_writing_never_becomes_latest(tmp_path):
    write_checkpoint(tmp_path, 1, fill(1))

    def dies_halfway(directory):
        (directory / "trainer.pt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path, 2, dies_halfway)
    assert latest_checkpoint(tmp_path).name == "step-000001"
    assert not (checkpoint_root(tmp_path) / "step-000002").exists()


def test_a_checkpoint_the_disk_cannot_hold_is_removed_and_the_previous_stays_latest(tmp_path):
    write_checkpoint(tmp_path, 1, fill(1))

    def disk_fills(directory):
        (directory / "trainer.pt").write_bytes(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_checkpoint(tmp_path, 2, disk_fills)
    # Its half would hold the space the run (or the next checkpoint) needs.
    assert sorted(p.name for p in checkpoint_root(tmp_path).iterdir()) == ["latest", "step-000001"]
    check_checkpoint(latest_checkpoint(tmp_path))


@pytest.fixture
def disk_fills_at_100_kb():
    """Files stop growing at 100 KB, as on a disk that fills mid-write: the write that crosses it
    is cut short, the next fails (EFBIG here, ENOSPC on a full disk)."""
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, limits[1]))
    yield
    resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    signal.signal(signal.SIGXFSZ, handler)


def test_a_trainer_state_that_does_not_fit_on_the_disk_names_its_file(tmp_path, disk_fills_at_100_kb):
    from forge.train.checkpoint import save_trainer

    state = types.SimpleNamespace(state_dict=dict, get_state=dict)
    trainer = types.SimpleNamespace(
        training_state=lambda: ({"weight": torch.zeros(100_000)}, {}), scheduler=state, _shuffle=state,
        policy_version=1, writes_files=True,
    )  # fmt: skip
    # torch.save swallows the failed write and says "enforce fail ... unexpected pos".
    with pytest.raises(OSError) as failed:
        save_trainer(trainer, tmp_path)
    assert failed.value.errno == errno.EFBIG and failed.value.filename == str(tmp_path / "trainer.pt")


def test_metrics_that_do_not_fit_on_the_disk_name_their_file(tmp_path):
    from forge.metrics import MetricsLogger

    os.symlink("/dev/full", tmp_path / "metrics.jsonl")
    logger = MetricsLogger(tmp_path, tensorboard=False)
    with pytest.raises(OSError) as failed:
        logger.log(1, {"reward_mean": 0.5})
    assert failed.value.errno == errno.ENOSPC and failed.value.filename == str(tmp_path / "metrics.jsonl")


def test_a_model_whose_safetensors_do_not_fit_on_the_disk_names_its_folder(tmp_path):
    from safetensors import SafetensorError

    from forge.disk import naming

    with pytest.raises(OSError) as failed, naming(tmp_path):  # as the trainer saves final/
        # safetensors' words for a full disk (a 1 MiB tmpfs; /dev/full it replaces, not writes)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert failed.value.errno == errno.ENOSPC and failed.value.filename == str(tmp_path)


def test_a_run_stopped_by_a_full_disk_says_which_file_and_how_to_resume(tmp_path, monkeypatch, capsys):
    from ray.exceptions import RayTaskError

    import forge.run.launch
    from forge.cli import main

    write_checkpoint(tmp_path, 2, fill(2))
    written = tmp_path / "checkpoints" / ".tmp-step-000004-1" / "trainer.pt"
    full = OSError(errno.ENOSPC, "No space left on device", str(written))

    def disk_fills(*args, **kwargs):  # as the trainer actor's save raises it through ray.get
        raise RayTaskError("Trainer.save_state", "Traceback ...", full).as_instanceof_cause()

    monkeypatch.setattr(forge.run.launch, "train", disk_fills)
    assert main(["train", "smoke", "--output-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"forge: writing {written} failed (No space left on device), so the run stopped; free space under "
        f"{tmp_path} or choose another --output-dir. Continue from step-000002 with: forge train smoke "
        f"--resume {tmp_path}"
    ]


def test_a_full_disk_at_the_first_checkpoint_is_not_told_to_set_checkpoint_every(
    tmp_path, monkeypatch, capsys
):
    from ray.exceptions import RayTaskError

    import forge.run.launch
    from forge.cli import main

    written = tmp_path / "checkpoints" / ".tmp-step-000002-1" / "trainer.pt"
    full = OSError(errno.ENOSPC, "No space left on device", str(written))

    def disk_fills(*args, **kwargs):
        raise RayTaskError("Trainer.save_state", "Traceback ...", full).as_instanceof_cause()

    monkeypatch.setattr(forge.run.launch, "train", disk_fills)
    assert main(["train", "smoke", "train.checkpoint_every=2", "--output-dir", str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert "set train.checkpoint_every" not in error
    assert error.rstrip().endswith(
        "No checkpoint was complete before the write failed, so the run starts over."
    )


def test_a_run_stopped_before_its_first_checkpoint_says_so_not_to_set_checkpoint_every(tmp_path):
    from forge.run.faults import resume_hint

    assert resume_hint(tmp_path, "smoke", checkpoint_every=50) == (
        " No checkpoint was written: the run stopped before its first (train.checkpoint_every=50), "
        "so it starts over."
    )
    assert "set train.checkpoint_every" in resume_hint(tmp_path, "smoke", checkpoint_every=0)


def damaged_run(run_dir, tiny_checkpoint, damage):
    """A run with checkpoints at steps 1 and 2 whose latest was damaged by `damage(step_dir)`."""
    killed_run(run_dir, str(tiny_checkpoint))
    write_checkpoint(run_dir, 2, fill(2), keep=2)
    damage(checkpoint_root(run_dir) / "step-000002")
    return run_dir


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_weight_byte(path):
    """Change one byte inside a saved tensor's bytes, as a bad disk or a bit flip in transit
    does: torch.load reads it back as a different weight without an error."""
    with zipfile.ZipFile(path) as archive:
        record = max(archive.infolist(), key=lambda info: info.file_size)  # the tensor's data
    data = bytearray(path.read_bytes())
    name_and_extra = int.from_bytes(data[record.header_offset + 26 : record.header_offset + 28], "little")
    name_and_extra += int.from_bytes(data[record.header_offset + 28 : record.header_offset + 30], "little")
    data[record.header_offset + 30 + name_and_extra + record.file_size // 2] ^= 0x40
    path.write_bytes(bytes(data))


DAMAGES = {
    "trainer.pt is damaged (BadZipFile": lambda d: truncate(d / "trainer.pt"),
    "trainer.pt is damaged (its record trainer/data/0 fails its CRC check": lambda d: flip_a_weight_byte(
        d / "trainer.pt"
    ),
    "run_state.pkl is damaged (UnpicklingError": lambda d: (d / "run_state.pkl").write_bytes(b"\x80\x04junk"),
    "run_state.pkl is missing": lambda d: (d / "run_state.pkl").unlink(),
    "trainer.pt is missing": lambda d: (d / "trainer.pt").unlink(),
}


@pytest.mark.parametrize("told", DAMAGES)
def test_resuming_a_damaged_checkpoint_is_refused_naming_the_file_and_the_older_one(
    tmp_path, tiny_checkpoint, capsys, told
):
    from forge.cli import main

    run = damaged_run(tmp_path / "run", tiny_checkpoint, DAMAGES[told])
    pointer = checkpoint_root(run) / "latest"
    for dry_run in (["--dry-run"], []):  # the run itself refuses it before Ray starts, as a dry run does
        assert main(["train", "smoke", f"model.path={tiny_checkpoint}", "--resume", str(run), *dry_run]) == 2
        error = capsys.readouterr().err
        assert f"{checkpoint_root(run) / 'step-000002' / told.split()[0]} {told.split(' ', 1)[1]}" in error
        assert f"echo step-000001 > {pointer}" in error
    (checkpoint_root(run) / "step-000001" / "trainer.pt").unlink()
    assert main(["train", "smoke", f"model.path={tiny_checkpoint}", "--resume", str(run), "--dry-run"]) == 2
    assert "kept no other checkpoint" in capsys.readouterr().err


def test_old_checkpoints_are_pruned_to_keep(tmp_path):
    for step in range(1, 5):
        write_checkpoint(tmp_path, step, fill(step), keep=2)
    kept = sorted(p.name for p in checkpoint_root(tmp_path).iterdir() if p.is_dir())
    assert kept == ["step-000003", "step-000004"]


def test_resuming_a_run_without_checkpoints_names_the_setting(tmp_path):
    with pytest.raises(CheckpointError, match="train.checkpoint_every"):
        latest_checkpoint(tmp_path)


def killed_run(run_dir, model_path: str, lora: bool = False):
    """What a run killed after its first checkpoint leaves: its config.yaml and a checkpoint."""
    from forge.config import load_config

    cfg = load_config("smoke", [f"model.path={model_path}", f"model.lora.enabled={str(lora).lower()}"])
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    write_checkpoint(run_dir, 1, fill(1), keep=2)
    return run_dir


def test_resuming_with_another_model_is_refused_before_anything_starts_naming_the_run_config(
    tmp_path, tiny_checkpoint, capsys
):
    from forge.cli import main

    run = killed_run(tmp_path / "run", str(tiny_checkpoint))
    written = (run / "config.yaml").read_text()
    # The smoke config's own model is the built-in tiny one, not the run's model.path.
    assert main(["train", "smoke", "--resume", str(run)]) == 2
    error = capsys.readouterr().err
    assert f"model.path={str(tiny_checkpoint)!r}" in error and "model.path=None" in error
    assert f"forge train {run / 'config.yaml'} --resume {run}" in error
    assert (run / "config.yaml").read_text() == written  # the run's record still names its model


def test_a_dry_run_of_resume_checks_the_folder_is_a_run_of_this_model(tmp_path, tiny_checkpoint, capsys):
    from forge.cli import main

    not_a_run = tmp_path / "notes"
    not_a_run.mkdir()
    assert main(["train", "smoke", "--resume", str(not_a_run), "--dry-run"]) == 2
    assert "has no checkpoint to resume from" in capsys.readouterr().err
    run = killed_run(tmp_path / "run", str(tiny_checkpoint))
    assert main(["train", "smoke", "--resume", str(run), "--dry-run"]) == 2
    assert "the checkpoint cannot load into another model" in capsys.readouterr().err
    assert main(["train", "smoke", f"model.path={tiny_checkpoint}", "--resume", str(run), "--dry-run"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["output_dir"] == str(run)
    # Without --resume, the run would refuse that folder: the dry run says so (and passes, as a
    # dry run after a run into the same folder is the usual order); --overwrite would take it.
    assert (
        main(["train", "smoke", f"model.path={tiny_checkpoint}", "--output-dir", str(run), "--dry-run"]) == 0
    )
    assert f"forge: note: without --dry-run the run would stop here: {run} already holds a run" in (
        capsys.readouterr().err
    )
    assert (
        main(
            [
                "train",
                "smoke",
                f"model.path={tiny_checkpoint}",
                "--output-dir",
                str(run),
                "--overwrite",
                "--dry-run",
            ]
        )
        == 0
    )
    assert "already holds a run" not in capsys.readouterr().err
    assert (run / "checkpoints").is_dir()  # a dry run of --overwrite removes nothing


def test_resuming_with_lora_switched_on_is_refused(tmp_path, tiny_checkpoint):
    from forge.config import load_config
    from forge.train.checkpoint import check_resumed_model

    run = killed_run(tmp_path / "run", str(tiny_checkpoint))
    cfg = load_config("smoke", [f"model.path={tiny_checkpoint}", "model.lora.enabled=true"])
    with pytest.raises(ConfigError, match=r"model.lora.enabled=False \(its config.yaml\)"):
        check_resumed_model(run, cfg.to_dict()["model"])


def test_resuming_with_the_same_model_spelled_otherwise_is_allowed(tmp_path, tiny_checkpoint, monkeypatch):
    from forge.config import load_config
    from forge.train.checkpoint import check_resumed_model

    run = killed_run(tmp_path / "run", str(tiny_checkpoint), lora=True)
    monkeypatch.chdir(tiny_checkpoint.parent)
    cfg = load_config("smoke", [f"model.path=./{tiny_checkpoint.name}", "model.lora.enabled=true",
                                "model.lora.alpha=32"])  # fmt: skip
    check_resumed_model(run, cfg.to_dict()["model"])  # alpha scales the adapters, their shapes stay


def test_rows_logged_after_the_checkpoint_are_dropped_including_a_cut_line(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"ste')
    drop_rows_after(log, 2)
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'


def samples(vocab: int, seed: int) -> list[Sample]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(4):
        tokens = torch.randint(8, vocab, (12 + i,), generator=generator).tolist()
        mask = [0] * 6 + [1] * (len(tokens) - 6)
        out.append(
            Sample(tokens, mask, [-1.0 * m for m in mask], [0] * len(tokens), advantage=float(i) - 1.5)
        )
    return out


@pytest.mark.parametrize(
    ("lora", "dtype"),
    [(False, "float32"), (True, "float32"), (False, "bfloat16")],
    ids=["full", "lora", "bfloat16 master weights"],
)
def test_a_restored_trainer_takes_the_same_next_step(tiny_checkpoint, tmp_path, lora, dtype):
    from forge.config import LoraConfig
    from forge.train.checkpoint import load_trainer, save_trainer
    from forge.train.master_weights import MASTER, MasterWeightAdamW
    from forge.train.trainer import Trainer

    vocab = 16
    train_cfg = TrainConfig(learning_rate=0.01, minibatches_per_step=2, warmup_steps=3)
    model_cfg = ModelConfig(path=str(tiny_checkpoint), lora=LoraConfig(enabled=lora), dtype=dtype)

    def make():
        return Trainer(tiny_checkpoint, model_cfg, train_cfg, TrainerConfig(packing="padded"), seed=3)

    original = make()
    original.train_step(samples(vocab, 0))
    save_trainer(original, tmp_path)
    saved = torch.load(tmp_path / "trainer.pt", weights_only=False)
    assert sorted(saved["trainable"]) == sorted(original.trainable)  # adapters only under LoRA
    assert len(saved["optimizer"]["state"]) == len(original.trainable)
    original.train_step(samples(vocab, 1))

    restored = make()
    load_trainer(restored, tmp_path)
    restored.train_step(samples(vocab, 1))
    assert restored.policy_version == original.policy_version == 2
    assert restored.scheduler.get_last_lr() == original.scheduler.get_last_lr()
    for name, param in original.trainable.items():
        assert torch.equal(param, restored.trainable[name]), name
    if dtype == "bfloat16":  # the float32 copies come back as they were, not rounded to bfloat16
        assert isinstance(restored.optimizer, MasterWeightAdamW)
        for name, param in original.trainable.items():
            kept, back = original.optimizer.state[param], restored.optimizer.state[restored.trainable[name]]
            assert back[MASTER].dtype == back["exp_avg"].dtype == torch.float32
            assert torch.equal(kept[MASTER], back[MASTER]) and torch.equal(
                param, kept[MASTER].to(param.dtype)
            )


def test_a_checkpoint_keyed_by_parameter_index_is_refused_with_the_reason(tiny_checkpoint, tmp_path):
    from forge.train.checkpoint import load_trainer, save_trainer
    from forge.train.trainer import Trainer

    trainer = Trainer(tiny_checkpoint, ModelConfig(path=str(tiny_checkpoint)), TrainConfig(), TrainerConfig())
    trainer.train_step(samples(16, 0))
    save_trainer(trainer, tmp_path)
    state = torch.load(tmp_path / "trainer.pt", weights_only=False)
    state["optimizer"] = trainer.optimizer.state_dict()  # the layout older versions wrote
    torch.save(state, tmp_path / "trainer.pt")
    with pytest.raises(ValueError, match="by parameter index"):
        load_trainer(trainer, tmp_path)


def test_a_resumed_trainer_takes_the_learning_rate_and_weight_decay_of_its_config(tiny_checkpoint, tmp_path):
    from forge.train.checkpoint import load_trainer, save_trainer
    from forge.train.trainer import Trainer

    def make(train_cfg: TrainConfig) -> Trainer:
        return Trainer(
            tiny_checkpoint, ModelConfig(path=str(tiny_checkpoint)), train_cfg, TrainerConfig(), seed=3
        )

    first = TrainConfig(learning_rate=0.01, max_steps=4, warmup_steps=2)
    original = make(first)
    original.train_step(samples(16, 0))
    save_trainer(original, tmp_path)

    changed = first.model_copy(update={"learning_rate": 0.002, "weight_decay": 0.1, "lr_schedule": "linear"})
    resumed = make(changed)
    load_trainer(resumed, tmp_path)
    # The second optimizer step: warmup's 2/2 of the new rate, as a run started with it would take.
    assert resumed.scheduler.get_last_lr() == pytest.approx([0.002])
    assert [group["lr"] for group in resumed.optimizer.param_groups] == pytest.approx([0.002])
    assert [group["weight_decay"] for group in resumed.optimizer.param_groups] == [0.1]
    assert resumed.train_step(samples(16, 1))["learning_rate"] == pytest.approx(0.002)


def test_checking_a_large_trainer_file_is_said_before_it_is_read(tmp_path, monkeypatch, capsys):
    import forge.train.checkpoint as checkpoint

    write_checkpoint(tmp_path, 1, fill(1))
    monkeypatch.setattr(checkpoint, "CHECK_SAID_BYTES", 1)  # as a multi-GB file would be
    check_checkpoint(latest_checkpoint(tmp_path))
    assert "trainer.pt (0.0 GiB) to check it is whole" in capsys.readouterr().err


def test_a_model_path_into_a_run_names_the_runs_final_model(tiny_checkpoint, tmp_path, capsys):
    import shutil

    from forge.cli import main

    run = tmp_path / "run"
    step = run / "checkpoints" / "step-000002"
    step.mkdir(parents=True)
    (step / "trainer.pt").write_bytes(b"")
    shutil.copytree(tiny_checkpoint, run / "final")
    assert (
        main(["train", "smoke", f"model.path={step}", "--dry-run", "--output-dir", str(tmp_path / "new")])
        == 2
    )
    assert f"whose trained model is {run / 'final'}: pass that" in capsys.readouterr().err
