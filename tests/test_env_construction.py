"""Building an env is bounded like any env call: a constructor that hangs (in Python, in a
C call that releases the GIL or in one that holds it) or raises cannot hang a rollout
worker, the gateway, `forge env check` or `forge train --dry-run`; its episodes are
recorded as errors naming the user's own line, and the harness goes on."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import slow_init_envs
from env_fault_kit import LoopTicker, episode_store, marked_line, rollout_worker

from forge.env import calls
from forge.env.errors import error_headline
from forge.rollout.stuck import stuck_report

ENV = "slow_init_envs:SlowInitEnv"  # tests/ is on the path, as a user's folder would be
INLINE_ENV = "slow_init_envs:InlineSlowInitEnv"
ROOT = Path(__file__).resolve().parent.parent


STUCK = {
    "sleep": marked_line(slow_init_envs, "stuck here: one C call, the GIL released"),
    "regex": marked_line(slow_init_envs, "stuck here: one C call, the GIL held"),
    "spin": marked_line(slow_init_envs, "stuck here: a Python loop"),
}


@pytest.fixture(autouse=True)
def fresh_inline_classes(monkeypatch):
    """Each test sees blocking = False classes run inline, as a fresh process would."""
    monkeypatch.setattr(calls, "_SLOW_INLINE", set())


@pytest.mark.parametrize(("env", "hang"), [(ENV, "sleep"), (ENV, "spin"), (INLINE_ENV, "spin")])
def test_a_worker_records_a_constructor_past_the_limit_as_errors_and_plays_on(tiny_checkpoint, env, hang):
    worker = rollout_worker(tiny_checkpoint, env, {"hang": hang}, step_timeout_s=0.5)
    started = time.monotonic()
    trajectories = asyncio.run(worker.rollout([{"task_id": "a"}, {"task_id": "b"}], 3))
    # The groups build at the same time, and a group stops building at its first failure:
    # one time limit in all, not one per env.
    assert time.monotonic() - started < 4
    assert [t.status for t in trajectories] == ["error"] * 6
    assert all(t.token_ids == [] for t in trajectories)
    name = env.split(":")[1]
    # Inline, the first group's build holds the loop until the watchdog ends it; from then on
    # the class builds in threads, so the second group's does not add a second stall.
    wheres = (
        {"; built inline: InlineSlowInitEnv sets blocking = False",
         "; built in a thread: a call of InlineSlowInitEnv (blocking = False) ran past its limit inline"}
        if env == INLINE_ENV else {""}
    )  # fmt: skip
    assert {error_headline(t.error) for t in trajectories} == {
        f"EnvTimeout: building {name} took longer than 0.5s (env.step_timeout_s){where} (at {STUCK[hang]} in __init__)"
        for where in wheres
    }
    worker.env_kwargs = {}  # the same worker plays on
    assert [t.status for t in asyncio.run(worker.rollout([{"task_id": "a"}], 2))] == ["ok", "ok"]


def test_a_constructor_that_raises_fails_its_group_with_the_users_own_line(tiny_checkpoint):
    worker = rollout_worker(tiny_checkpoint, ENV, {"hang": "raise"}, step_timeout_s=5.0)
    trajectories = asyncio.run(worker.rollout([{"task_id": "a"}], 2))
    assert [t.status for t in trajectories] == ["error", "error"]
    assert error_headline(trajectories[0].error) == (
        f"ValueError: no board of that size (at {marked_line(slow_init_envs, 'raised here: the user')} in __init__)"
    )


def _guarded_build(tmp_path: Path, env: str, hang: str) -> subprocess.CompletedProcess:
    """Build `env` with `build_env` on an event loop guarded by a LoopGuard (as a rollout
    worker's is while it builds) in a fresh process."""
    module, name = env.split(":")
    script = textwrap.dedent(f"""
        import asyncio
        from forge.env.calls import build_env
        from forge.rollout.stuck import LoopGuard
        from {module} import {name}

        async def main():
            guard = LoopGuard({str(tmp_path)!r}, "rollout_0", 1.0)
            guard.start()
            await build_env({name}, {{"hang": {hang!r}}}, timeout_s=0.2)
            guard.stop()

        asyncio.run(main())
    """)
    return subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT / "tests", capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(("env", "on_loop"), [(ENV, False), (INLINE_ENV, True)])
def test_a_constructor_holding_the_gil_ends_the_worker_with_a_report_of_its_line(tmp_path, env, on_loop):
    """In a thread or inline, C code that holds the GIL stops the loop: the armed guard
    ends the process (Ray restarts a run's worker), naming the constructor's line."""
    done = _guarded_build(tmp_path, env, "regex")
    assert done.returncode == 1, done.stderr
    stuck = stuck_report(tmp_path, "rollout_0", set())
    assert stuck.where == f"{STUCK['regex']} in __init__" and stuck.on_loop is on_loop


def test_the_gateway_answers_a_hung_constructor_with_a_504_while_its_loop_serves_on():
    from forge.gateway.episodes import EpisodeError

    store, finished = episode_store(lambda: slow_init_envs.SlowInitEnv(hang="sleep"), env_name="SlowInitEnv")

    async def start() -> tuple[EpisodeError, float, int]:
        ticker = LoopTicker().start()  # the loop serves every agent: it must go on meanwhile
        started = time.monotonic()
        with pytest.raises(EpisodeError) as failed:
            await store.start({"task_id": "a"}, seed=0)
        ticker.stop()
        return failed.value, time.monotonic() - started, ticker.ticks

    error, seconds, ticks = asyncio.run(start())
    assert seconds < 3 and ticks >= 3
    assert error.status == 504 and error.episode_id is not None
    assert error.message == (
        f"episode {error.episode_id!r} could not start: EnvTimeout: building SlowInitEnv took longer than "
        f"0.3s (env.step_timeout_s) (at {STUCK['sleep']} in __init__)"
    )
    # The episode is ended as an error and recorded, like one whose step failed.
    assert [(e.episode_id, e.status) for e in finished] == [(error.episode_id, "error")]
    assert store.get(error.episode_id).to_trajectory(0.5).status == "error"


def test_the_gateway_answers_a_constructor_that_raises_with_a_500_naming_the_users_line(tiny_checkpoint):
    from fastapi.testclient import TestClient

    from forge.gateway import Gateway
    from forge.gateway.server import build_app
    from forge.models.loading import load_tokenizer

    store, finished = episode_store(lambda: slow_init_envs.SlowInitEnv(hang="raise"))
    gateway = Gateway(None, load_tokenizer(tiny_checkpoint), store, 4, 64)
    with TestClient(build_app(gateway)) as client:
        reply = client.post("/forge/episodes", json={"task": {"task_id": "a"}})
    assert reply.status_code == 500
    message = reply.json()["error"]["message"]
    assert message.endswith(
        f"could not start: ValueError: no board of that size (at {marked_line(slow_init_envs, 'raised here: the user')} in __init__)"
    )
    assert [e.status for e in finished] == ["error"]


def test_a_gateway_run_counts_episodes_whose_env_could_not_be_built_as_errors(tiny_checkpoint):
    """The training loop starts a step's episodes together and takes an unbuilt one's
    error episode like any other (no agent runs for it)."""
    from forge.gateway import Gateway, GatewayServer
    from forge.models.loading import load_tokenizer
    from forge.run.gateway import _start_all

    calls = itertools.count()  # the second construction to begin hangs (they run at the same time)

    def factory():
        return slow_init_envs.SlowInitEnv(hang="sleep" if next(calls) == 1 else "")

    store, _ = episode_store(factory, env_name="SlowInitEnv")
    gateway = Gateway(None, load_tokenizer(tiny_checkpoint), store, 4, 64)
    with GatewayServer(gateway) as server:
        started = time.monotonic()
        episode_ids, unbuilt = server.call(_start_all(gateway, [({"task_id": "a"}, "g")] * 3))
        assert time.monotonic() - started < 3
        assert len(set(episode_ids)) == 3 and len(unbuilt) == 1 and unbuilt <= set(episode_ids)
        assert [store.get(e).finished for e in episode_ids] == [e in unbuilt for e in episode_ids]
        assert "building SlowInitEnv took longer than 0.3s" in store.get(unbuilt.pop()).error


@pytest.mark.parametrize(("env", "hang", "detail"), [
    (ENV, "sleep", f"building SlowInitEnv took longer than 0.3s (--timeout) (stuck at {STUCK['sleep']} in __init__)"),
    (INLINE_ENV, "spin", "building InlineSlowInitEnv took longer than 0.3s (--timeout); built inline: "
     f"InlineSlowInitEnv sets blocking = False (stuck at {STUCK['spin']} in __init__)"),
    (INLINE_ENV, "sleep", "InlineSlowInitEnv.__init__ did not return within 0.3s and could not be interrupted"),
])  # fmt: skip
def test_env_check_fails_a_constructor_that_hangs(env, hang, detail):
    from forge.env.check import check_env

    started = time.monotonic()
    report = check_env(getattr(slow_init_envs, env.split(":")[1]), {"hang": hang}, timeout_s=0.3)
    assert time.monotonic() - started < 10
    assert [(c.name, c.passed, c.detail) for c in report.checks] == [("construct", False, detail)]


def test_dry_run_fails_a_constructor_past_the_limit_with_its_line(capsys):
    from forge.cli import main

    started = time.monotonic()
    overrides = [f"env.name={ENV}", "env.kwargs={hang: sleep}", "env.step_timeout_s=0.3"]
    assert main(["train", "configs/smoke.yaml", *overrides, "--dry-run"]) == 2
    assert time.monotonic() - started < 5
    error = capsys.readouterr().err
    assert "Traceback" not in error
    assert error.splitlines()[-1].startswith(
        "forge: building SlowInitEnv(**env.kwargs={'hang': 'sleep'}) took longer than 0.3s "
        f"(env.step_timeout_s) (stuck at {STUCK['sleep']} in __init__)"
    )


def test_dry_run_stops_a_constructor_it_gave_up_on_that_loops_in_python(capsys):
    from forge.cli import main

    before = set(threading.enumerate())
    overrides = [f"env.name={ENV}", "env.kwargs={hang: spin}", "env.step_timeout_s=0.3"]
    assert main(["train", "configs/smoke.yaml", *overrides, "--dry-run"]) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith(
        "forge: building SlowInitEnv(**env.kwargs={'hang': 'spin'}) took longer than 0.3s "
        f"(env.step_timeout_s) (stuck at {STUCK['spin']} in __init__)"
    )
    left = [t for t in threading.enumerate() if t not in before and t.name == "forge-env-preflight"]
    for dry_run in left:  # stopped, not left taking the GIL from the rest of the process
        dry_run.join(timeout=10)
        assert not dry_run.is_alive()


@pytest.fixture(scope="module")
def gil_dry_run(tmp_path_factory):
    """`forge train --dry-run` on a constructor holding the GIL, started at the first test that
    asks: each of the two tests below waits ~5 s on a time limit, so the two overlap."""
    command = [
        sys.executable, "-m", "forge.cli", "train", "configs/smoke.yaml", "--dry-run",
        f"env.name={ENV}", "env.kwargs={hang: regex}", "env.step_timeout_s=0.3",
    ]  # fmt: skip
    path = os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    environment = {**os.environ, "PYTHONPATH": path}
    stderr = tmp_path_factory.mktemp("gil_dry_run") / "stderr"
    with stderr.open("w") as stderr_file:  # a file, not a pipe: nothing reads it meanwhile
        process = subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr_file, env=environment
        )
    yield process, stderr
    process.kill()  # a test failed before it ended
    process.wait()


@pytest.mark.slow
def test_env_check_fails_a_constructor_holding_the_gil(capsys, gil_dry_run):
    from forge.cli import main

    started = time.monotonic()
    assert main(["env", "check", ENV, "--kwargs", '{"hang": "regex"}', "--timeout", "0.3"]) == 1
    assert time.monotonic() - started < 60
    out = capsys.readouterr().out
    assert "FAIL  construct        SlowInitEnv.__init__ did not return within 0.3s and held the GIL" in out
    assert "release the GIL in it or run it in a subprocess" in out


def test_dry_run_on_a_constructor_holding_the_gil_ends_with_its_line_instead_of_hanging(gil_dry_run):
    process, stderr_file = gil_dry_run
    assert process.wait(timeout=60) == 1
    stderr = stderr_file.read_text()
    file, line = STUCK["regex"].rsplit(":", 1)
    assert "Timeout (0:00:05.300000)!" in stderr and f'File "{file}", line {line} in __init__' in stderr


@pytest.mark.slow
def test_a_run_whose_constructors_hang_stops_with_exit_code_1(ray_session, tmp_path, capsys):
    from forge.cli import main

    overrides = [
        f"env.name={ENV}",
        "env.kwargs={hang: sleep, once: " + str(tmp_path / "built-once") + "}",  # the dry run's build passes
        "env.step_timeout_s=0.5",
        "train.max_steps=20",
        "env.error_window_steps=2",
        "rollout.tasks_per_step=2",
        "rollout.group_size=2",
        "rollout.num_workers=1",  # the driver counts the errors and stops the run: one worker as two
        "logging.progress_bar=false",
    ]
    assert main(["train", "configs/smoke.yaml", *overrides, "--output-dir", str(tmp_path / "run")]) == 1
    error = capsys.readouterr().err
    assert error.count("EnvTimeout: building SlowInitEnv took longer than 0.5s (env.step_timeout_s)") == 1
    assert f"(at {STUCK['sleep']} in __init__)" in error
    assert "forge: stopped at step 2: 8 of 8 episodes errored over the last 2 steps" in error
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps[0]["episodes_error"] == 4  # the run stopped at step 2, before recording it
