"""A run killed with SIGKILL and resumed ends where an uninterrupted run ends."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

CONFIG = {
    "seed": 7,
    "model": {
        "tiny": {
            "hidden_size": 32,
            "num_layers": 1,
            "num_heads": 2,
            "num_kv_heads": 1,
            "intermediate_size": 64,
        }
    },
    "env": {"name": "guess_number", "kwargs": {"n": 4}},
    # 4 groups of 8: with 2 of 4 the random model's steps 3-4 could all score alike (no learning
    # signal, nothing to compare after the kill), as with the tiny model's embeddings of session 16.
    "rollout": {"num_workers": 1, "tasks_per_step": 4, "group_size": 8, "max_turns": 4, "max_new_tokens": 1},
    "train": {
        "max_steps": 4,
        "learning_rate": 0.01,
        "loss": "ppo_clip",
        "minibatches_per_step": 2,
        "checkpoint_every": 1,
        "keep_checkpoints": 0,
    },
    "trainer": {"packing": "padded"},
    "logging": {"progress_bar": False, "tensorboard": False},
}


def forge_train(*args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen(
        [sys.executable, "-m", "forge.cli", "train", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def finish(process: subprocess.Popen) -> None:
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr.decode()[-3000:]


def trainable(run_dir, step: int) -> dict[str, torch.Tensor]:
    path = run_dir / "checkpoints" / f"step-{step:06d}" / "trainer.pt"
    return torch.load(path, weights_only=False)["trainable"]


@pytest.mark.slow
def test_a_run_killed_mid_training_and_resumed_matches_an_uninterrupted_run(ray_session, tmp_path, capsys):
    from forge.cli import main

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    # Side by side: most of a run's time is process, Ray and actor start-up, which overlaps on
    # 2 cores, and each run is seeded, so running beside another changes none of its numbers.
    uninterrupted = forge_train(str(config), "--output-dir", str(whole))
    try:
        victim = forge_train(str(config), "--output-dir", str(killed))
        latest = killed / "checkpoints" / "latest"
        deadline = time.monotonic() + 600
        while not (latest.is_file() and latest.read_text().strip() >= "step-000002"):
            assert victim.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
        assert not (killed / "summary.json").exists()

        # The resume runs in this process, on the tests' Ray (no Ray of its own to start); the
        # run is seeded, so which Ray it uses changes none of its numbers.
        assert main(["train", str(config), "--resume", str(killed)]) == 0, capsys.readouterr().err[-3000:]
        finish(uninterrupted)
    finally:
        if uninterrupted.poll() is None:  # the test failed before it ended
            os.killpg(uninterrupted.pid, signal.SIGKILL)
    resumed_at = int(latest.read_text().strip().split("-")[1])
    assert resumed_at == 4
    expected, got = trainable(whole, 4), trainable(killed, 4)
    before = trainable(whole, 2)
    assert any(not torch.equal(before[name], expected[name]) for name in expected), (
        "no learning after the kill"
    )
    for name, tensor in expected.items():
        assert torch.equal(tensor, got[name]), name


def test_resuming_a_directory_without_checkpoints_fails_with_the_fix(tmp_path, capsys):
    from forge.cli import main

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    assert main(["train", str(config), "--resume", str(tmp_path / "never_ran")]) == 2
    assert "train.checkpoint_every" in capsys.readouterr().err


@pytest.mark.slow
def test_a_run_resumes_with_another_number_of_workers_and_learning_rate(ray_session, tmp_path, capsys):
    # `forge train` in this process, on the tests' Ray: what is checked is what a resume does
    # with the changed settings, not a killed process (the test above), so the runs skip the
    # start of a Ray of their own.
    from forge.cli import main

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "train": {**CONFIG["train"], "max_steps": 2}}))
    run_dir = tmp_path / "run"
    assert main(["train", str(config), "--output-dir", str(run_dir)]) == 0, capsys.readouterr().err[-3000:]
    capsys.readouterr()
    resumed = main([
        "train", str(config), "--resume", str(run_dir),
        "rollout.num_workers=2", "train.max_steps=3", "train.learning_rate=0.005",
    ])  # fmt: skip
    stderr = capsys.readouterr().err
    assert resumed == 0, stderr[-3000:]
    assert "rollout.num_workers=1 and this run has 2" in stderr
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert rows[-1]["learning_rate"] == 0.005
