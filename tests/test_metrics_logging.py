"""What a run writes per step: metrics every step, trajectory samples on the steps
`logging.trajectories_every` names."""

from __future__ import annotations

import json

from forge.metrics import MetricsLogger
from forge.models.loading import load_tokenizer
from forge.types import Trajectory, Turn


def episode(tokenizer, task_id: str) -> Trajectory:
    prompt = tokenizer.encode("guess a number")
    guess = tokenizer.encode(" 2")
    ids = prompt + guess
    return Trajectory(
        task_id=task_id,
        group_id=task_id,
        token_ids=ids,
        loss_mask=[0] * len(prompt) + [1] * len(guess),
        behaviour_logprobs=[0.0] * len(ids),
        policy_versions=[-1] * len(prompt) + [0] * len(guess),
        prompt_length=len(prompt),
        turns=[Turn(start=len(prompt), end=len(ids), obs_end=len(ids))],
    )


def test_trajectory_samples_are_saved_on_every_nth_step_only_and_metrics_on_every_step(
    tmp_path, tiny_checkpoint
):
    tokenizer = load_tokenizer(tiny_checkpoint)
    logger = MetricsLogger(tmp_path, tensorboard=False, trajectories_every=3)
    for step in range(1, 10):
        logger.record_step(
            step, {"reward": 1.0}, [episode(tokenizer, f"t{step}-{i}") for i in range(5)], tokenizer, 2
        )
    logger.close()
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    samples = [json.loads(line) for line in (tmp_path / "trajectories.jsonl").read_text().splitlines()]
    assert [row["step"] for row in metrics] == list(range(1, 10))
    assert [row["step"] for row in samples] == [3, 3, 6, 6, 9, 9]
    assert samples[0]["task_id"] == "t3-0" and samples[0]["turns"][0]["generated"].strip() == "2"


def test_trajectories_every_defaults_to_every_step_and_rejects_zero():
    import pytest
    from pydantic import ValidationError

    from forge.config import LoggingConfig

    assert LoggingConfig().trajectories_every == 1
    with pytest.raises(ValidationError, match="trajectories_every"):
        LoggingConfig(trajectories_every=0)
