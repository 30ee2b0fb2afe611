"""Training with `rollout.engine: server` (Forge starts `forge serve` actors) and `remote`
(servers someone else runs): weights reach the engines, versions come back on every
token, prefix-cache hits are reported, and a run survives an engine killed mid-run."""

from __future__ import annotations

import json
import threading
import time

import pytest

from forge.config import ConfigError, load_config

SMALL = ["rollout.tasks_per_step=2", "rollout.group_size=4", "rollout.num_workers=2", "rollout.num_engines=2"]


def rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_server_engine_run_survives_an_engine_killed_mid_run_and_replaces_it(ray_session, tmp_path, capfd):
    import ray

    from forge.rollout.engines.pool import engine_actor_name
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
        ["train.max_steps=6", "train.mode=async", "rollout.engine=server", *SMALL, "rollout.num_workers=1"],
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
def test_a_remote_engine_run_trains_against_forge_servers_it_did_not_start(ray_session, tmp_path):
    from forge.models.loading import resolve_model_path
    from forge.rollout.engines.server import EngineServer, make_service
    from forge.run.launch import train

    cfg = load_config("configs/smoke.yaml", ["train.max_steps=3", *SMALL])
    model = resolve_model_path(cfg.model, tmp_path / "model", seed=cfg.seed)
    with EngineServer(make_service(model, max_new_tokens=1, max_context_tokens=1024)) as server:
        cfg = load_config(
            "configs/smoke.yaml",
            [
                "train.max_steps=3",
                *SMALL,
                "rollout.engine=remote",
                f"rollout.servers=[{server.url}]",
                f"model.path={model}",
            ],
        )
        train(cfg, tmp_path / "run", progress=False)
        assert server.service.served.policy_version == 3  # pushed tensors after every step
        assert server.service.served.metrics()["requests"] > 0
    assert [row["policy_version"] for row in rows(tmp_path / "run")] == [1.0, 2.0, 3.0]


def test_engine_settings_that_cannot_work_are_refused_before_anything_starts():
    from forge.rollout.engines.pool import check_engine_config

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
    with pytest.raises(ConfigError, match="rollout.engine=remote"):
        check_engine_config(load_config("configs/smoke.yaml", ["rollout.servers=[http://h:1]"]))
