"""A run's sandbox policy: untrusted code is refused at level 0 unless the user opts in, and
every run says its level on the console, in config.yaml and in its metrics."""

from __future__ import annotations

import json

import pytest
import yaml

from forge import sandbox
from forge.config import load_config
from forge.sandbox import cgroup, levels, policy, uids

BEST = sandbox.available_level()


@pytest.fixture
def host_level(monkeypatch):
    """Pretend the host offers a given level; the process's policy is restored afterwards."""
    monkeypatch.setattr(levels, "_floor", 0)
    monkeypatch.setattr(levels, "_floor_reason", "")
    monkeypatch.setattr(levels, "_python", None)
    monkeypatch.setattr(cgroup, "_allowed", False)  # configure() sets it: restored afterwards

    def offer(level: int) -> None:
        monkeypatch.setattr(levels, "_level", level)

    return offer


def test_the_builtin_envs_that_run_model_code_declare_it():
    from forge_envs.countdown import CountdownEnv
    from forge_envs.file_search import FileSearchEnv
    from forge_envs.python_coding import PythonCodingEnv

    assert PythonCodingEnv.runs_untrusted_code and FileSearchEnv.runs_untrusted_code
    assert not CountdownEnv.runs_untrusted_code


def test_untrusted_code_is_refused_at_level_0_naming_the_opt_in(host_level):
    host_level(0)
    with pytest.raises(sandbox.SandboxUnavailable, match="python_coding.*sandbox.allow_level_0: true"):
        policy.configure(untrusted=True, env_name="python_coding")


def test_opting_in_runs_level_0_with_a_console_warning(host_level, capsys):
    host_level(0)
    assert policy.configure(untrusted=True, allow_level_0=True, env_name="file_search") == 0
    policy.announce(0, untrusted=True, env_name="file_search")
    err = capsys.readouterr().err
    assert "forge: sandbox level 0 (rlimits+uid)" in err
    assert "WARNING: env 'file_search' runs untrusted code at level 0 because sandbox.allow_level_0" in err
    assert "Ray's included" in err and "the internet" in err
    assert f"forge: no sandbox level contains this: {policy.not_contained()}" in err


def test_the_level_0_warning_without_root_says_the_code_runs_as_the_harness_user(
    host_level, capsys, monkeypatch
):
    monkeypatch.setattr(policy.uids, "is_root", lambda: False)
    host_level(0)
    policy.announce(0, untrusted=True, env_name="python_coding")
    err = capsys.readouterr().err
    assert "uid of its own" not in err and "rlimits+uid" not in err
    assert err.startswith("forge: sandbox level 0 (rlimits only, as the harness's own user)\n")
    assert (
        "runs as this harness's own user" in err
        and "environment variables" in err
        and "kill or ptrace the harness" in err
        and "the internet" in err
    )


def test_below_level_2_the_warning_says_why_each_stronger_level_failed_here(monkeypatch, capsys):
    monkeypatch.setattr(levels, "_level", None)
    monkeypatch.setattr(levels, "_unavailable", {})
    reasons = {2: "bwrap not found", 1: "PermissionError: [Errno 1] unshare: Operation not permitted"}
    monkeypatch.setattr(levels, "_works", lambda level: (level == 0, reasons.get(level, "")))
    assert sandbox.probe() == 0
    policy.announce(0, untrusted=False, env_name="countdown")
    err = capsys.readouterr().err
    assert "below bubblewrap's (2): level 2 needs bubblewrap" in err and "(here: bwrap not found)" in err
    assert "level 1 is unavailable too: level 1 needs unprivileged user namespaces" in err
    here = "(here: PermissionError: [Errno 1] unshare: Operation not permitted"
    # A root harness also tried building level 1 with its own capabilities, and says how that failed.
    assert here + ("; as root without a user namespace: PermissionError" if uids.is_root() else ")") in err
    # Ubuntu 23.10+ lets unshare succeed but AppArmor takes the namespace's capabilities (mount fails).
    assert "kernel.apparmor_restrict_unprivileged_userns=0" in err
    with pytest.raises(sandbox.SandboxUnavailable, match=r"\(here: PermissionError: \[Errno 1\] unshare"):
        policy.configure(untrusted=True, env_name="python_coding")


def test_trusted_envs_may_run_at_level_0_with_a_warning(host_level, capsys):
    host_level(0)
    assert policy.configure(untrusted=False) == 0
    policy.announce(0, untrusted=False, env_name="countdown")
    err = capsys.readouterr().err
    assert "below bubblewrap's (2)" in err and "untrusted" not in err
    # What sandboxed code may do at level 0 is said whether or not the env declares it untrusted.
    assert f"forge: WARNING: {policy.level_0_risk()}" in err


def test_level_2_states_only_what_no_level_contains(host_level, capsys):
    host_level(2)
    lines = policy.announce(2, untrusted=True, env_name="python_coding")
    assert lines == [
        "forge: sandbox level 2 (bubblewrap)",
        f"forge: no sandbox level contains this: {policy.not_contained()}",
    ]
    assert "per process, not per call" in lines[1] and "64 GiB together" in lines[1] and "kernel" in lines[1]


def test_with_a_cgroup_per_call_the_start_message_says_what_it_caps_and_what_it_does_not(
    host_level, monkeypatch
):
    host_level(2)
    monkeypatch.setattr(cgroup, "enabled", lambda: True)
    lines = policy.announce(2, untrusted=True, env_name="python_coding")
    assert lines == [
        "forge: sandbox level 2 (bubblewrap)",
        f"forge: {policy.CALL_CGROUP}",
        f"forge: no sandbox level contains this: {policy.NOT_CONTAINED_WITH_CALL_CGROUP}",
    ]
    assert "per process, not per call" not in " ".join(lines) and "call_cpus" in lines[2]


def test_without_a_cgroup_per_call_the_start_message_says_why(host_level):
    host_level(2)
    assert policy.not_contained().endswith("(no cgroup per call here: sandbox.call_cgroup is false)")


def test_level_1_says_it_keeps_in_what_level_2_does_and_how_to_get_bubblewrap(host_level, monkeypatch):
    host_level(1)
    monkeypatch.setattr(levels, "_unavailable", {2: "bwrap not found"})
    lines = policy.announce(1, untrusted=True, env_name="python_coding")
    assert lines[0] == "forge: sandbox level 1 (namespaces (user, mount, pid, net))"
    assert lines[1] == f"forge: no sandbox level contains this: {policy.not_contained()}"
    assert lines[2].startswith(
        f"forge: {policy.LEVEL_1_AS_2}; for bubblewrap itself: level 2 needs bubblewrap"
    )
    assert lines[2].endswith("(here: bwrap not found)") and len(lines) == 3
    assert not any("WARNING" in line for line in lines)


@pytest.mark.skipif(BEST < 1, reason="needs a host with level 1 or more")
def test_after_the_policy_a_forced_level_0_call_is_refused_with_the_reason(host_level):
    host_level(BEST)
    assert policy.configure(untrusted=True, env_name="python_coding") == BEST
    with pytest.raises(sandbox.SandboxUnavailable, match="'python_coding' runs untrusted code"):
        sandbox.run("print(1)", level=0)


def test_a_bad_sandbox_python_fails_at_start(host_level):
    host_level(BEST)
    with pytest.raises(sandbox.SandboxUnavailable, match="sandbox.python='/no/such/python'"):
        policy.configure(
            untrusted=True, allow_level_0=True, python="/no/such/python", env_name="python_coding"
        )


def test_a_training_run_refuses_untrusted_code_at_level_0_before_starting_anything(host_level, tmp_path):
    from forge.run.launch import train

    host_level(0)
    cfg = load_config("configs/smoke.yaml", ["env.name=python_coding", "env.kwargs={}", "train.max_steps=1"])
    with pytest.raises(sandbox.SandboxUnavailable, match="allow_level_0"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("dry_run", [False, True])
def test_forge_train_refuses_untrusted_code_at_level_0_in_one_message(host_level, tmp_path, capsys, dry_run):
    from forge.cli import main

    host_level(0)
    args = ["train", "configs/smoke.yaml", "env.name=python_coding", "env.kwargs={}", "train.max_steps=1",
            "--output-dir", str(tmp_path / "run")]  # fmt: skip
    code = main(args + (["--dry-run"] if dry_run else []))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "forge: env 'python_coding' runs untrusted code" in err and "sandbox.allow_level_0: true" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_dry_run_accepts_level_0_for_untrusted_code_when_allowed(host_level, capsys):
    from forge.cli import main

    host_level(0)
    code = main(["train", "configs/smoke.yaml", "env.name=python_coding", "env.kwargs={}",
                 "sandbox.allow_level_0=true", "--dry-run"])  # fmt: skip
    assert code == 0, capsys.readouterr().err


@pytest.mark.slow
def test_a_run_prints_its_level_and_writes_it_to_config_and_metrics(ray_session, tmp_path, capfd):
    from forge.run.launch import train

    cfg = load_config(
        "configs/smoke.yaml", ["train.max_steps=1", "rollout.tasks_per_step=1", "rollout.num_workers=1"]
    )
    train(cfg, tmp_path / "run", progress=False)
    assert f"forge: sandbox level {BEST} ({sandbox.LEVEL_NAMES[BEST]})" in capfd.readouterr().err
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert written["sandbox"]["level"] == BEST
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["sandbox_level"] for row in rows] == [float(BEST)]


def test_forge_eval_prints_its_level_and_reports_it(tiny_checkpoint, tmp_path, capsys):
    from forge.cli import main

    config = tmp_path / "eval.yaml"
    config.write_text(
        "env: {name: guess_number, kwargs: {n: 4}}\nrollout: {max_turns: 2, max_new_tokens: 1}\n"
    )
    code = main(["eval", str(config), "--checkpoint", str(tiny_checkpoint), "--episodes", "1", "--tasks", "1",
                 "--no-progress"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0 and json.loads(captured.out)["sandbox_level"] == BEST
    assert f"forge: sandbox level {BEST}" in captured.err
