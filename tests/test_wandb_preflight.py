"""logging.wandb_project without wandb installed is refused before anything starts: by
`forge train --dry-run` and by a run before Ray starts, not by the run's metrics logger once
Ray, the trainer and the rollout workers have loaded the model."""

from __future__ import annotations

import sys

import pytest

from forge.cli import main


@pytest.fixture
def no_wandb(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError


def test_a_dry_run_refuses_a_wandb_project_without_wandb(no_wandb, capsys, tmp_path):
    code = main(
        [
            "train",
            "configs/smoke.yaml",
            "logging.wandb_project=demo",
            "--output-dir",
            str(tmp_path / "r"),
            "--dry-run",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "logging.wandb_project" in err and "pip install wandb" in err
    assert "Traceback" not in err


def test_a_run_refuses_it_before_ray_starts(no_wandb, monkeypatch, tmp_path):
    import forge.run.launch as launch
    from forge.config import ConfigError, load_config

    started = []
    monkeypatch.setattr(launch, "train_sync", lambda *args, **kwargs: started.append(True))
    cfg = load_config("configs/smoke.yaml", ["logging.wandb_project=demo"])
    with pytest.raises(ConfigError, match="logging.wandb_project"):
        launch.train(cfg, tmp_path / "r")
    assert started == []
