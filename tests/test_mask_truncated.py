"""train.mask_truncated (TRL's mask_truncated_completions, DAPO's overlong filtering): an
episode with a reply cut at its token limit is left out of the loss, its reward still counted
in its group; a run whose every episode is left out stops saying so, never trains on nothing."""

from __future__ import annotations

import json

import pytest

from forge.config import load_config
from forge.failures import RunStopped, SignalWatch, cut_fix
from forge.reward.shaping import RewardShaper
from forge.run.context import shape_rewards, to_samples
from forge.types import Trajectory, Turn


def episode(group: str, outcome: float, cut: bool) -> Trajectory:
    """Two turns; the second reply cut at its limit when `cut`."""
    return Trajectory(
        "t", group, [1, 2, 3, 4, 5], [0, 1, 0, 1, 1], [0.0, -1.0, 0.0, -1.0, -1.0], [-1, 0, -1, 0, 0], 1,
        turns=[Turn(1, 2, 3), Turn(3, 5, 5, truncated=cut)], outcome=outcome, success=outcome > 0,
    )  # fmt: skip


def shaped(overrides: list[str], batch: list[Trajectory]):
    cfg = load_config("configs/smoke.yaml", overrides)
    metrics, advantages = shape_rewards(RewardShaper(cfg.reward), batch, cfg)
    return cfg, metrics, advantages


def test_an_episode_with_a_cut_reply_is_left_out_of_the_loss_but_counts_in_its_group():
    batch = [episode("a", 1.0, cut=False), episode("a", 0.0, cut=True), episode("a", 0.0, cut=False)]
    cfg, metrics, advantages = shaped(["train.mask_truncated=true"], batch)
    kept = to_samples(batch, advantages, cfg)
    assert [s.advantage for s in kept] == [advantages[0], advantages[2]]  # the cut one is not trained
    off_cfg, _, off_advantages = shaped([], batch)
    assert advantages == off_advantages  # its failure still lowers the group's mean
    assert len(to_samples(batch, off_advantages, off_cfg)) == 3
    assert metrics["signal_fraction"] == pytest.approx(1.0)  # of the two it trains, both have signal
    assert [t.reply_cut for t in batch] == [False, True, False]


def test_a_step_whose_only_signal_is_in_cut_episodes_has_none():
    batch = [episode("a", 1.0, cut=True), episode("a", 0.0, cut=True), episode("b", 0.0, cut=False)]
    assert shaped(["train.mask_truncated=true"], batch)[1]["signal_fraction"] == 0.0
    assert shaped([], batch)[1]["signal_fraction"] == pytest.approx(2 / 3)


def test_dynamic_sampling_counts_a_group_whose_signal_is_all_in_cut_episodes_as_without_signal():
    from forge.run.rounds import groups_with_signal

    batch = [episode("a", 1.0, cut=True), episode("a", 0.0, cut=True), episode("b", 1.0, cut=False),
             episode("b", 0.0, cut=False)]  # fmt: skip
    _, _, advantages = shaped([], batch)
    assert groups_with_signal(batch, advantages, load_config("configs/smoke.yaml")) == ["a", "b"]
    masking = load_config("configs/smoke.yaml", ["train.mask_truncated=true"])
    assert groups_with_signal(batch, advantages, masking) == ["b"]


def test_a_run_whose_every_episode_was_cut_is_told_to_raise_the_limit_not_to_check_the_env(capsys):
    watch = SignalWatch(max_steps=2, fix="Check the env", cut_fix=cut_fix(True, 1))
    step = {
        "signal_fraction": 0.0,
        "episodes": 8,
        "episodes_reply_cut": 8,
        "reward_mean": 0.5,
        "success_rate": 0.5,
    }
    watch.observe(1, step)
    said = capsys.readouterr().err
    assert said.startswith(
        "forge: step 1 trains nothing: Every episode had a reply cut at rollout.max_new_tokens=1"
    )
    assert "set train.mask_truncated=false" in said and "Check the env" not in said
    with pytest.raises(RunStopped) as stop:
        watch.observe(2, step)
    assert "(train.mask_truncated left out every episode: each had a reply cut)" in str(stop.value)
    assert str(stop.value).endswith("raise the limit, or set train.mask_truncated=false")
    # Some episodes not cut: their groups scored alike, as any run without signal.
    alike = SignalWatch(max_steps=2, fix="Check the env", cut_fix=cut_fix(True, 1))
    alike.observe(1, {**step, "episodes_reply_cut": 7})
    assert "Check the env" in capsys.readouterr().err
    assert cut_fix(False, 1) == "" and "the max_tokens its agent asked for" in cut_fix(True, 64, agents=True)


@pytest.mark.slow
def test_a_smoke_run_masking_its_one_token_replies_stops_with_exit_code_1(ray_session, tmp_path, capsys):
    """The smoke run's replies are one token, cut at rollout.max_new_tokens=1: every episode."""
    from forge.cli import main

    overrides = ["train.mask_truncated=true", "train.max_steps=3", "train.max_steps_without_signal=2",
                 "rollout.tasks_per_step=2", "rollout.group_size=4", "logging.progress_bar=false"]  # fmt: skip
    assert main(["train", "configs/smoke.yaml", *overrides, "--output-dir", str(tmp_path / "run")]) == 1
    error = capsys.readouterr().err
    assert "forge: step 1 trains nothing: Every episode had a reply cut at rollout.max_new_tokens=1" in error
    assert (
        "forge: stopped at step 2: none of the run's 2 steps had learning signal (train.mask_truncated"
        in error
    )
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["episodes_reply_cut"], r["trained_samples"]) for r in rows] == [
        (1, 8.0, 0.0),
        (2, 8.0, 0.0),
    ]
