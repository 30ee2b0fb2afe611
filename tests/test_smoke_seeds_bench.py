"""bench.smoke_seeds reads seeds and a run's success curve the way the README reports them."""

from __future__ import annotations

import json

import pytest

from bench.smoke_seeds import seed_list, success_ends


def test_seed_lists_take_ranges_and_single_seeds():
    assert seed_list("0-3") == [0, 1, 2, 3]
    assert seed_list("0,3,5-6") == [0, 3, 5, 6]


def test_success_ends_averages_the_first_and_last_tenth_of_the_steps(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rates = [0.0] * 10 + [0.5] * 80 + [1.0] * 10
    rows = [{"step": i + 1, "success_rate": r} for i, r in enumerate(rates)] + [{"step": 100, "eval": 1}]
    metrics.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    assert success_ends(metrics) == (0.0, 1.0, 100)


def test_a_run_without_success_rates_is_an_error_not_a_zero(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 1}) + "\n")
    with pytest.raises(RuntimeError, match="holds no success_rate"):
        success_ends(metrics)


def test_byte_replies_counts_the_replies_spelled_in_byte_pieces_up_to_a_step(tmp_path):
    from bench.smoke_seeds import byte_replies
    from forge.models.tiny import build_tokenizer

    build_tokenizer().save_pretrained(tmp_path / "model")
    episodes = [
        {"step": 1, "turns": [{"generated": "2"}, {"generated": "Y"}]},  # a word, a byte piece
        {
            "step": 2,
            "turns": [{"generated": "\ufffd"}, {"generated": "guess"}],
        },  # a lone byte decodes to U+FFFD
        {"step": 3, "turns": [{"generated": "Q"}, {"generated": "Q"}]},  # past last_step: not counted
    ]
    trajectories = tmp_path / "trajectories.jsonl"
    trajectories.write_text("\n".join(json.dumps(e) for e in episodes) + "\n")
    assert byte_replies(trajectories, tmp_path / "model", last_step=2) == 0.5
    with pytest.raises(RuntimeError, match="no replies"):
        byte_replies(trajectories, tmp_path / "model", last_step=0)
