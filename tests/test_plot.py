"""`forge plot` draws a PNG per quantity from metrics.jsonl."""

import json

import pytest

from forge.plot import add_throughput, plot_run


def write_metrics(run_dir, rows):
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_every_chart_with_data_is_written_as_png(tmp_path):
    write_metrics(
        tmp_path,
        [
            {
                "step": s,
                "reward_mean": 0.1 * s,
                "success_rate": 0.1 * s,
                "turns_mean": 3.0,
                "tree_token_ratio": 1.5,
                "tokens_generated": 80.0,
                "rollout_seconds": 2.0,
                "wall_seconds": 3.0 * s,
            }
            for s in range(1, 6)
        ],
    )
    written = plot_run(tmp_path)
    assert sorted(p.name for p in written) == [
        "reward.png",
        "success_rate.png",
        "throughput.png",
        "tree_token_ratio.png",
        "turns.png",
    ]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_charts_without_data_are_skipped(tmp_path):
    write_metrics(tmp_path, [{"step": 1, "success_rate": 0.5}, {"step": 2, "success_rate": None}])
    assert [p.name for p in plot_run(tmp_path)] == ["success_rate.png"]


def test_throughput_is_generated_tokens_per_rollout_second_and_steps_per_minute():
    rows = add_throughput(
        [
            {"step": 1, "tokens_generated": 100.0, "rollout_seconds": 4.0, "wall_seconds": 10.0},
            {"step": 2, "tokens_generated": 50.0, "rollout_seconds": 5.0, "wall_seconds": 40.0},
        ]
    )
    assert rows[0]["generated_tokens_per_second"] == 25.0
    assert "steps_per_minute" not in rows[0]
    assert rows[1]["steps_per_minute"] == 2.0


def test_a_folder_without_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="forge plot"):
        plot_run(tmp_path)


def test_an_sft_run_gets_its_loss_curve(tmp_path):
    """A `forge sft` run's rows: loss and timings, no episodes."""
    write_metrics(tmp_path, [{"step": s, "loss": 3.0 / s, "train_seconds": 0.1, "wall_seconds": 0.2 * s}
                             for s in range(1, 5)])  # fmt: skip
    assert sorted(p.name for p in plot_run(tmp_path)) == ["loss.png", "throughput.png"]
