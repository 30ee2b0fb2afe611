"""`forge plot RUN_DIR`: PNG charts of a run's metrics.jsonl, one per quantity."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# file name -> (title, metric keys drawn on it)
CHARTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "reward": ("reward", ("reward_mean", "outcome_mean")),
    "success_rate": ("success rate", ("success_rate",)),
    "turns": ("turns per episode", ("turns_mean", "turns_per_solved")),
    "tree_token_ratio": ("tree token ratio (separate / computed tokens)", ("tree_token_ratio",)),
    "throughput": ("throughput", ("generated_tokens_per_second", "steps_per_minute")),
    # A forge sft run has no episodes: its loss is the curve that says whether it learned.
    "loss": ("loss", ("loss",)),
}


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; point forge plot at a run's output directory")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a killed run
    return add_throughput(rows)


def add_throughput(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Derived rates: generated tokens per rollout second, and steps per wall-clock minute."""
    previous_wall = None
    for row in rows:
        tokens, seconds = row.get("tokens_generated"), row.get("rollout_seconds")
        if tokens is not None and seconds:
            row["generated_tokens_per_second"] = tokens / seconds
        wall = row.get("wall_seconds")
        if wall is not None and previous_wall is not None and wall > previous_wall:
            row["steps_per_minute"] = 60.0 / (wall - previous_wall)
        previous_wall = wall
    return rows


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write one PNG per chart that has data; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (title, keys) in CHARTS.items():
        series = {}
        for key in keys:
            points = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
            if points:
                series[key] = points
        if not series:
            continue
        figure, axes = plt.subplots(figsize=(6, 3.5))
        for key, points in series.items():
            steps, values = zip(*points, strict=True)
            axes.plot(steps, values, marker="." if len(points) < 50 else None, label=key)
        axes.set_title(title)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        path = out / f"{name}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written
