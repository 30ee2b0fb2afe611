"""Every metric a run writes is explained in the README's metrics table."""

from __future__ import annotations

import re
from pathlib import Path

from forge.metrics import rollout_metrics
from forge.types import Trajectory, Turn

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def documented_metrics() -> set[str]:
    """The keys named in the first column of the README's `| key | what |` table."""
    table = README.split("| key | what |", 1)[1].split("\n\n", 1)[0]
    return {key for line in table.splitlines() for key in re.findall(r"`([^`]+)`", line.split(" | ")[0])}


def test_the_table_is_there_and_names_the_failure_counts():
    assert {"episodes_error", "episodes_truncated", "episodes_lost", "sync_seconds", "step_seconds"} <= (
        documented_metrics()
    )


def test_every_episode_metric_is_documented():
    solved = Trajectory("t", "g", [1, 2], [0, 1], [0.0, -0.1], [-1, 0], 1, turns=[Turn(1, 2, 2)],
                        success=True, info={"context_tokens": 4, "prefill_tokens": 1, "tool_calls": 1,
                        "tool_errors": 0})  # fmt: skip
    errored = Trajectory("t", "g", [], [], [], [], 0, status="error", error="KeyError: 'x'")
    keys = set(rollout_metrics([solved, errored]))
    assert {"tool_calls_mean", "tool_errors_mean"} <= keys
    assert keys - documented_metrics() == set()


def test_every_swarm_metric_is_documented():
    helper = Trajectory("t", "g", [1, 2], [0, 1], [0.0, 0.0], [-1, 0], 1, turns=[Turn(1, 2, 2)], success=True,
                        parent_turn=0, info={"tool_calls": 1, "tool_errors": 0})  # fmt: skip
    team = Trajectory("t", "g", [1, 2], [0, 1], [0.0, 0.0], [-1, 0], 1, turns=[Turn(1, 2, 2)], success=True,
                      subagents=[helper])  # fmt: skip
    keys = set(rollout_metrics([team], swarm=True))
    assert {
        "parallelism",
        "subagent_success_rate",
        "critical_steps_per_solved",
        "subagent_tool_calls_mean",
    } <= keys
    assert keys - documented_metrics() == set()


def test_every_pool_statistic_is_documented():
    from forge.pool import DataPool

    assert set(DataPool(2, 1).stats()) - documented_metrics() == set()
