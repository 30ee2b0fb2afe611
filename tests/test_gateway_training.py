"""Gateway episodes as training data: per-call samples, shared advantages, and a real run
where the harness starts and stops agent processes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from forge.config import load_config
from forge.gateway.episodes import CallRecord, Episode, episode_samples
from forge.reward.shaping import trajectory_advantages
from forge.types import NO_VERSION


def episode(group_id: str, outcome: float, calls: list[CallRecord]) -> Episode:
    played = Episode(f"ep-{group_id}-{outcome}", {"task_id": group_id}, group_id, None, "obs")
    played.calls, played.outcome, played.finished = calls, outcome, True
    return played


def call(prompt: list[int], completion: list[int]) -> CallRecord:
    return CallRecord(prompt, completion, [-0.1] * len(completion), 3, True)


def test_each_call_is_a_sample_with_only_its_generated_ids_trained():
    [sample] = episode_samples([episode("g", 1.0, [call([1, 2, 3], [4, 5])])], [0.5])
    assert sample.token_ids == [1, 2, 3, 4, 5]
    assert sample.loss_mask == [0, 0, 0, 1, 1]
    assert sample.behaviour_logprobs == [0.0, 0.0, 0.0, -0.1, -0.1]
    assert sample.policy_versions == [NO_VERSION] * 3 + [3, 3]


def test_calls_of_one_episode_share_its_advantage_within_its_task_group():
    won = episode("g", 1.0, [call([1, 2], [3]), call([1, 2, 3, 9], [4])])
    lost = episode("g", 0.0, [call([1, 2], [5])])
    other = episode("h", 1.0, [call([7], [8])])
    played = [won, lost, other]
    trajectories = [e.to_trajectory(success_threshold=0.5) for e in played]
    for t in trajectories:
        t.reward = t.outcome
    advantages = trajectory_advantages(trajectories, "grpo")
    samples = episode_samples(played, advantages)
    assert [s.advantage for s in samples[:2]] == [advantages[0]] * 2
    assert advantages[0] > 0 > advantages[1]
    assert samples[-1].group_id == "h" and advantages[2] == 0.0  # alone in its group
    assert trajectories[0].num_turns == 2 and trajectories[0].generated_tokens == 2


def test_lost_episodes_and_empty_calls_give_no_samples():
    lost = episode("g", 0.0, [call([1], [2])])
    lost.status = "lost"
    empty = episode("g", 0.0, [call([1], [])])
    assert episode_samples([lost, empty], [0.0, 0.0]) == []


@pytest.fixture
def server(tiny_checkpoint):
    from forge.gateway import Gateway, GatewayServer
    from forge.gateway.episodes import EpisodeStore
    from forge.models.loading import load_tokenizer
    from forge.rollout.engines.protocol import GenerationResult

    class StopAtOnce:
        policy_version = 0

        def generate(self, requests):
            return [
                GenerationResult([tokenizer.eos_token_id], [-0.1], True, 0, len(r.token_ids))
                for r in requests
            ]

    tokenizer = load_tokenizer(tiny_checkpoint)
    gateway = Gateway(StopAtOnce(), tokenizer, EpisodeStore(), 4, 64)
    with GatewayServer(gateway) as running:
        yield running


def play(server, command: str, timeout_s: float = 30.0):
    from forge.gateway.agents import agent_argv, close_unfinished, run_agents

    episode_id = server.call(server.gateway.start_episode({"task_id": "t"}))
    exits = run_agents(agent_argv(command), [episode_id], {}, 1, timeout_s)
    close_unfinished(server, exits)
    return exits[episode_id], server.gateway.store.get(episode_id)


def test_an_agent_that_crashes_ends_its_episode_as_an_error_naming_its_stderr(server):
    agent, played = play(server, """{python} -c "raise SystemExit('no tools here')" """)
    assert agent.returncode == 1
    assert played.status == "error" and "code 1" in played.error and "no tools here" in played.error


def test_an_agent_past_its_timeout_is_killed_and_its_episode_truncated(server):
    agent, played = play(server, """{python} -c "import time; time.sleep(60)" """, timeout_s=0.5)
    assert agent.returncode is None
    assert played.status == "truncated" and "agent_timeout_s" in played.error
    assert played.to_trajectory(success_threshold=0.5).timed_out  # counted in episodes_timeout


def test_an_agent_gets_its_episode_id_as_the_api_key(server):
    agent, played = play(
        server,
        """{python} -c "import os, sys; sys.exit(os.environ['OPENAI_API_KEY'] != os.environ['FORGE_EPISODE_ID'])" """,
    )
    assert agent.returncode == 0 and played.status == "error"  # exited without finishing


@pytest.fixture(scope="module")
def gateway_run(ray_session, tmp_path_factory):
    """One step of the gateway smoke config, checkpointed, run from a folder outside the
    repository (the built-in agent is a module: no repository folder needed). What the smoke
    test checks is read here, before the resume test goes on in the same folder."""
    from forge.run.launch import train

    folder = tmp_path_factory.mktemp("gateway_run")
    # Every call trains (none skipped for a zero advantage), so the packing of a group's calls
    # shows; one step may score alike: not what these tests check.
    overrides = ["rollout.group_size=2", "train.skip_zero_advantage=false", "train.max_steps_without_signal=0",
                 "train.checkpoint_every=1", "logging.tensorboard=false"]  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        result = train(
            load_config("gateway-smoke", [*overrides, "train.max_steps=1"]), folder, progress=False
        )
        agents_left = [p for p in os.listdir("/proc") if p.isdigit() and _is_agent(p, folder)]
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return folder, overrides, result, metrics, agents_left


@pytest.mark.slow
def test_gateway_smoke_config_trains_with_agent_processes(gateway_run):
    folder, _, result, [metrics], agents_left = gateway_run
    assert result.steps == 1 and (result.checkpoint / "config.json").is_file()
    assert metrics["agents_failed"] == 0 and metrics["episodes"] == 4
    assert metrics["trained_samples"] == metrics["gateway_calls"] >= 4
    assert metrics["tree_token_ratio"] > 1.0  # calls of a group share their first prompt
    assert not agents_left
    # The guard against an env stuck in C code (forge.run.gateway_guard) never fired: no report.
    assert not (folder / "stuck_workers").exists()


@pytest.mark.slow
def test_a_gateway_run_checkpoints_and_resumes(gateway_run, monkeypatch):
    import torch

    from forge.run.launch import train

    folder, overrides, _, _, _ = gateway_run
    monkeypatch.chdir(folder)
    saved = torch.load(folder / "checkpoints" / "step-000001" / "trainer.pt", weights_only=False)
    assert saved["policy_version"] == 1
    result = train(
        load_config("gateway-smoke", [*overrides, "train.max_steps=2"]), folder, progress=False, resume=True
    )
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert result.steps == 2 and [r["step"] for r in records] == [1, 2]
    assert records[1]["policy_version"] == 2.0  # the trainer went on from the checkpoint
    assert (folder / "checkpoints" / "latest").read_text().strip() == "step-000002"


def _is_agent(pid: str, cwd: Path) -> bool:
    """An agent process this test started: its agents run in the test's folder (other runs'
    agents on a shared machine do not count)."""
    try:
        return b"forge.openai_agent" in Path(f"/proc/{pid}/cmdline").read_bytes() and (
            os.readlink(f"/proc/{pid}/cwd") == str(cwd)
        )
    except OSError:
        return False


@pytest.mark.slow
def test_a_gateway_run_whose_agents_always_crash_stops_with_exit_code_1(ray_session, tmp_path, capsys):
    from forge.cli import main

    (tmp_path / "agent.py").write_text("raise RuntimeError('agent is broken')\n")
    overrides = [f"gateway.agent_command='{{python}} {tmp_path / 'agent.py'}'", "train.max_steps=20",
                 "env.error_window_steps=2", "rollout.group_size=2"]  # fmt: skip
    assert main(["train", "gateway-smoke", *overrides, "--output-dir", str(tmp_path / "run")]) == 1
    error = capsys.readouterr().err
    assert error.count("the agent exited with code 1 without finishing: RuntimeError: agent is broken") == 1
    assert "forge: stopped at step 2: 8 of 8 episodes errored over the last 2 steps" in error
    assert "Fix the agent program (gateway.agent_command)" in error
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # Step 2 stopped the run, recorded without training (no trainer keys).
    assert [(r["step"], r["agents_failed"]) for r in rows] == [(1, 4.0), (2, 4.0)]
    assert "gateway_samples" in rows[0]
    assert not {"gateway_samples", "loss", "policy_loss", "trained_samples"} & set(rows[1])


@pytest.mark.slow
def test_a_gateway_run_whose_trainer_cannot_load_the_model_stops_before_any_agent(
    ray_session, tmp_path, capsys, monkeypatch, tiny_checkpoint
):
    # The driver's engine loads the model; the trainer actor's copy is one transformers does
    # not know (as on a trainer node with another transformers). Waiting for the first
    # training step, every agent of step 1 would play first.
    import shutil

    import forge.run.gateway
    from forge.cli import main
    from forge.run.context import make_trainer

    broken = tmp_path / "unknown_family"
    shutil.copytree(tiny_checkpoint, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "model_type": "no_such_family"}))
    monkeypatch.setattr(forge.run.gateway, "make_trainer", lambda cfg, _source: make_trainer(cfg, broken))
    played = tmp_path / "played"
    (tmp_path / "agent.py").write_text(f"open({str(played)!r}, 'a').write('x')\n")
    agent = f"gateway.agent_command='{{python}} {tmp_path / 'agent.py'}'"
    assert main(["train", "gateway-smoke", agent, "--output-dir", str(tmp_path / "run")]) == 1
    error = capsys.readouterr().err
    stopped = "forge: the trainer could not start, so the run stopped before its first step: "
    assert stopped in error and "no_such_family" in error.split(stopped)[1]
    assert not played.exists()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_a_gateway_run_masking_cut_replies_trains_no_call_of_an_episode_with_one(
    ray_session, tmp_path, monkeypatch
):
    """train.mask_truncated in gateway runs: an episode with a call cut at its token limit
    gives no sample, whichever of its calls was cut (the smoke agent's replies are 4 tokens)."""
    from forge.run import gateway as gateway_run
    from forge.run.launch import train

    handed: list[list[Episode]] = []
    original = gateway_run.episode_samples

    def capture(episodes, advantages):
        handed.append(list(episodes))
        return original(episodes, advantages)

    monkeypatch.setattr(gateway_run, "episode_samples", capture)
    cfg = load_config("configs/gateway-smoke.yaml", ["train.max_steps=2", "train.mask_truncated=true",
                      "train.max_steps_without_signal=0", "logging.progress_bar=false"])  # fmt: skip
    train(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["trained_samples"] for row in rows] == [0.0, 0.0]
    assert all(row["episodes_reply_cut"] == row["episodes"] > 0 for row in rows)
    assert handed == [[], []]  # no episode reached the samples
