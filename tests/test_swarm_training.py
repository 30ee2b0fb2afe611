"""What agent clusters hand the trainer and the metrics: sub-agents' turns as samples (with
swarm.train_subagents) under their orchestrator's advantage, merged by the prefix tree where
their prompts are shared; and the per-step swarm metrics."""

from __future__ import annotations

import pytest
from test_swarm_spawn import play

from forge.metrics import rollout_metrics, swarm_metrics
from forge.rollout.spawn import with_subagents
from forge.tree.trie import build_prefix_tree, common_prefix_length
from forge.types import Sample, Trajectory, Turn


def built(turns, success=True, subagents=(), parent_turn=None, status="ok"):
    return Trajectory("t", "g", [1, 2], [0, 1], [0.0, 0.0], [-1, 0], 1, turns=[Turn(1, 2, 2)] * turns,
                      success=success, status=status, subagents=list(subagents), parent_turn=parent_turn)  # fmt: skip


def test_without_train_subagents_only_orchestrators_train():
    team = built(2, subagents=[built(1, parent_turn=0)])
    assert with_subagents([team], [0.5], train_subagents=False) == ([team], [0.5])


def built_in(group, turns, success=True, parent_turn=0, subagents=()):
    sub = built(turns, success, subagents, parent_turn)
    sub.group_id = group
    return sub


def test_with_train_subagents_every_subagent_trains_on_its_own_outcome_within_its_group():
    nested = built_in("g/sub", 1, success=True, subagents=[built_in("g/sub/sub", 1)])
    team = built(2, subagents=[nested, built_in("g/sub", 1, success=False, parent_turn=1)])
    alone = built(3)
    lost = built(0, subagents=[built_in("h/sub", 1)], status="lost")
    for helper in team.all_subagents():
        helper.outcome = helper.reward = float(helper.success)
    episodes, advantages = with_subagents([team, alone, lost], [0.5, -0.5, 0.0], train_subagents=True)
    assert episodes[:3] == [team, alone, lost] and advantages[:3] == [0.5, -0.5, 0.0]
    assert episodes[3:] == [
        nested,
        nested.subagents[0],
        team.subagents[1],
    ]  # the lost one's helper is left out
    # grpo among the orchestrator group's helpers: the one that finished above the one that did not;
    # the nested level is a group of one (no baseline, no signal)
    assert advantages[3] > 0 > advantages[5] and advantages[4] == 0.0


def test_a_run_hands_the_trainer_subagent_samples_only_with_train_subagents():
    from forge.config import load_config
    from forge.run.context import to_samples

    helper = built_in("g/sub", 1, success=True)
    team = built(1, subagents=[helper, built_in("g/sub", 1, success=False)])
    for sub in team.subagents:
        sub.outcome = sub.reward = float(sub.success)
    trained = load_config("configs/swarm.yaml")
    assert len(to_samples([team], [1.0], trained)) == 3
    frozen = load_config(
        "configs/swarm.yaml", ["swarm.train_subagents=false", "swarm.subagent_policy=frozen"]
    )
    assert len(to_samples([team], [1.0], frozen)) == 1


def test_with_train_subagents_a_step_whose_subagents_differ_has_learning_signal():
    """Orchestrators that all scored alike, sub-agents that did not: the step trains the
    sub-agents, so the run must not count it (and stop) as one that trains nothing."""
    from forge.config import load_config
    from forge.reward.shaping import RewardShaper
    from forge.run.context import shape_rewards

    def team(*helpers_finished):
        helpers = [built_in("g/sub", 1, success=finished) for finished in helpers_finished]
        for sub in helpers:
            sub.outcome = sub.reward = float(sub.success)
        orchestrator = built(2, subagents=helpers)
        orchestrator.outcome = orchestrator.reward = 1.0
        return orchestrator

    plain = ["reward.speed.enabled=false", "reward.parl.enabled=false"]
    for train_subagents, signal in ((True, 4 / 6), (False, 0.0)):
        cfg = load_config("configs/swarm.yaml", [*plain, f"swarm.train_subagents={train_subagents}"])
        metrics, _ = shape_rewards(RewardShaper(cfg.reward), [team(True, True), team(True, False)], cfg)
        assert metrics["signal_fraction"] == pytest.approx(signal), train_subagents


def test_the_prefix_tree_merges_the_prompts_subagents_share():
    trajectory, _, _ = play(["a", "b", "c"])
    helpers = [Sample.from_trajectory(sub, 1.0).token_ids for sub in trajectory.subagents]
    shared = common_prefix_length(*[__import__("numpy").array(ids) for ids in helpers[:2]])
    # the helpers' system prompt, tools and the start of their task are one branch of the tree
    assert shared >= helpers[0].index(ord("k") + 1)  # up to "key ..." (ByteChat: id = byte + 1)
    tree = build_prefix_tree(helpers)
    separate = sum(len(ids) for ids in helpers)
    assert tree.num_nodes == separate - 2 * shared
    orchestrator = Sample.from_trajectory(trajectory, 1.0).token_ids
    assert build_prefix_tree([orchestrator, *helpers]).num_nodes == tree.num_nodes + len(orchestrator)


def test_swarm_metrics_count_spawns_their_success_and_the_critical_path():
    team = built(2, subagents=[built(1, parent_turn=0), built(3, success=False, parent_turn=0)])  # 1+3+1 = 5
    alone = built(4, success=False)
    metrics = swarm_metrics([team, alone])
    assert metrics == pytest.approx({
        "subagents_per_episode": 1.0,
        "subagent_success_rate": 0.5,
        "critical_steps_mean": (5 + 4) / 2,
        "total_steps_mean": (6 + 4) / 2,
        "parallelism": 10 / 9,
        "subagent_tool_calls_mean": 0.0,
        "subagent_tool_errors_mean": 0.0,
        "critical_steps_per_solved": 5.0,
        "total_steps_per_solved": 6.0,
    })  # fmt: skip


def counted(turns, tool_calls, tool_errors, subagents=(), parent_turn=None):
    episode = built(turns, subagents=subagents, parent_turn=parent_turn)
    episode.info = {"tool_calls": tool_calls, "tool_errors": tool_errors}
    return episode


def test_a_steps_tool_calls_count_every_level_and_the_subagents_apart():
    nested = counted(1, 2, 1, parent_turn=0)
    team = counted(
        2, 1, 0, subagents=[counted(2, 3, 1, [nested], parent_turn=0), counted(1, 1, 0, parent_turn=0)]
    )
    alone = counted(3, 4, 2)
    metrics = rollout_metrics([team, alone], swarm=True)
    assert (
        metrics["tool_calls_mean"] == (1 + 3 + 2 + 1 + 4) / 2
        and metrics["tool_errors_mean"] == (1 + 1 + 2) / 2
    )
    assert (
        metrics["subagent_tool_calls_mean"] == (3 + 2 + 1) / 2 and metrics["subagent_tool_errors_mean"] == 1.0
    )


def test_tool_counts_appear_only_for_envs_that_count_them():
    assert "tool_calls_mean" not in rollout_metrics([built(2)])
    assert rollout_metrics([counted(2, 3, 1)])["tool_calls_mean"] == 3.0


def test_swarm_metrics_appear_only_in_swarm_runs():
    episodes = [built(2)]
    assert "parallelism" not in rollout_metrics(episodes)
    assert rollout_metrics(episodes, swarm=True)["parallelism"] == 1.0
