"""Where a benchmark's result goes: one JSON file under bench/results/."""

from __future__ import annotations

import json
from pathlib import Path


def save_result(result: dict, path: Path) -> None:
    """Write `result` as indented JSON to `path`, making its folder if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def run_timing(records: list[dict]) -> dict[str, float]:
    """A run's pace from its metrics rows (sync or async): steps per minute, and how much of the
    wall time the trainer and the rollout workers sat idle. Step 1 includes actor start-up, so
    it counts toward the span but not the work."""
    later = records[1:]
    span = records[-1]["wall_seconds"] - records[0]["wall_seconds"]
    train_seconds = sum(r.get("train_seconds") or 0.0 for r in later)
    if "rollout_idle_fraction" in records[-1]:
        rollout_idle = records[-1]["rollout_idle_fraction"]  # measured per worker by the async loop
    else:  # sync: workers play only while the driver waits on the rollout
        rollout_idle = 1.0 - sum(r["rollout_seconds"] for r in later) / span
    return {
        "steps": len(records),
        "steps_per_minute": round(60.0 * len(later) / span, 3),
        "trainer_idle_fraction": round(max(0.0, 1.0 - train_seconds / span), 4),
        "rollout_idle_fraction": round(max(0.0, rollout_idle), 4),
    }
