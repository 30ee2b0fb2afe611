"""A user's env module given as `module:Class` reaches the Ray workers without PYTHONPATH."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from forge.config import load_config

ENV_SOURCE = textwrap.dedent("""
    from forge.env import Env, StepResult


    class CountEnv(Env):
        blocking = False

        @classmethod
        def generate_tasks(cls, num_tasks, seed, **kwargs):
            return [{"task_id": str(i), "target": i % 4} for i in range(num_tasks)]

        def reset(self, task, seed):
            self.target = task["target"]
            return "guess a number from 0 to 3"

        def step(self, action):
            solved = action.strip() == str(self.target)
            return StepResult("correct" if solved else "try again", float(solved), solved)
""")


def test_an_env_module_outside_any_package_gets_its_folder_on_the_workers_path(tmp_path, monkeypatch):
    from forge.env.registry import env_import_root, worker_runtime_env

    (tmp_path / "count_env_a.py").write_text(ENV_SOURCE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    assert env_import_root("count_env_a:CountEnv") == str(tmp_path)
    assert worker_runtime_env("count_env_a:CountEnv") == {
        "env_vars": {"PYTHONPATH": f"{tmp_path}:/somewhere/else"}
    }
    assert worker_runtime_env("guess_number") is None  # registered: installed with its package
    sys.modules.pop("count_env_a", None)


def test_a_package_outside_site_packages_is_shipped_as_its_folder(tmp_path, monkeypatch):
    from forge.env.registry import env_import_root, env_module_path

    (tmp_path / "my_pkg_c").mkdir()
    (tmp_path / "my_pkg_c" / "__init__.py").write_text("")
    (tmp_path / "my_pkg_c" / "envs.py").write_text(ENV_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert env_module_path("my_pkg_c.envs:CountEnv") == str(tmp_path / "my_pkg_c")  # Ray's py_modules entry
    assert env_import_root("my_pkg_c.envs:CountEnv") == str(tmp_path)
    for name in ("my_pkg_c", "my_pkg_c.envs"):
        sys.modules.pop(name, None)


def test_a_non_env_target_is_refused_by_name():
    from forge.env.registry import env_import_root

    with pytest.raises(ValueError, match="not a forge.env.Env subclass"):
        env_import_root("json:JSONDecoder")


@pytest.mark.slow
def test_a_run_plays_an_env_from_a_module_in_a_temp_folder(ray_session, tmp_path, monkeypatch):
    from forge.run.launch import train

    folder = tmp_path / "my_envs"
    folder.mkdir()
    (folder / "count_env_b.py").write_text(ENV_SOURCE)
    monkeypatch.chdir(folder)  # found from the working directory, as `forge train` run there finds it
    cfg = load_config(
        str(_smoke()),
        [
            "env.name=count_env_b:CountEnv",
            "env.kwargs={}",
            "train.max_steps=2",
            "rollout.tasks_per_step=2",
            "rollout.group_size=2",
            "rollout.num_workers=1",  # each worker gets the folder alike: one shows it
            "train.max_steps_without_signal=0",  # a random model rarely solves it: not what this tests
        ],
    )
    train(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["episodes"] for r in rows] == [4.0, 4.0]
    assert all(r["episodes_error"] == 0.0 and r["episodes_lost"] == 0.0 for r in rows)
    sys.modules.pop("count_env_b", None)


def _smoke():
    from pathlib import Path

    return Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml"
