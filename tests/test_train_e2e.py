"""A short end-to-end run through Ray: metrics, TensorBoard, checkpoint."""

from __future__ import annotations

import json
import math

import pytest

from forge.config import load_config


@pytest.mark.slow
def test_short_run_writes_finite_metrics_tensorboard_and_a_loadable_checkpoint(ray_session, tmp_path):
    from transformers import AutoModelForCausalLM

    from forge.run.launch import train

    cfg = load_config(
        "configs/smoke.yaml",
        ["train.max_steps=3", "rollout.tasks_per_step=2", "rollout.group_size=4", "rollout.num_workers=2"],
    )
    result = train(cfg, tmp_path / "run", progress=False)

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    required = [
        "reward_mean",
        "success_rate",
        "turns_mean",
        "tokens_generated",
        "rollout_seconds",
        "train_seconds",
        "policy_version",
    ]
    for row in rows:
        # A step whose groups all scored alike computes no token (train.skip_zero_advantage).
        for key in required + (["tree_token_ratio"] if row["tokens_computed"] else []):
            assert isinstance(row[key], float) and math.isfinite(row[key]), (key, row[key])
    assert any(row["tokens_computed"] for row in rows)
    assert [row["policy_version"] for row in rows] == [1.0, 2.0, 3.0]
    from test_metrics_doc import documented_metrics

    for row in rows:  # the README's metrics table explains every key a run writes
        assert set(row) - documented_metrics() == set()
        assert 0 < row["step_seconds"] <= row["wall_seconds"]  # each step's own wall time
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "run" / "trajectories.jsonl").read_text().strip()
    model = AutoModelForCausalLM.from_pretrained(str(result.checkpoint))
    assert model.config.model_type == "qwen2"
