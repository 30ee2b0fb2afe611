"""The straggler workload (configs/stragglers.yaml) trains in async mode under each pool
window: every env step delayed, every trained token counted within the staleness bound."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from forge.config import load_config

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "stragglers.yaml"


@pytest.mark.slow
@pytest.mark.parametrize("window", ["0.3", "fifo", "none"])
def test_a_few_async_steps_on_the_straggler_workload(ray_session, tmp_path, window):
    from forge.run.launch import train

    cfg = load_config(CONFIG, [
        "train.mode=async", f"async.window={window}", "train.max_steps=3", "rollout.tasks_per_step=4",
        "rollout.group_size=4", "logging.tensorboard=false", "logging.progress_bar=false",
    ])  # fmt: skip
    result = train(cfg, tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert result.steps == 3 and [r["policy_version"] for r in records] == [1.0, 2.0, 3.0]
    for record in records:
        assert record["episodes_lost"] == 0 and record["episodes_error"] == 0
        lags = {int(key.split("/")[1]): n for key, n in record.items() if key.startswith("staleness_tokens/")}
        assert set(lags) <= {0, 1}  # async.max_staleness is 1
        assert sum(lags.values()) == record["tokens_generated"]  # every trained token counted once
        assert record["tool_seconds_mean"] > 0.03  # env.latency delayed the steps (median 50 ms each)
