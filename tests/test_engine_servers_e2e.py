"""Training with `rollout.engine: server` (Forge starts `forge serve` actors) and `remote`
(servers someone else runs): weights reach the engines, versions come back on every
token, prefix-cache hits are reported, a run survives an engine killed mid-run, takes back a
remote server restarted mid-run, and stops when its only server is lost."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest

from forge.config import ConfigError, load_config

# One rollout worker: its router still spreads the two groups over both engines (the least
# loaded first), and each worker actor took ~2 s of a run's start on a 2-core machine.
SMALL = ["rollout.tasks_per_step=2", "rollout.group_size=4", "rollout.num_workers=1", "rollout.num_engines=2"]


def rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_server_engine_run_survives_an_engine_killed_mid_run_and_replaces_it(ray_session, tmp_path, capfd):
    import ray

    from forge.rollout.engines.actor import engine_actor_name
    from forge.run.launch import train

    cfg = load_config("configs/smoke.yaml", ["train.max_steps=8", "rollout.engine=server", *SMALL])
    run = tmp_path / "run"

    def kill_engine_after_step_2() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            metrics = run / "metrics.jsonl"
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                ray.kill(ray.get_actor(engine_actor_name(0)))
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_engine_after_step_2, daemon=True)
    killer.start()
    result = train(cfg, run, progress=False)
    killer.join(timeout=5)

    assert result.steps == 8
    steps = rows(run)
    assert [row["policy_version"] for row in steps] == [float(n) for n in range(1, 9)]
    assert sum(row["episodes_lost"] for row in steps) > 0  # the killed engine's episodes, counted
    assert steps[-1]["episodes"] == 8 and steps[-1]["episodes_lost"] == 0  # the other engine took over
    assert all(row["prefix_cache_hit_rate"] > 0 for row in steps if row["episodes"])
    console = capfd.readouterr().err
    assert "engine http://" in console and "lost" in console
    assert "started in place of" in console  # rollout.max_engine_restarts: a new engine joined


@pytest.mark.slow
def test_an_async_run_generates_on_engine_servers_that_get_each_version(ray_session, tmp_path):
    from forge.run.launch import train

    cfg = load_config(
        "configs/smoke.yaml",
        ["train.max_steps=6", "train.mode=async", "rollout.engine=server", *SMALL],
    )
    result = train(cfg, tmp_path / "run", progress=False)

    assert result.steps == 6
    steps = rows(tmp_path / "run")
    assert [row["policy_version"] for row in steps] == [float(n) for n in range(1, 7)]
    assert sum(row["episodes_lost"] for row in steps) == 0
    # Engines left at version 0 would make every group staler step by step, past the bound
    # (the pool drops those); each version reached them, so the groups stay within it.
    assert max(row["staleness_max"] for row in steps) <= cfg.async_.max_staleness
    assert steps[-1]["staleness_mean"] < steps[-1]["policy_version"] - 1


@pytest.mark.slow
def test_a_remote_forge_server_restarted_mid_run_is_taken_back_after_the_weight_push(
    ray_session, tmp_path, capfd, monkeypatch
):
    """Two forge serves the run did not start; one is stopped after step 1 and started again
    on its port (from the checkpoint on disk, version 0) after step 3. The driver's sync finds
    it answering, pushes the current weights, and the workers route to it again; the run
    trains every step, and the server that stayed up got every version and served calls."""
    from forge.models.loading import resolve_model_path
    from forge.rollout.engines import health
    from forge.rollout.engines.server import EngineServer, make_service

    monkeypatch.setattr(health, "READMIT_FIRST_WAIT_S", 0.1)  # the driver asks at each sync
    monkeypatch.setattr(health, "READMIT_MAX_WAIT_S", 0.1)
    cfg = load_config("configs/smoke.yaml", ["train.max_steps=7", *SMALL])
    model = resolve_model_path(cfg.model, tmp_path / "model", seed=cfg.seed)
    port = free_port()

    def build(port: int) -> EngineServer:
        return EngineServer(make_service(model, max_new_tokens=1, max_context_tokens=1024), port=port)

    servers = [build(0).start(), build(port).start()]
    run = tmp_path / "run"

    cfg = load_config(
        "configs/smoke.yaml",
        [
            "train.max_steps=7",
            *SMALL,
            "rollout.engine=remote",
            f"rollout.servers=[{servers[0].url},{servers[1].url}]",
            f"model.path={model}",
        ],
    )
    result, restarted = train_through_a_restart(cfg, run, servers, build, port, stop_after=1, restart_after=3)
    assert result.steps == 7
    steps = rows(run)
    assert [row["policy_version"] for row in steps] == [float(n) for n in range(1, 8)]
    stayed = servers[0].service.served
    assert stayed.policy_version == 7 and stayed.metrics()["requests"] > 0  # pushed after every step
    assert restarted.policy_version == 7  # it took every version after its restart
    assert restarted.metrics()["requests"] > 0  # and the workers sampled from it again
    assert steps[-1]["engine_servers_live"] == 2.0 and steps[-1]["engine_servers_readmitted"] == 1.0
    assert min(row["engine_servers_live"] for row in steps) == 1.0
    console = capfd.readouterr().err
    url = f"http://127.0.0.1:{port}"
    assert f"engine {url} lost" in console
    assert f"engine {url} answers again" in console and f"engine {url} took weights version" in console


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_remote_run_whose_only_server_is_lost_stops_with_an_error_naming_it(ray_session, tmp_path, mode):
    """Not a hang, not exit 0: the run stops within rollout.engine_timeout_s of the loss."""
    from forge.failures import RunStopped
    from forge.models.loading import resolve_model_path
    from forge.rollout.engines.server import EngineServer, make_service
    from forge.run.launch import train

    cfg = load_config("configs/smoke.yaml", ["train.max_steps=6", *SMALL])
    model = resolve_model_path(cfg.model, tmp_path / "model", seed=cfg.seed)
    server = EngineServer(make_service(model, max_new_tokens=1, max_context_tokens=1024)).start()
    run = tmp_path / "run"
    stopped_at: list[float] = []

    def stop_after_step_1() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().strip():
                server.stop()
                stopped_at.append(time.monotonic())
                return
            time.sleep(0.05)

    cfg = load_config(
        "configs/smoke.yaml",
        [
            "train.max_steps=6",
            *SMALL,
            "rollout.engine=remote",
            f"rollout.servers=[{server.url}]",
            f"model.path={model}",
            "rollout.engine_timeout_s=3",
            f"train.mode={mode}",
        ],
    )
    killer = threading.Thread(target=stop_after_step_1, daemon=True)
    killer.start()
    try:
        with pytest.raises(RunStopped) as stopped:
            train(cfg, run, progress=False)
    finally:
        server.stop()
    assert time.monotonic() - stopped_at[0] < 3 + 30  # the wait, plus a step's own time on a loaded CPU
    message = str(stopped.value)
    # Lost at a sync (the driver waited 3 s for it), or before a rollout / with all of a step's episodes.
    assert any(
        why in message
        for why in (
            "none answered again within rollout.engine_timeout_s=3s",
            "none came back with weights version",
            "every episode was lost",
        )
    )
    assert server.url in message
    assert len(rows(run)) < 6


def test_engine_settings_that_cannot_work_are_refused_before_anything_starts():
    from forge.rollout.engines.engine_config import check_engine_config

    with pytest.raises(ConfigError, match="rollout.servers"):
        check_engine_config(load_config("configs/smoke.yaml", ["rollout.engine=remote"]))
    check_engine_config(load_config("configs/smoke.yaml", ["rollout.engine=server", "train.mode=async"]))
    with pytest.raises(ConfigError, match="object_store"):
        check_engine_config(
            load_config(
                "configs/smoke.yaml",
                ["rollout.engine=server", "train.mode=async", "rollout.weight_sync=folder"],
            )
        )
    # The gateway routes its calls to engine servers too (tests/test_gateway_engine_servers.py).
    check_engine_config(load_config("configs/smoke.yaml", ["rollout.engine=server", "gateway.enabled=true"]))
    with pytest.raises(ConfigError, match="train.mode=sync"):
        check_engine_config(
            load_config(
                "configs/smoke.yaml",
                [
                    "rollout.engine=remote",
                    "rollout.servers=[sglang+http://h:1]",
                    "rollout.weight_dir=/tmp/w",
                    "train.mode=async",
                ],
            )
        )
    with pytest.raises(ConfigError, match="weight_dir"):
        check_engine_config(
            load_config(
                "configs/smoke.yaml", ["rollout.engine=remote", "rollout.servers=[sglang+http://h:1]"]
            )
        )
    with pytest.raises(ConfigError, match="train.num_gpus=1"):
        check_engine_config(
            load_config("configs/smoke.yaml", ["rollout.engine=remote", "rollout.servers=[vllm+http://h:1]"])
        )
    check_engine_config(
        load_config(
            "configs/smoke.yaml",
            ["rollout.engine=remote", "rollout.servers=[vllm+http://h:1]", "train.num_gpus=1"],
        )
    )
    # LoRA to vLLM goes by adapter folders (/v1/load_lora_adapter): a shared folder, no NCCL, no GPU trainer.
    vllm_lora = ["rollout.engine=remote", "rollout.servers=[vllm+http://h:1]", "model.lora.enabled=true"]
    with pytest.raises(ConfigError, match="rollout.weight_dir"):
        check_engine_config(load_config("configs/smoke.yaml", vllm_lora))
    check_engine_config(load_config("configs/smoke.yaml", [*vllm_lora, "rollout.weight_dir=/tmp/w"]))
    with pytest.raises(ConfigError, match="train.mode=sync"):
        check_engine_config(
            load_config("configs/smoke.yaml", [*vllm_lora, "rollout.weight_dir=/tmp/w", "train.mode=async"])
        )
    # LoRA to SGLang goes by adapter folders the one trainer process writes (/load_lora_adapter).
    sglang_lora = ["rollout.engine=remote", "rollout.servers=[sglang+http://h:1]", "model.lora.enabled=true"]
    check_engine_config(load_config("configs/smoke.yaml", [*sglang_lora, "rollout.weight_dir=/tmp/w"]))
    with pytest.raises(ConfigError, match="train.num_gpus <= 1"):
        check_engine_config(
            load_config("configs/smoke.yaml", [*sglang_lora, "rollout.weight_dir=/tmp/w", "train.num_gpus=2"])
        )
    with pytest.raises(ConfigError, match="rollout.engine=remote"):
        check_engine_config(load_config("configs/smoke.yaml", ["rollout.servers=[http://h:1]"]))


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop_then_restart(
    run, servers: list, build, port: int, stop_after: int, restart_after: int, before_stop: Any = None
) -> None:
    """Chaos for a run on two servers: stop `servers[1]` once `stop_after` steps are recorded
    (after `before_stop()`, if given) and start one again on its `port` once `restart_after`
    are (appended to `servers`). The new server is built (its model loaded) while the old one
    is down, so the restart itself is quick: built at the restart, a loaded machine took long
    enough that a fast run ended before it could take the server back."""
    deadline = time.monotonic() + 300
    metrics, ready = run / "metrics.jsonl", None
    while time.monotonic() < deadline:
        done = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        if done >= stop_after and ready is None:
            if before_stop is not None:
                before_stop()
            servers[1].stop()
            ready = build(port)
            continue  # the build took a while: read the steps again
        if ready is not None and done >= restart_after:
            servers.append(ready.start())
            return
        time.sleep(0.02)


def train_through_a_restart(
    cfg, run, servers: list, build, port: int, stop_after: int, restart_after: int, before_stop: Any = None
):
    """Train `cfg` into `run` while `stop_then_restart` stops `servers[1]` and starts it again;
    every server is stopped after. Returns the run's result and the restarted server's state."""
    from forge.run.launch import train

    chaos = threading.Thread(
        target=stop_then_restart,
        args=(run, servers, build, port, stop_after, restart_after, before_stop),
        daemon=True,
    )
    chaos.start()
    try:
        result = train(cfg, run, progress=False)
        chaos.join(timeout=5)
    finally:
        for server in servers:
            server.stop()
    return result, servers[2].service.served


@pytest.mark.slow
def test_a_gateway_run_keeps_training_when_a_remote_server_stops_and_takes_it_back_restarted(
    ray_session, tmp_path, capfd, monkeypatch
):
    """Agent processes play every episode through the gateway, whose calls go to two forge
    serves; one stops as step 2 starts (its calls fail mid-step: their episodes are lost, as
    on a rollout worker) and comes back on its port, from the checkpoint on disk, after step
    2. The run trains every step on the survivor, the restarted server is taken back after
    the weight push, serves calls again, and every call trained in step k was sampled by
    version k - 1 (none by the restarted server's stale weights)."""
    import forge.run.gateway as gateway_run
    from forge.models.loading import resolve_model_path
    from forge.rollout.engines import health
    from forge.rollout.engines.server import EngineServer, make_service

    monkeypatch.setattr(health, "READMIT_FIRST_WAIT_S", 0.1)
    monkeypatch.setattr(health, "READMIT_MAX_WAIT_S", 0.1)
    steps = 4
    base = load_config("configs/gateway-smoke.yaml", [])
    model = resolve_model_path(base.model, tmp_path / "model", seed=base.seed)
    port = free_port()

    def build(port: int) -> EngineServer:
        return EngineServer(make_service(model, max_new_tokens=4, max_context_tokens=512), port=port)

    servers = [build(0).start(), build(port).start()]
    versions_trained: list[set[int]] = []
    original = gateway_run.episode_samples

    def capture(episodes, advantages):
        samples = original(episodes, advantages)
        versions_trained.append(
            {v for s in samples for v, m in zip(s.policy_versions, s.loss_mask, strict=True) if m}
        )
        return samples

    monkeypatch.setattr(gateway_run, "episode_samples", capture)
    cfg = load_config(
        "configs/gateway-smoke.yaml",
        [
            f"train.max_steps={steps}",
            "rollout.engine=remote",
            f"rollout.servers=[{servers[0].url},{servers[1].url}]",
            f"model.path={model}",
            # One group of 2 per engine: each agent process costs ~1 s of CPU to start.
            "rollout.group_size=2",
            "gateway.max_concurrent_agents=4",
            "train.max_steps_without_signal=0",
        ],
    )
    run = tmp_path / "run"
    result, restarted = train_through_a_restart(cfg, run, servers, build, port, 1, 2)
    assert result.steps == steps
    rows_ = rows(run)
    assert [row["policy_version"] for row in rows_] == [float(n) for n in range(1, steps + 1)]
    assert versions_trained == [{k} for k in range(steps)]  # step k + 1 trains version k's calls only
    # The stopped server's episodes are lost (never trained on), not the agents' errors.
    assert sum(row["episodes_lost"] for row in rows_) > 0
    assert sum(row["episodes_error"] for row in rows_) == 0
    assert restarted.policy_version == steps and restarted.metrics()["requests"] > 0
    assert rows_[-1]["engine_servers_live"] == 2.0 and rows_[-1]["engine_servers_readmitted"] == 1.0
    assert min(row["engine_servers_live"] for row in rows_) == 1.0
    console = capfd.readouterr().err
    url = f"http://127.0.0.1:{port}"
    assert f"engine {url} took weights version" in console and f"gateway: engine {url} taken back" in console


@pytest.mark.slow
def test_an_async_run_keeps_training_when_a_remote_server_stops_and_takes_it_back_restarted(
    ray_session, tmp_path, capfd, monkeypatch
):
    """train.mode=async on two forge serves: one crashes after step 2 (it fails the next
    generate call it gets, then stops: the episodes of that call are lost and counted) and
    comes back on its port, from the checkpoint on disk, after step 4. The run trains every
    step on the survivor; the driver pushes the restarted server the latest published version
    and the worker takes it back at its next rollout call; from then on it serves the run's
    current weights, never its checkpoint's (version 0).

    The crash is a failed call, not only a stop, so that some episodes are surely lost: a
    stop alone lost none when the worker happened to send that server nothing between the
    stop and the driver's next weight push (which then found it gone first); uvicorn's
    graceful stop answers the calls it holds."""
    from forge.models.loading import resolve_model_path
    from forge.rollout.engines import health
    from forge.rollout.engines.server import EngineServer, make_service

    monkeypatch.setattr(health, "READMIT_FIRST_WAIT_S", 0.1)
    monkeypatch.setattr(health, "READMIT_MAX_WAIT_S", 0.1)
    steps = 12
    base = load_config("configs/smoke.yaml", SMALL)
    model = resolve_model_path(base.model, tmp_path / "model", seed=base.seed)
    port = free_port()
    served_versions: list[int] = []  # the version of each reply of the restarted server
    crash, crashed = threading.Event(), threading.Event()

    def build(port: int) -> EngineServer:
        server = EngineServer(make_service(model, max_new_tokens=1, max_context_tokens=1024), port=port)
        if port and not servers:  # the server that crashes: fails its calls once told to
            served = server.service.served
            generate = served.generate

            def failing(requests):
                if crash.is_set():
                    crashed.set()
                    raise RuntimeError("this server crashed (the test's chaos)")
                return generate(requests)

            served.generate = failing
        if port and len(servers) == 2:  # the restart: record what it serves
            served = server.service.served
            generate = served.generate

            def recorded(requests):
                results = generate(requests)
                served_versions.extend(r.policy_version for r in results)
                return results

            served.generate = recorded
        return server

    servers: list[EngineServer] = []
    servers.extend([build(0).start(), build(port).start()])
    cfg = load_config(
        "configs/smoke.yaml",
        [
            f"train.max_steps={steps}",
            "train.mode=async",
            *SMALL,
            "rollout.engine=remote",
            f"rollout.servers=[{servers[0].url},{servers[1].url}]",
            f"model.path={model}",
        ],
    )
    run = tmp_path / "run"

    def crash_then_stop() -> None:
        crash.set()
        assert crashed.wait(timeout=120), "the worker sent the crashing server nothing in 120 s"

    result, restarted = train_through_a_restart(cfg, run, servers, build, port, 2, 4, crash_then_stop)
    assert crashed.is_set()
    assert result.steps == steps
    rows_ = rows(run)
    assert [row["policy_version"] for row in rows_] == [float(n) for n in range(1, steps + 1)]
    assert restarted.policy_version == steps
    assert served_versions and min(served_versions) >= 1  # never its checkpoint's weights
    assert rows_[-1]["engine_servers_live"] == 2.0 and rows_[-1]["engine_servers_readmitted"] == 1.0
    assert min(row["engine_servers_live"] for row in rows_) == 1.0
    assert max(row["staleness_max"] for row in rows_) <= cfg.async_.max_staleness
    assert sum(row["episodes_lost"] for row in rows_) > 0  # the stopped server's, counted
    console = capfd.readouterr().err
    url = f"http://127.0.0.1:{port}"
    assert f"engine {url} lost" in console and f"engine {url} took weights version" in console
