"""Agent clusters in the rollout worker, on the real tiny model: the spawn tool from config,
a frozen sub-agent policy kept beside the trained one, and a swarm run end to end."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
import torch

from forge.config import Config, TinyModelConfig, load_config
from forge.models.tiny import save_tiny_checkpoint
from forge.rollout.worker import RolloutWorker
from forge_envs.parallel_lookup import ParallelLookupEnv


@pytest.fixture(scope="module")
def lookup_checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(
        TinyModelConfig(extra_words=["find", "spawn"]), tmp_path_factory.mktemp("lookup")
    )


def swarm_config(**swarm) -> Config:
    return load_config("configs/swarm.yaml", [f"swarm.{key}={value}" for key, value in swarm.items()])


def test_swarm_needs_a_tool_env(tiny_checkpoint):
    cfg = Config()
    cfg.swarm.enabled = True
    with pytest.raises(ValueError, match="is not a forge.env.ToolEnv"):
        RolloutWorker(str(tiny_checkpoint), cfg.model, cfg.env, cfg.rollout, 0.5, seed=0, swarm_cfg=cfg.swarm)


def test_swarm_on_an_env_without_tools_is_refused_before_ray_starts():
    from forge.config import ConfigError
    from forge.run.launch import preflight

    cfg = Config()  # guess_number: a plain Env
    cfg.swarm.enabled = True
    with pytest.raises(ConfigError, match="swarm.enabled: env 'guess_number' .* is not a forge.env.ToolEnv"):
        preflight(cfg)


def test_a_frozen_subagent_policy_keeps_its_weights_while_the_policy_moves(lookup_checkpoint):
    cfg = swarm_config(subagent_policy="frozen", train_subagents="false")
    worker = RolloutWorker(
        str(lookup_checkpoint), cfg.model, cfg.env, cfg.rollout, 0.5, seed=0, swarm_cfg=cfg.swarm
    )
    initial = {name: p.detach().clone() for name, p in worker.engine.model.state_dict().items()}
    moved = {name: p + 0.01 * torch.randn_like(p) for name, p in initial.items()}
    worker.set_weights(moved, version=1)
    frozen = worker.frozen.model.state_dict()
    assert all(torch.equal(frozen[name], initial[name]) for name in initial)
    assert not torch.equal(worker.engine.model.state_dict()["lm_head.weight"], initial["lm_head.weight"])

    tasks = ParallelLookupEnv.generate_tasks(6, seed=0, num_keys=8, k=4)
    trajectories = asyncio.run(worker.rollout(tasks, group_size=8))
    helpers = [sub for t in trajectories for sub in t.subagents]
    assert helpers, "the random policy spawned no sub-agent in 48 episodes"
    assert {v for t in trajectories for v, m in zip(t.policy_versions, t.loss_mask, strict=True) if m} == {1}
    assert {v for s in helpers for v, m in zip(s.policy_versions, s.loss_mask, strict=True) if m} == {0}
    assert all(s.parent_turn is not None and s.depth == 1 for s in helpers)


def test_a_later_frozen_version_is_taken_when_the_run_reaches_it(lookup_checkpoint):
    cfg = swarm_config(subagent_policy="frozen", train_subagents="false", frozen_version=2)
    worker = RolloutWorker(
        str(lookup_checkpoint), cfg.model, cfg.env, cfg.rollout, 0.5, seed=0, swarm_cfg=cfg.swarm
    )
    assert worker.frozen is None  # until version 2, sub-agents use the current policy
    weights = worker.engine.model.state_dict()
    worker.set_weights(weights, version=1)
    assert worker.frozen is None
    worker.set_weights(weights, version=2)
    assert worker.frozen is not None and worker.frozen.policy_version == 2


@pytest.mark.slow
def test_a_swarm_run_writes_the_cluster_metrics_and_its_subagents(ray_session, tmp_path):
    from test_metrics_doc import documented_metrics

    from forge.run.launch import train

    cfg = load_config(
        "configs/swarm.yaml",
        [
            "train.max_steps=2",
            "rollout.tasks_per_step=4",
            "rollout.group_size=4",
            "logging.trajectory_samples=16",
        ],
    )
    train(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        assert set(row) - documented_metrics() == set()
        for key in ("subagents_per_episode", "critical_steps_mean", "total_steps_mean", "parallelism",
                    "reward/parl_spawn", "reward/parl_finish"):  # fmt: skip
            assert math.isfinite(row[key]), key
        assert row["critical_steps_mean"] <= row["total_steps_mean"]
        # every level's tool calls: the sub-agents' among them, each of which looks up at least once
        assert row["tool_calls_mean"] >= row["subagent_tool_calls_mean"] >= 0
        assert row["subagent_tool_calls_mean"] >= row["subagents_per_episode"] * row.get(
            "subagent_success_rate", 0
        )
    assert rows[0]["reward/parl_weight_scale"] == 1.0 > rows[1]["reward/parl_weight_scale"]
    assert any(row["subagents_per_episode"] > 0 for row in rows)
    logged = [json.loads(line) for line in (tmp_path / "run" / "trajectories.jsonl").read_text().splitlines()]
    helpers = [sub for episode in logged for sub in episode.get("subagents", [])]
    assert helpers and all("find" in sub["prompt"] and sub["parent_turn"] is not None for sub in helpers)
    for row in rows:  # every episode is logged: the step's metrics are counts of what it played
        episodes = [episode for episode in logged if episode["step"] == row["step"]]
        subs = [sub for episode in episodes for sub in episode.get("subagents", [])]
        assert len(episodes) == 16 and row["subagents_per_episode"] == pytest.approx(len(subs) / 16)
        if subs:
            assert row["subagent_success_rate"] == pytest.approx(
                sum(sub["success"] for sub in subs) / len(subs)
            )
        critical = 0
        for episode in episodes:
            longest = [0] * len(episode["turns"])
            for sub in episode.get("subagents", []):
                longest[sub["parent_turn"]] = max(longest[sub["parent_turn"]], len(sub["generated"]))
            critical += sum(1 + steps for steps in longest)
        assert row["critical_steps_mean"] == pytest.approx(critical / 16)


def test_a_restarted_worker_past_the_frozen_version_loads_the_runs_snapshot(lookup_checkpoint, tmp_path):
    cfg = swarm_config(subagent_policy="frozen", train_subagents="false", frozen_version=2)
    snapshot = tmp_path / "swarm_frozen.pt"

    def start() -> RolloutWorker:
        return RolloutWorker(str(lookup_checkpoint), cfg.model, cfg.env, cfg.rollout, 0.5, seed=0,
                             swarm_cfg=cfg.swarm, frozen_snapshot=str(snapshot))  # fmt: skip

    worker = start()
    initial = {name: p.detach().clone() for name, p in worker.engine.model.state_dict().items()}
    at_two = {name: p + 0.01 * torch.randn_like(p) for name, p in initial.items()}
    worker.set_weights(at_two, version=2)
    worker.save_frozen(str(snapshot))
    sampling = worker.rng_state()

    restarted = start()  # as Ray restarts a dead worker: its constructor again, then the latest weights
    restarted.set_rng_state(sampling)
    later = {
        name: p + 0.05 for name, p in at_two.items()
    }  # (randn here would repeat at_two: the worker seeds torch)
    restarted.set_weights(later, version=5)
    assert restarted.frozen.policy_version == 2
    frozen, kept = restarted.frozen.model.state_dict(), worker.frozen.model.state_dict()
    assert all(torch.equal(frozen[name], kept[name]) for name in kept)  # version 2's weights, not 5's
    assert not torch.equal(
        frozen["model.norm.weight"], restarted.engine.model.state_dict()["model.norm.weight"]
    )
    assert torch.equal(restarted.frozen.generator.get_state(), worker.frozen.generator.get_state())


def test_a_worker_past_the_frozen_version_without_its_snapshot_refuses(lookup_checkpoint, tmp_path):
    cfg = swarm_config(subagent_policy="frozen", train_subagents="false", frozen_version=2)
    worker = RolloutWorker(str(lookup_checkpoint), cfg.model, cfg.env, cfg.rollout, 0.5, seed=0,
                           swarm_cfg=cfg.swarm, frozen_snapshot=str(tmp_path / "missing.pt"))  # fmt: skip
    with pytest.raises(RuntimeError, match="no snapshot of version 2"):
        worker.set_weights(worker.engine.model.state_dict(), version=3)
    assert worker.frozen is None


@pytest.mark.slow
def test_a_run_keeps_its_frozen_version_for_restarts_and_resumes(ray_session, tmp_path):
    """The run saves version 1's weights when its workers reach it; killed after step 2 and
    resumed, it ends where the uninterrupted run ends; without the snapshot it refuses to resume,
    before any actor starts."""
    from test_resume import trainable

    from forge.run import context
    from forge.run.frozen import SNAPSHOT_FILE
    from forge.run.launch import train

    def refuse_to_start(*args, **kwargs):
        raise AssertionError("the run's actors were started")

    def config(steps: int, *extra: str) -> Config:
        return load_config("configs/swarm.yaml", [*extra,
            "swarm.subagent_policy=frozen", "swarm.train_subagents=false", "swarm.frozen_version=1",
            "reward.parl.enabled=false",  # its weights anneal over train.max_steps, which differs below
            f"train.max_steps={steps}", "train.checkpoint_every=1", "train.keep_checkpoints=0",
            "rollout.num_workers=1", "rollout.tasks_per_step=2", "rollout.group_size=4",
            "logging.tensorboard=false",
        ])  # fmt: skip

    train(config(3), tmp_path / "whole", progress=False)
    train(config(2), tmp_path / "cut", progress=False)
    snapshot = torch.load(tmp_path / "cut" / SNAPSHOT_FILE, weights_only=True)
    at_one, at_two = trainable(tmp_path / "cut", 1), trainable(tmp_path / "cut", 2)
    assert at_one.keys() <= snapshot.keys()
    assert all(torch.equal(snapshot[name], at_one[name]) for name in at_one)
    assert any(not torch.equal(at_one[name], at_two[name]) for name in at_one)

    train(config(3), tmp_path / "cut", progress=False, resume=True)
    expected, got = trainable(tmp_path / "whole", 3), trainable(tmp_path / "cut", 3)
    for name, tensor in expected.items():
        assert torch.equal(tensor, got[name]), name

    (tmp_path / "cut" / SNAPSHOT_FILE).unlink()
    with pytest.MonkeyPatch.context() as patch, pytest.raises(ValueError, match="no snapshot"):
        patch.setattr(context, "Run", refuse_to_start)  # refused before any actor starts
        train(config(4), tmp_path / "cut", progress=False, resume=True)

    train(config(2, "train.mode=async"), tmp_path / "async", progress=False)  # weights sent without waiting
    snapshot = torch.load(tmp_path / "async" / SNAPSHOT_FILE, weights_only=True)
    at_one = trainable(tmp_path / "async", 1)
    assert all(torch.equal(snapshot[name], at_one[name]) for name in at_one)
