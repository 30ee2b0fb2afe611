"""An env's own output in a run (logging.env_output) goes to a log file per rollout worker in
the run directory, not through Ray to the console; Forge's own lines still reach the console."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from forge.env.base import Env, StepResult

LINES_PER_CALL = 20
MARKER_FILE_KWARG = "marker"


class ChattyEnv(Env):
    """Prints LINES_PER_CALL lines in reset and in step (stdout and stderr), and runs a
    subprocess that prints one line to its inherited stdout."""

    def __init__(self, marker: str = "") -> None:
        self.marker = marker

    @classmethod
    def generate_tasks(cls, num_tasks, seed, **kwargs):
        return [{"task_id": str(i)} for i in range(num_tasks)]

    def reset(self, task, seed):
        for i in range(LINES_PER_CALL):
            print(f"{self.marker} reset line {i}")
        print(f"{self.marker} reset to stderr", file=sys.stderr)
        return "guess"

    def step(self, action):
        for i in range(LINES_PER_CALL):
            print(f"{self.marker} step line {i}")
        subprocess.run([sys.executable, "-c", f"print('{self.marker} from a subprocess')"], check=True)
        return StepResult("x", reward=float(len(action) % 2), done=True)


def _ray_logs_with(marker: str) -> list[Path]:
    """The files in this Ray session's log folder (worker-*.out/.err, which Ray forwards to
    the driver's console) that hold `marker`."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    return [p for p in logs.glob("worker-*") if p.is_file() and marker in p.read_text(errors="replace")]


def _train(tmp_path: Path, marker: str, *extra: str) -> Path:
    from forge.cli import main

    overrides = [
        f"env.name={__name__}:ChattyEnv",
        "env.kwargs=" + json.dumps({MARKER_FILE_KWARG: marker}),
        "env.num_tasks=4",
        "train.max_steps=1",
        "rollout.tasks_per_step=2",
        "rollout.group_size=2",
        "rollout.max_turns=1",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        *extra,
    ]
    run = tmp_path / "run"
    assert main(["train", "configs/smoke.yaml", *overrides, "--output-dir", str(run)]) == 0
    return run


@pytest.mark.slow
def test_a_runs_env_output_goes_to_a_log_file_per_worker_not_the_console(ray_session, tmp_path, capsys):
    marker = f"chatty-{uuid.uuid4().hex}"
    run = _train(tmp_path, marker)
    time.sleep(1.0)  # Ray's writes to a worker's log file are its own, and may lag the run's end
    console = capsys.readouterr()
    logs = sorted((run / "env-logs").glob("worker-*.log"))
    assert [p.name for p in logs] == ["worker-0.log", "worker-1.log"]
    text = "".join(p.read_text() for p in logs)
    episodes = 2 * 2
    assert text.count(f"{marker} reset line ") == episodes * LINES_PER_CALL
    assert text.count(f"{marker} step line ") == episodes * LINES_PER_CALL
    assert text.count(f"{marker} reset to stderr") == episodes
    assert text.count(f"{marker} from a subprocess") == episodes  # descriptor 1, not only sys.stdout
    # Not on the console: neither this process's nor Ray's worker logs, which it forwards.
    # (The one reset the driver plays before the run starts, forge.env.preflight, prints there.)
    printed = console.out + console.err
    assert printed.count(f"{marker} reset line ") == LINES_PER_CALL
    assert f"{marker} step line" not in printed and f"{marker} from a subprocess" not in printed
    assert _ray_logs_with(marker) == []
    assert (
        f"forge: env output (prints, subprocesses' stdout) goes to {run}/env-logs/worker-N.log" in console.err
    )


@pytest.mark.slow
def test_env_output_console_leaves_it_to_ray(ray_session, tmp_path, capsys):
    marker = f"chatty-{uuid.uuid4().hex}"
    # One worker: what is checked is where its env's lines go, alike for each worker.
    run = _train(tmp_path, marker, "logging.env_output=console", "rollout.num_workers=1")
    assert not (run / "env-logs").exists()
    assert "env-logs" not in capsys.readouterr().err
    # Ray's writes to a worker's log file are its own, and may lag the run's end.
    deadline = time.monotonic() + 10
    while not _ray_logs_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _ray_logs_with(marker)


def test_forges_own_lines_reach_the_real_stderr_while_env_output_goes_to_the_file(tmp_path):
    log = tmp_path / "worker-0.log"
    script = f"""
import subprocess, sys, threading
from pathlib import Path
from forge.env.output import console, send_env_output_to
from forge.failures import say
send_env_output_to(Path({str(log)!r}))
print("env print")
print("env stderr", file=sys.stderr)
thread = threading.Thread(target=lambda: print("env print in a thread"))
thread.start(); thread.join()
subprocess.run([sys.executable, "-c", "print('env subprocess')"], check=True)
say("forge: a run's message")
print("forge: a router's message", file=console(), flush=True)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert log.read_text().splitlines() == [
        "env print",
        "env stderr",
        "env print in a thread",
        "env subprocess",
    ]
    assert done.stdout == ""
    assert done.stderr.splitlines() == ["forge: a run's message", "forge: a router's message"]


def test_forge_code_that_runs_in_a_rollout_worker_writes_its_lines_to_the_console_stream():
    """A rollout worker's sys.stderr is the env log file once env output goes there, so a Forge
    line written to sys.stderr from code a worker runs (the engine pool's "engine lost",
    the stuck-env watch, the weight pushes) would land in that file, unseen; console() is the
    worker's real stderr (and sys.stderr anywhere else)."""
    root = Path(__file__).resolve().parents[1] / "forge"
    worker_side = [root / "rollout", root / "env", root / "sandbox"]
    writes = [
        f"{path.relative_to(root.parent)}:{number}"
        for folder in worker_side
        for path in sorted(folder.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "file=sys.stderr" in line
    ]
    assert writes == []
