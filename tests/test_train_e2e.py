"""A short end-to-end run through Ray: metrics, TensorBoard, checkpoint."""

from __future__ import annotations

import json
import math

import pytest

from forge.config import load_config


@pytest.mark.slow
def test_short_run_writes_finite_metrics_tensorboard_and_a_loadable_checkpoint(ray_session, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from forge.models.loading import load_tokenizer
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
    assert model.config.model_type == "llama"
    # Read as plain transformers reads it (pipelines, vLLM, SGLang), the saved tokenizer
    # tokenizes as Forge's loader does.
    text = "<|im_start|>user what is 3 plus 4 héllo<|im_end|>"
    auto, forge_reader = (
        AutoTokenizer.from_pretrained(str(result.checkpoint)),
        load_tokenizer(result.checkpoint),
    )
    assert auto(text)["input_ids"] == forge_reader(text)["input_ids"]


def save_gemma3_checkpoint(folder, window: int) -> None:
    """A tiny random-init Gemma3 text model (sliding / full layers, scaled and tied embeddings)
    with the smoke run's tokenizer, as a user's checkpoint folder."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from forge.models.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=window,
        layer_types=["sliding_attention", "full_attention"],
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    Gemma3ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.mark.slow
def test_forge_train_on_a_gemma3_checkpoint_with_a_short_sliding_window_trains_on_policy(
    ray_session, tmp_path, capsys
):
    """The CLI path on a family other than the tiny Llama: the engine keeps each episode's KV across turns
    (longer than the window), the tree trainer computes the logprobs it sampled with, and the
    synced weights (tied embeddings) are the ones the next step samples from."""
    from forge.cli import main

    window = 8
    save_gemma3_checkpoint(tmp_path / "gemma3", window)
    run = tmp_path / "run"
    overrides = [f"model.path={tmp_path / 'gemma3'}", "train.max_steps=3", "train.minibatches_per_step=1",
                 "rollout.num_workers=1", "train.max_steps_without_signal=0", "logging.progress_bar=false",
                 "logging.tensorboard=false"]  # fmt: skip
    assert main(["train", "smoke", *overrides, "--output-dir", str(run)]) == 0

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert all(row["tokens_total"] / row["episodes"] > 3 * window for row in rows)
    assert all(row["prefix_cache_hit_rate"] > 0.5 for row in rows)  # later turns reuse the KV
    trained = [row for row in rows if row["tokens_computed"]]
    # One minibatch a step: the trainer's logprobs are the engine's, step after step (the
    # later ones sample from synced weights), so every PPO ratio is 1.
    assert len(trained) >= 2 and trained[-1]["step"] > 1
    for row in trained:
        assert abs(row["importance_ratio_mean"] - 1) < 1e-5 and row["mismatch_kl"] < 1e-8, row
        assert row["clip_fraction"] == 0
        assert row["tree_token_ratio"] > 1

    capsys.readouterr()
    assert main(["eval", "smoke", "--checkpoint", str(run / "final"), "--episodes", "2", "--tasks", "2",
                 "--no-progress"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert report["episodes"] == 4 and report["episodes_error"] == 0
