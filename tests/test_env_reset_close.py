"""A `reset` that fails and a `close` that fails are bounded like every env call. In the
gateway a failed reset ends its episode as an error (the agent's start request gets a 500
or 504 naming the user's line, a training run counts it against env.max_error_fraction);
a close that raises or hangs is given up on at env.step_timeout_s, printed once per kind
and noted on its episode, whose outcome stands, in a rollout worker as in the gateway."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
import reset_close_envs
from env_fault_kit import LoopTicker, episode_store, marked_line, rollout_worker

from forge.env import calls, closing
from forge.env.errors import error_headline

ENV = "reset_close_envs:ResetCloseEnv"  # tests/ is on the path, as a user's folder would be


def _definition(name: str) -> str:
    source = Path(reset_close_envs.__file__).read_text().splitlines()
    return (
        f"{reset_close_envs.__file__}:{next(i for i, text in enumerate(source, 1) if f'def {name}(' in text)}"
    )


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Each test sees close failures printed as a fresh process would."""
    monkeypatch.setattr(closing, "_WARNED", set())
    monkeypatch.setattr(calls, "_SLOW_INLINE", set())


@pytest.mark.parametrize(("on_reset", "status", "headline"), [
    ("raise", 500, f"ValueError: no such level (at {marked_line(reset_close_envs, 'reset raised here')} in reset)"),
    ("dict", 500, f"EnvContractError: ResetCloseEnv.reset returned dict, expected str (at {_definition('reset')} in reset)"),
    ("sleep", 504, f"EnvTimeout: ResetCloseEnv.reset took longer than 0.3s (at {marked_line(reset_close_envs, 'reset stuck here')} in reset)"),
])  # fmt: skip
def test_a_failed_reset_in_the_gateway_ends_its_episode_as_an_error(on_reset, status, headline):
    from forge.gateway.episodes import EpisodeError

    store, finished = episode_store(lambda: reset_close_envs.ResetCloseEnv(on_reset=on_reset))

    async def start() -> tuple[EpisodeError, float]:
        started = time.monotonic()
        with pytest.raises(EpisodeError) as failed:
            await store.start({"task_id": "a"}, seed=0)
        seconds = time.monotonic() - started
        await store.closed([failed.value.episode_id])  # its env is closed too
        return failed.value, seconds

    error, seconds = asyncio.run(start())
    assert seconds < 3
    assert error.status == status and error.episode_id is not None
    assert error.message == f"episode {error.episode_id!r} could not start: {headline}"
    # Kept and recorded as an error episode, like one whose env could not be built.
    assert [(e.episode_id, e.status) for e in finished] == [(error.episode_id, "error")]
    trajectory = store.get(error.episode_id).to_trajectory(0.5)
    assert trajectory.status == "error" and error_headline(trajectory.error) == headline


def test_the_agents_start_request_gets_a_500_naming_the_line_its_reset_raised_at(tiny_checkpoint):
    from fastapi.testclient import TestClient

    from forge.gateway import Gateway
    from forge.gateway.server import build_app
    from forge.models.loading import load_tokenizer

    store, finished = episode_store(lambda: reset_close_envs.ResetCloseEnv(on_reset="raise"))
    gateway = Gateway(None, load_tokenizer(tiny_checkpoint), store, 4, 64)
    with TestClient(build_app(gateway)) as client:
        reply = client.post("/forge/episodes", json={"task": {"task_id": "a"}})
    assert reply.status_code == 500
    assert reply.json()["error"]["message"].endswith(
        f"could not start: ValueError: no such level (at {marked_line(reset_close_envs, 'reset raised here')} in reset)"
    )
    assert [e.status for e in finished] == ["error"]


def test_a_gateway_run_takes_episodes_whose_reset_failed_as_errors(tiny_checkpoint):
    """The training loop starts a step's episodes together; one whose reset failed is an
    error episode it takes like any other (no agent runs for it), not a crash."""
    from forge.gateway import Gateway, GatewayServer
    from forge.models.loading import load_tokenizer
    from forge.run.gateway import _start_all, _take

    resets = iter(["", "raise", "dict"])
    store, _ = episode_store(lambda: reset_close_envs.ResetCloseEnv(on_reset=next(resets)))
    gateway = Gateway(None, load_tokenizer(tiny_checkpoint), store, 4, 64)
    with GatewayServer(gateway) as server:
        episode_ids, failed = server.call(_start_all(gateway, [({"task_id": "a"}, "g")] * 3))
        assert len(set(episode_ids)) == 3 and len(failed) == 2
        server.call(gateway.finish_episode(next(e for e in episode_ids if e not in failed), reward=1.0))
        taken = server.call(_take(store, episode_ids))
    assert sorted(e.status for e in taken) == ["error", "error", "ok"]


@pytest.mark.parametrize(("on_close", "headline"), [
    ("raise", f"OSError: the board file is gone (at {marked_line(reset_close_envs, 'close raised here')} in close)"),
    ("sleep", f"EnvTimeout: ResetCloseEnv.close took longer than 0.3s (at {marked_line(reset_close_envs, 'close stuck here')} in close)"),
])  # fmt: skip
def test_a_gateway_close_that_fails_leaves_the_episode_and_the_loop_alone(on_close, headline, capsys):
    store, finished = episode_store(lambda: reset_close_envs.ResetCloseEnv(on_close=on_close))

    async def play() -> tuple[list, float, int]:
        ticker = LoopTicker().start()  # the loop serves every agent: it must go on meanwhile
        started = time.monotonic()
        episodes = [await store.start({"task_id": "a"}, seed=0) for _ in range(2)]
        for episode in episodes:
            await store.finish(episode.episode_id, answer="7")  # not waiting for the close
        seconds = time.monotonic() - started
        await store.closed([e.episode_id for e in episodes])
        ticker.stop()
        return episodes, seconds, ticker.ticks

    episodes, seconds, ticks = asyncio.run(play())
    assert seconds < 0.3
    assert ticks >= 2 or on_close != "sleep"  # the loop went on while the close hung
    assert [(e.status, e.outcome, e.error) for e in finished] == [("ok", 1.0, None)] * 2
    assert [error_headline(e.info["close_error"]) for e in episodes] == [headline] * 2
    assert episodes[0].to_trajectory(0.5).info["close_error"] == episodes[0].info["close_error"]
    assert capsys.readouterr().err.count(headline) == 1  # printed once


IN_A_THREAD = " (in a thread: a call of this blocking = False env ran past its limit inline)"


@pytest.mark.parametrize(("env", "on_close", "headline"), [
    (ENV, "raise", f"OSError: the board file is gone (at {marked_line(reset_close_envs, 'close raised here')} in close)"),
    (ENV, "sleep", f"EnvTimeout: ResetCloseEnv.close took longer than 1.0s (at {marked_line(reset_close_envs, 'close stuck here')} in close)"),
    ("reset_close_envs:InlineResetCloseEnv", "spin",
     f"EnvTimeout: ResetCloseEnv.close took longer than 1.0s{IN_A_THREAD} (at {marked_line(reset_close_envs, 'close spins here')} in close)"),
])  # fmt: skip
def test_a_worker_close_that_fails_is_given_up_on_and_its_episodes_stand(
    tiny_checkpoint, env, on_close, headline, capsys, tmp_path
):
    from forge.metrics import MetricsLogger

    worker = rollout_worker(tiny_checkpoint, env, {}, step_timeout_s=1.0)
    tasks = [{"task_id": "a"}, {"task_id": "b"}]

    def timed_rollout() -> tuple[list, float]:
        started = time.monotonic()
        return asyncio.run(worker.rollout(tasks, 2)), time.monotonic() - started

    timed_rollout()  # warm
    _, quiet = timed_rollout()
    worker.env_kwargs = {"on_close": on_close}
    trajectories, failing = timed_rollout()
    # Closes in threads run at the same time: one time limit (1 s) in all, not 4 s, one per
    # env. An inline env's (blocking = False) first close holds the loop to the limit; then
    # its class closes in threads, the other three at once: two limits, then one per group.
    inline = env != ENV
    assert failing - quiet < (2 if inline else 1) * 1.0 + 1.5, (failing, quiet)
    assert [(t.status, t.outcome, t.error) for t in trajectories] == [("ok", 1.0, None)] * 4
    said_inline = headline.replace(IN_A_THREAD, " (called inline: the env sets blocking = False)")
    headlines = {headline, said_inline} if inline else {headline}
    assert {error_headline(t.info["close_error"]) for t in trajectories} == headlines
    assert capsys.readouterr().err.count(said_inline if inline else headline) == 1  # printed once
    if inline:
        _, again = timed_rollout()
        assert again - quiet < 1.0 + 1.5, (again, quiet)
    logger = MetricsLogger(tmp_path, tensorboard=False)  # and kept in trajectories.jsonl
    logger.log_trajectories(1, trajectories, worker.tokenizer, 4)
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "trajectories.jsonl").read_text().splitlines()]
    assert [error_headline(row["close_error"]) for row in rows] == [
        error_headline(t.info["close_error"]) for t in trajectories
    ]
    worker.env_kwargs = {}  # the same worker plays on, its closes quiet
    assert ["close_error" in t.info for t in asyncio.run(worker.rollout([{"task_id": "a"}], 2))] == [
        False
    ] * 2


def test_env_check_fails_a_generate_tasks_that_hangs():
    from forge.env.check import check_env

    started = time.monotonic()
    report = check_env(reset_close_envs.ResetCloseEnv, {"on_tasks": "sleep"}, timeout_s=0.3)
    assert time.monotonic() - started < 5
    assert [(c.name, c.passed, c.detail) for c in report.checks] == [
        ("construct", True, "ResetCloseEnv(**{'on_tasks': 'sleep'})"),
        ("tasks", False, "ResetCloseEnv.generate_tasks did not return within 0.3s (--timeout) "
         f"(stuck at {marked_line(reset_close_envs, 'generate_tasks stuck here')} in generate_tasks)"),
    ]  # fmt: skip
    assert "set env.tasks to it" in report.checks[-1].fix


def test_dry_run_fails_a_generate_tasks_past_its_limit_with_its_line(capsys):
    from forge.cli import main

    started = time.monotonic()
    overrides = [f"env.name={ENV}", "env.kwargs={on_tasks: sleep}", "env.tasks_timeout_s=0.3"]
    assert main(["train", "configs/smoke.yaml", *overrides, "--dry-run"]) == 2
    assert time.monotonic() - started < 5
    error = capsys.readouterr().err
    assert "Traceback" not in error
    assert error.splitlines()[-1].startswith(
        "forge: ResetCloseEnv.generate_tasks (env.num_tasks=10000) did not return within 0.3s "
        f"(env.tasks_timeout_s) (stuck at {marked_line(reset_close_envs, 'generate_tasks stuck here')} in generate_tasks)"
    )


@pytest.mark.slow
def test_a_gateway_run_whose_resets_all_fail_stops_with_exit_code_1(ray_session, tmp_path, capsys):
    from forge.cli import main

    overrides = [
        f"env.name={ENV}",
        "env.kwargs={on_reset: raise, once: "
        + str(tmp_path / "reset-once")
        + "}",  # the dry run's reset passes
        "train.max_steps=20",
        "env.error_window_steps=2",
        "rollout.group_size=2",
        "logging.progress_bar=false",
    ]
    assert main(["train", "gateway-smoke", *overrides, "--output-dir", str(tmp_path / "run")]) == 1
    error = capsys.readouterr().err
    assert "Traceback" not in error
    raised = f"ValueError: no such level (at {marked_line(reset_close_envs, 'reset raised here')} in reset)"
    assert error.count(raised) == 1
    assert "forge: stopped at step 2: 8 of 8 episodes errored over the last 2 steps" in error
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["episodes_error"], r["agents_failed"]) for r in rows] == [(4, 0.0), (4, 0.0)]  # no agent ran
