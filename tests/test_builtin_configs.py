"""Built-in configs are named, not pathed: `forge train smoke` from any folder; a YAML path
still works; `forge configs` lists them; configs/ is their one source."""

from __future__ import annotations

from pathlib import Path

import pytest

from forge.builtin_configs import builtin_configs, configs_dir
from forge.cli import main
from forge.config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent


def test_the_builtin_configs_are_the_repository_configs_folder():
    assert configs_dir() == REPO / "configs"
    assert builtin_configs() == {path.stem: path for path in sorted((REPO / "configs").glob("*.yaml"))}
    assert {"smoke", "gateway-smoke", "qwen3-0.6b-lora", "qwen3-8b-multinode"} <= set(builtin_configs())


@pytest.mark.parametrize("name", ["smoke", "gateway-smoke", "qwen3-0.6b-lora", "qwen3-8b-multinode"])
def test_a_builtin_config_loads_by_name_from_any_folder(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config(name, ["seed=3"]) == load_config(REPO / "configs" / f"{name}.yaml", ["seed=3"])


def test_a_yaml_path_still_works_and_a_file_wins_over_a_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("train: {max_steps: 7}\n")
    assert load_config(tmp_path / "mine.yaml").train.max_steps == 7
    (tmp_path / "smoke").write_text("train: {max_steps: 5}\n")  # a file of that name is taken as given
    assert load_config("smoke").train.max_steps == 5


def test_a_repository_path_outside_the_repository_names_the_builtin(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "configs/smoke.yaml", "--dry-run"]) == 2
    error = capsys.readouterr().err
    assert "configs/smoke.yaml does not exist here; to use the built-in one, name it: smoke" in error


def test_an_unknown_name_lists_the_builtins():
    with pytest.raises(
        ConfigError, match=r"'smok' is neither a YAML file nor a built-in config name .*smoke"
    ):
        load_config("smok")


def test_train_accepts_a_name_on_the_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "smoke", "train.max_steps=3", "--dry-run"]) == 0
    assert "max_steps: 3" in capsys.readouterr().out


def test_forge_configs_lists_every_builtin_with_its_summary(capsys):
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    for name, path in builtin_configs().items():
        summary = path.read_text().splitlines()[0].lstrip("# ")
        assert f"{name}  " in out and summary in out


def test_forge_version_prints_the_package_version(capsys):
    from forge import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"forge {__version__}\n"
