"""Checkpoints publish atomically, and a trainer restored from one continues bit for bit."""

import pytest
import torch
import yaml

from forge.config import ConfigError, ModelConfig, TrainConfig, TrainerConfig
from forge.train.checkpoint import (
    CheckpointError,
    checkpoint_root,
    drop_rows_after,
    latest_checkpoint,
    write_checkpoint,
)
from forge.types import Sample


def fill(step: int):
    def write(directory):
        (directory / "trainer.pt").write_text(f"trainer {step}")
        (directory / "run_state.pkl").write_text(f"run {step}")

    return write


def test_latest_names_the_newest_complete_checkpoint(tmp_path):
    write_checkpoint(tmp_path, 1, fill(1))
    write_checkpoint(tmp_path, 2, fill(2))
    assert latest_checkpoint(tmp_path).name == "step-000002"
    assert (latest_checkpoint(tmp_path) / "trainer.pt").read_text() == "trainer 2"


def test_a_checkpoint_that_dies_while_writing_never_becomes_latest(tmp_path):
    write_checkpoint(tmp_path, 1, fill(1))

    def dies_halfway(directory):
        (directory / "trainer.pt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path, 2, dies_halfway)
    assert latest_checkpoint(tmp_path).name == "step-000001"
    assert not (checkpoint_root(tmp_path) / "step-000002").exists()


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


@pytest.mark.parametrize("lora", [False, True])
def test_a_restored_trainer_takes_the_same_next_step(tiny_checkpoint, tmp_path, lora):
    from forge.config import LoraConfig
    from forge.train.checkpoint import load_trainer, save_trainer
    from forge.train.trainer import Trainer

    vocab = 16
    train_cfg = TrainConfig(learning_rate=0.01, minibatches_per_step=2, warmup_steps=3)
    model_cfg = ModelConfig(path=str(tiny_checkpoint), lora=LoraConfig(enabled=lora))

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
