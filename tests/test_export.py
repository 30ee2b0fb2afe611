"""`forge export` writes a run's checkpoint as the model folder the run would end with (final/),
and `forge eval --trajectories` writes the episodes it plays."""

import json
import pickle
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from forge.cli import main
from forge.config import Config, LoraConfig, ModelConfig, TrainConfig, TrainerConfig
from forge.train.checkpoint import RUN_STATE_FILE, save_trainer, write_checkpoint
from forge.types import Sample

EVAL_CONFIG = "env: {name: guess_number, kwargs: {n: 4}}\nrollout: {max_turns: 2, max_new_tokens: 2}\n"


def samples(seed: int) -> list[Sample]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(4):
        tokens = torch.randint(8, 16, (12 + i,), generator=generator).tolist()
        mask = [0] * 6 + [1] * (len(tokens) - 6)
        out.append(
            Sample(tokens, mask, [-1.0 * m for m in mask], [0] * len(tokens), advantage=float(i) - 1.5)
        )
    return out


def stopped_run(run, model_cfg: ModelConfig, steps: int):
    """A run that checkpointed every step and stopped before writing final/: its trainer,
    and the model folder the trainer writes (as final/) after each step."""
    from forge.train.trainer import Trainer

    run.mkdir()
    cfg = Config(model=model_cfg)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    trainer = Trainer(
        model_cfg.path, model_cfg, TrainConfig(learning_rate=0.01), TrainerConfig(packing="padded")
    )
    models = {}
    for step in range(1, steps + 1):
        trainer.train_step(samples(step))

        def write(directory, step=step):
            save_trainer(trainer, directory)
            (directory / RUN_STATE_FILE).write_bytes(pickle.dumps({"step": step}))

        write_checkpoint(run, step, write, keep=0)
        models[step] = trainer.save(run.parent / f"trainer-model-{step}")
    return models


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_an_exported_checkpoint_is_the_model_the_trainer_held_at_that_step(
    tiny_checkpoint, tmp_path, capsys, lora
):
    model_cfg = ModelConfig(path=str(tiny_checkpoint), lora=LoraConfig(enabled=lora))
    run = tmp_path / "run"
    models = stopped_run(run, model_cfg, steps=2)
    out = tmp_path / "step-1-model"
    assert main(["export", str(run), "--step", "1", "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    exported, trained, later = weights(out), weights(Path(models[1])), weights(tmp_path / "trainer-model-2")
    initial = weights(tiny_checkpoint)
    assert sorted(exported) == sorted(trained) == sorted(initial)  # LoRA: merged, as final/ is
    assert any(not torch.equal(trained[name], initial[name]) for name in trained)  # it trained
    assert any(not torch.equal(later[name], trained[name]) for name in trained)  # step 2 differs
    for name, tensor in trained.items():
        assert torch.equal(exported[name], tensor), name

    # The latest checkpoint by default, into RUN/exports/step-NNNNNN; eval plays it.
    assert main(["export", str(run)]) == 0
    default = run / "exports" / "step-000002"
    assert all(torch.equal(weights(default)[n], t) for n, t in later.items())
    config = tmp_path / "eval.yaml"
    config.write_text(EVAL_CONFIG)
    capsys.readouterr()
    code = main(
        ["eval", str(config), "--checkpoint", str(out), "--episodes", "1", "--tasks", "1", "--no-progress"]
    )
    assert code == 0 and json.loads(capsys.readouterr().out)["episodes"] == 1


def test_exporting_into_a_folder_that_holds_files_is_refused(tiny_checkpoint, tmp_path, capsys):
    run = tmp_path / "run"
    stopped_run(run, ModelConfig(path=str(tiny_checkpoint)), steps=1)
    assert main(["export", str(run), "--out", str(tiny_checkpoint)]) == 2
    assert "already holds files" in capsys.readouterr().err


def test_exporting_a_step_the_run_did_not_keep_names_the_kept_ones(tiny_checkpoint, tmp_path, capsys):
    run = tmp_path / "run"
    stopped_run(run, ModelConfig(path=str(tiny_checkpoint)), steps=1)
    assert main(["export", str(run), "--step", "5"]) == 2
    assert "step-000005" in (err := capsys.readouterr().err) and "steps [1]" in err


def test_a_damaged_checkpoint_is_refused_before_export(tiny_checkpoint, tmp_path, capsys):
    run = tmp_path / "run"
    stopped_run(run, ModelConfig(path=str(tiny_checkpoint)), steps=1)
    trainer_file = run / "checkpoints" / "step-000001" / "trainer.pt"
    trainer_file.write_bytes(trainer_file.read_bytes()[:-100])
    assert main(["export", str(run)]) == 2
    assert f"{trainer_file} is damaged" in capsys.readouterr().err
    assert not (run / "exports").exists()


def test_eval_writes_every_episode_it_plays_as_training_rows(tiny_checkpoint, tmp_path, capsys):
    config = tmp_path / "eval.yaml"
    config.write_text(EVAL_CONFIG)
    rows_file = tmp_path / "episodes.jsonl"
    code = main(["eval", str(config), "--checkpoint", str(tiny_checkpoint), "--episodes", "2", "--tasks", "3",
                 "--trajectories", str(rows_file), "--no-progress"])  # fmt: skip
    assert code == 0
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert len(rows) == 6 and len({row["task_id"] for row in rows}) == 3
    for row in rows:
        assert set(row) >= {
            "step",
            "task_id",
            "prompt",
            "turns",
            "outcome",
            "reward",
            "success",
            "status",
            "error",
        }
        assert row["step"] is None and row["turns"] and row["turns"][0]["generated"]
        assert "guess" in row["prompt"].lower()


def test_eval_trajectories_into_a_missing_folder_is_refused_before_the_model_loads(tmp_path, capsys):
    code = main(
        ["eval", "smoke", "--checkpoint", str(tmp_path), "--trajectories", str(tmp_path / "no" / "x.jsonl")]
    )
    assert code == 2 and f"its folder {tmp_path / 'no'} does not exist" in capsys.readouterr().err
