"""bench.swarm when a run stops: it says which run and why, goes on with the others, writes
its result and exits 1 (it trained on nothing), never with a traceback."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import bench.swarm
from forge.failures import RunStopped

SOLVED = {"episodes": 8, "solved": 8, "success_rate": 1.0, "critical_steps_per_solved": 2.0,
          "total_steps_per_solved": 8.0, "subagents_per_episode": 6.0}  # fmt: skip


def fake_train(stops: set[str]):
    """forge.run.launch.train that writes two steps, then stops like a run with no learning
    signal when the arm is in `stops`, else ends with a final checkpoint."""

    def train(cfg, output_dir: Path, progress: bool = True, overwrite: bool = False):
        output_dir.mkdir(parents=True, exist_ok=True)
        rows = [{"step": step, "success_rate": 1.0, "turns_mean": 2.0} for step in (1, 2)]
        (output_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        if output_dir.name.split("-")[0] in stops:
            raise RunStopped("stopped at step 2: none of the run's 2 steps had learning signal (...)")
        return SimpleNamespace(checkpoint=output_dir / "final")

    return train


def run_bench(monkeypatch, tmp_path, stops: set[str]) -> tuple[int, dict]:
    monkeypatch.setattr("forge.run.launch.train", fake_train(stops))
    monkeypatch.setattr(bench.swarm, "evaluate", lambda *args: dict(SOLVED))
    output = tmp_path / "swarm.json"
    argv = ["bench.swarm", "--steps", "2", "--seeds", "0", "--sft-transcripts", "0", "--output", str(output),
            "--workdir", str(tmp_path / "runs")]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exited:
        bench.swarm.main()
    return exited.value.code, json.loads(output.read_text())


def test_a_run_that_trained_on_nothing_is_said_and_the_bench_exits_1_without_a_traceback(
    monkeypatch, tmp_path, capsys
):
    code, result = run_bench(monkeypatch, tmp_path, stops={"single"})
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert (
        "bench.swarm: single, seed 0: stopped at step 2: none of the run's 2 steps had learning signal" in err
    )
    single, swarm = result["runs"]
    assert single["stopped"].startswith("stopped at step 2") and single["eval"] is None
    assert swarm["stopped"] is None and swarm["eval"] == SOLVED  # the other arm still ran
    assert result["complete"] and result["stopped_runs"] == ["single, seed 0"]
    assert "critical_steps_reduction" not in result  # no comparison against a run without a final policy


def test_a_bench_whose_runs_all_finish_exits_0(monkeypatch, tmp_path):
    code, result = run_bench(monkeypatch, tmp_path, stops=set())
    assert code == 0 and result["stopped_runs"] == [] and result["critical_steps_reduction"] == 1.0
