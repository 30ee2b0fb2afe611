"""A run is told the sandbox level its rollout workers use, not only the driver's: each worker
probes its own node, a node below the driver's level is named in a warning and the run records
the lowest level, and a node below what the config allows stops the run at start, naming it.
A weaker node is simulated by giving the workers alone a lower probe (tests/weak_worker_envs.py)."""

from __future__ import annotations

import json

import pytest
import yaml
from weak_worker_envs import LEVEL_VAR

from forge import sandbox
from forge.config import load_config
from forge.env import registry
from forge.models.loading import node_name

BEST = sandbox.available_level()
ONE_STEP = [
    "train.max_steps=1",
    "rollout.tasks_per_step=1",
    "rollout.num_workers=1",
    "logging.tensorboard=false",
]


@pytest.fixture
def workers_at(monkeypatch):
    """Start the run's rollout workers as on a node whose probe finds `level`."""

    def weaken(level: int) -> None:
        plain = registry.worker_runtime_env

        def runtime_env(name: str) -> dict:
            given = plain(name) or {}
            return {**given, "env_vars": {**given.get("env_vars", {}), LEVEL_VAR: str(level)}}

        monkeypatch.setattr(registry, "worker_runtime_env", runtime_env)

    return weaken


@pytest.mark.slow
@pytest.mark.skipif(BEST < 1, reason="needs a driver at level 1 or more to have a weaker worker")
def test_a_worker_below_the_drivers_level_is_named_and_its_level_recorded(
    ray_session, workers_at, tmp_path, capfd
):
    from forge.run.launch import train

    workers_at(BEST - 1)
    cfg = load_config("configs/smoke.yaml", [*ONE_STEP, "env.name=weak_worker_envs:TrustedGuessEnv"])
    train(cfg, tmp_path / "run", progress=False)
    err = capfd.readouterr().err
    assert f"forge: sandbox level {BEST}" in err  # the driver's own
    assert f"rollout workers on node {node_name()} (level {BEST - 1}) run sandboxed code below" in err
    assert f"this run's sandbox level is {BEST - 1}" in err and "(there: simulated weaker node)" in err
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert written["sandbox"]["level"] == BEST - 1
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["sandbox_level"] for row in rows] == [float(BEST - 1)]


REFUSALS = [
    pytest.param(
        0, ["env.name=weak_worker_envs:UntrustedGuessEnv"], "runs untrusted code", "sandbox.allow_level_0: true",
        id="untrusted-code-at-level-0",
    ),
    pytest.param(
        BEST - 1, ["env.name=weak_worker_envs:TrustedGuessEnv", f"sandbox.min_level={BEST}"],
        f"sandbox.min_level={BEST}", f"sandbox.min_level={BEST}", id="below-min-level",
    ),
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(BEST < 1, reason="needs a driver at level 1 or more to have a weaker worker")
@pytest.mark.parametrize(("level", "overrides", "reason", "setting"), REFUSALS)
def test_forge_train_refuses_a_worker_below_what_the_config_allows_naming_its_node(
    ray_session, workers_at, tmp_path, capsys, level, overrides, reason, setting
):
    from forge.cli import main

    workers_at(level)
    code = main(["train", "configs/smoke.yaml", *ONE_STEP, *overrides, "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"forge: rollout worker 0 on node {node_name()}: " in err
    assert reason in err and setting in err and f"offers only level {level}" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_the_warning_names_each_node_below_the_driver_with_what_failed_there(capsys):
    from forge.sandbox.policy import SandboxReport, announce_workers

    reports = [
        SandboxReport("a (10.0.0.2)", 2),
        SandboxReport("b (10.0.0.3)", 1, {2: "bwrap not found"}),
        SandboxReport(
            "c (10.0.0.4)", 0, {1: "unshare: Operation not permitted", 2: "bwrap not found"}, root=False
        ),
    ]
    lines = announce_workers(2, reports, untrusted=True, env_name="python_coding")
    assert lines == capsys.readouterr().err.splitlines()
    assert "node b (10.0.0.3) (level 1), node c (10.0.0.4) (level 0) run sandboxed code below" in lines[0]
    assert "node a" not in "\n".join(lines)
    # node c's harness is not root: level 0 there gives the code no uid of its own
    assert "this run's sandbox level is 0 (rlimits only, as the harness's own user)" in lines[0]
    assert any("on node c (10.0.0.4): level 1 needs" in line and "(there: unshare" in line for line in lines)
    assert "untrusted code at level 0 on node c (10.0.0.4)" in lines[-1] and "own user" in lines[-1]
    assert (
        announce_workers(1, reports, untrusted=True) != []
        and announce_workers(0, reports, untrusted=True) == []
    )


class Answers:
    """A fake actor method: `.remote()` gives a ref to its answer."""

    def __init__(self, answer: object) -> None:
        self.answer = answer

    def remote(self, *args: object) -> object:
        import ray

        return ray.put(self.answer)


class FakeWorker:
    """A rollout worker that answers at once, on a node whose level `report` gives."""

    def __init__(self, report: object) -> None:
        self.sandbox_report = Answers(report)
        self.set_weights = Answers(None)
        self.get_policy_version = Answers(0)


def run_recorded_at(level: int, reports: list, output) -> object:
    """A Run (no actors started) whose workers are `reports`' fakes and whose recorded level is `level`."""
    from forge.run.context import Run

    cfg = load_config("configs/smoke.yaml", ["logging.tensorboard=false"])
    cfg.sandbox.level = level
    run = object.__new__(Run)
    run.cfg, run.output_dir, run.workers = cfg, output, [FakeWorker(report) for report in reports]
    run.restarted, run.stuck_report_dir, run.stuck_reported = set(), output / "stuck_workers", set()
    return run


def test_a_worker_restarted_on_a_weaker_node_lowers_the_recorded_level_and_says_so_once(
    ray_session, tmp_path, capsys
):
    from forge.run.context import StepLog
    from forge.sandbox.policy import SandboxReport

    reports = [SandboxReport("a (10.0.0.2)", 2), SandboxReport("b (10.0.0.3)", 1, {2: "bwrap not found"})]
    run = run_recorded_at(2, reports, tmp_path)
    log = StepLog(run.cfg, tmp_path, False, "train", 0)
    log.record(1, {}, [], None)
    run.tell_worker_death(0, 4)  # back on a node as strong as the run's: nothing changes
    run.tell_worker_death(1, 4)  # as the sync loop's collect_rollouts tells it
    run.tell_workers("set_weights", None, 2)  # the step's weight sync: both answer, restarted
    run.tell_workers("set_weights", None, 3)
    log.record(2, {}, [], None)
    log.close()
    err = capsys.readouterr().err
    assert err.count("restarted on node") == 1
    assert (
        "forge: rollout worker 1 restarted on node b (10.0.0.3) at sandbox level 1 (was 2; there: bwrap not found)"
        in err
    )
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["sandbox"]["level"] == 1
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["sandbox_level"] for row in rows] == [2.0, 1.0]


def test_an_async_run_asks_the_level_of_a_worker_it_sees_come_back(ray_session, tmp_path, capsys):
    from forge.run.async_ import AsyncLoop
    from forge.sandbox.policy import SandboxReport

    run = run_recorded_at(2, [SandboxReport("a", 2), SandboxReport("b", 0, root=False)], tmp_path)
    run.cfg.env.name = "weak_worker_envs:UntrustedGuessEnv"
    loop = object.__new__(AsyncLoop)
    loop.run, loop.cfg, loop.down = run, run.cfg, {1}
    probe = run.workers[1].get_policy_version.remote()
    loop.probes = {probe: 1}
    run.tell_worker_death(1, 4)  # as AsyncLoop.worker_died tells it
    loop.probe_restarted(probe)
    err = capsys.readouterr().err
    assert (
        run.cfg.sandbox.level == 0
        and "forge: rollout worker 1 restarted on node b at sandbox level 0 (was 2)" in err
    )
    assert "untrusted code at level 0 on node b" in err  # it was allowed there: warned as at start
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["sandbox"]["level"] == 0


def test_a_worker_that_refuses_to_restart_on_a_weaker_node_stops_the_run_with_its_refusal():
    from ray.exceptions import ActorDiedError

    from forge.run.faults import worker_gone_message

    class RefusedRestart(ActorDiedError):  # what Ray raises once a restart's __init__ raised
        actor_init_failed = True

        def __str__(self) -> str:
            return (
                "The actor died because of an error raised in its creation task, class_name: RolloutWorker\n"
                'ray::RolloutWorker.__init__()\n  File "worker.py", line 70, in __init__\n    raise\n'
                "forge.sandbox.policy.WorkerSandboxRefused: rollout worker 1 on node b: sandbox.min_level=2, "
                "but this host offers only level 1"
            )

    message = worker_gone_message(1, 3, RefusedRestart())
    assert message == (
        "rollout worker 1 could not restart, so the run stopped: rollout worker 1 on node b: "
        "sandbox.min_level=2, but this host offers only level 1"
    )
