"""A held-out evaluation during training (TRL's eval_steps, verl's test_freq): every
eval.every_steps steps of a sync or async run, and at the last, the policy just published
plays the eval.tasks file on the rollout workers, and that step's metrics row holds eval/*."""

from __future__ import annotations

import json
from typing import Any

import pytest

from forge.config import ConfigError, load_config
from forge.run.held_out import evaluation_due


def write_held_out(path, rows=3):
    path.write_text(
        "".join(json.dumps({"task_id": f"h{i}", "secret": i % 4, "n": 4}) + "\n" for i in range(rows))
    )
    return str(path)


def test_evaluation_is_due_every_n_steps_and_at_the_last():
    assert [step for step in range(1, 8) if evaluation_due(step, 3, 7)] == [3, 6, 7]
    assert not any(evaluation_due(step, 0, 7) for step in range(1, 8))


def test_held_out_tasks_with_no_worker_up_to_play_them_are_counted_lost():
    """An async run whose workers are all down (or waiting for their sync) at an eval step."""
    from types import SimpleNamespace

    from forge.run.held_out import held_out_metrics

    tasks = [{"task_id": f"h{i}"} for i in range(3)]
    metrics = held_out_metrics(SimpleNamespace(workers=["w0", "w1"]), tasks, 2, workers=[])
    assert metrics["eval/episodes_lost"] == 6 and "eval/success_rate" not in metrics


def test_every_steps_without_a_task_file_is_refused():
    with pytest.raises(ConfigError, match="eval.every_steps needs eval.tasks"):
        load_config(None, ["eval.every_steps=5"])


def test_every_steps_in_a_gateway_run_is_refused(tmp_path):
    tasks = write_held_out(tmp_path / "held.jsonl")
    with pytest.raises(ConfigError, match="forge eval"):
        load_config(None, ["eval.every_steps=5", f"eval.tasks={tasks}", "gateway.enabled=true"])
    load_config(None, ["eval.every_steps=5", f"eval.tasks={tasks}", "train.mode=async"])  # async evaluates


def test_a_missing_held_out_file_stops_the_dry_run(tmp_path, capsys):
    from forge.cli import main

    missing = tmp_path / "nope.jsonl"
    code = main(
        [
            "train",
            "configs/smoke.yaml",
            "eval.every_steps=2",
            f"eval.tasks={missing}",
            "--output-dir",
            str(tmp_path / "r"),
            "--dry-run",
        ]  # fmt: skip
    )
    assert code == 2 and "eval.tasks=" in capsys.readouterr().err


def held_out_run(tmp_path, held_out_rows: int, overrides: list[str]) -> tuple[Any, list[dict]]:
    """A smoke run of one worker (2 groups of 4 a step) evaluating every 2 steps, 2 episodes
    of each held-out task; its config and metrics rows."""
    from forge.run.launch import train

    tasks = write_held_out(tmp_path / "held.jsonl", rows=held_out_rows)
    cfg = load_config(
        "configs/smoke.yaml",
        [
            "rollout.num_workers=1",
            "rollout.tasks_per_step=2",
            "rollout.group_size=4",
            "train.minibatches_per_step=1",
            "train.max_steps_without_signal=0",
            "logging.progress_bar=false",
            "eval.every_steps=2",
            f"eval.tasks={tasks}",
            "eval.episodes=2",
            *overrides,
        ],  # fmt: skip
    )
    train(cfg, tmp_path / "run", progress=False)
    return cfg, [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_sync_run_evaluates_the_held_out_tasks_every_n_steps(ray_session, tmp_path):
    _, rows = held_out_run(tmp_path, 5, ["train.max_steps=3", "eval.num_tasks=3"])
    evaluated = [row["step"] for row in rows if "eval/success_rate" in row]
    assert evaluated == [2, 3]  # every 2 steps, and at the last
    for row in rows:
        if row["step"] in evaluated:
            assert row["eval/episodes"] == 6  # 3 of the file's 5 rows x 2 episodes, none of them trained on
            assert row["eval/episodes_error"] == 0
            assert row["episodes"] == 8 and row["trained_samples"] <= 8
            assert 0 <= row["eval/success_rate"] <= 1 and 1 <= row["eval/turns_mean"] <= 3
            assert row["eval/policy_version"] == row["step"] and row["eval/policy_version_spread"] == 0


@pytest.mark.slow
def test_an_async_run_evaluates_with_the_weights_just_published_beside_its_training_groups(
    ray_session, tmp_path
):
    """Every eval token was sampled by the step's own version, though the worker plays its
    training groups at the same time, and the run trains every step within the staleness bound."""
    cfg, rows = held_out_run(tmp_path, 4, ["train.mode=async", "train.max_steps=5"])
    assert [row["policy_version"] for row in rows] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert [row["step"] for row in rows if "eval/success_rate" in row] == [2, 4, 5]
    for row in rows:
        if "eval/success_rate" in row:
            assert row["eval/episodes"] == 8 and row["eval/episodes_error"] == row["eval/episodes_lost"] == 0
            assert row["eval/policy_version"] == row["step"] and row["eval/policy_version_spread"] == 0
            assert row["eval/seconds"] > 0
    assert max(row["staleness_max"] for row in rows) <= cfg.async_.max_staleness  # the bound held
