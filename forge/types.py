"""The data contract between rollout, pool, reward, tree and trainer.

Plain dataclasses of Python lists and scalars: they cross Ray process boundaries,
so nothing here may hold a tensor, a model or an actor handle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# How an episode ended. Only "ok" and "truncated" episodes are learning signal;
# "error" (the env raised) is a failed episode; "lost" (a worker died) is infra and
# is kept out of group statistics.
EpisodeStatus = Literal["ok", "truncated", "error", "lost"]

NO_VERSION = -1  # policy version of tokens the model did not generate

# How the error of an episode cut short by a time limit begins (`Trajectory.timed_out`).
TIMEOUT = "timeout:"


@dataclass
class Turn:
    """One model call and the observation that answered it.

    `[start, end)` indexes the trajectory's `token_ids` for the tokens the model
    generated in this turn; `obs_end` is one past the observation tokens that follow.
    """

    start: int
    end: int
    obs_end: int
    generation_seconds: float = 0.0
    env_seconds: float = 0.0
    truncated: bool = False  # generation hit max_new_tokens


@dataclass
class Trajectory:
    """One episode, token-in-token-out: `token_ids` are exactly what the model saw and
    generated, never decoded and re-tokenized.

    Per-token lists all have `len(token_ids)` entries. Tokens the model generated have
    `loss_mask == 1`, their sampling logprob in `behaviour_logprobs` and the policy
    version that produced them in `policy_versions`; every other token has mask 0,
    logprob 0.0 and version `NO_VERSION`.
    """

    task_id: str
    group_id: str
    token_ids: list[int]
    loss_mask: list[int]
    behaviour_logprobs: list[float]
    policy_versions: list[int]
    prompt_length: int
    turns: list[Turn] = field(default_factory=list)
    outcome: float = 0.0  # the env's reward, before shaping
    reward: float = 0.0  # outcome + shaping, filled in by forge.reward
    success: bool = False
    status: EpisodeStatus = "ok"
    error: str | None = None
    wall_seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    # Agent clusters: the episodes this one started with the spawn tool, in spawn order. A
    # sub-agent's `parent_turn` is the index of its parent's turn whose tool call started it,
    # `depth` its level (the orchestrator is 0).
    subagents: list[Trajectory] = field(default_factory=list)
    parent_turn: int | None = None
    depth: int = 0

    def __post_init__(self) -> None:
        n = len(self.token_ids)
        for name in ("loss_mask", "behaviour_logprobs", "policy_versions"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"Trajectory.{name} has {len(getattr(self, name))} entries, "
                    f"token_ids has {n}: per-token lists must be the same length"
                )

    @property
    def num_turns(self) -> int:
        return len(self.turns)

    @property
    def timed_out(self) -> bool:
        """Cut short by a time limit (an env call's, the episode's, an agent's, a sub-agent's):
        its error reads "timeout: ..."."""
        return self.status == "truncated" and bool(self.error) and self.error.startswith(TIMEOUT)

    @property
    def reply_cut(self) -> bool:
        """A reply of the episode was cut at `rollout.max_new_tokens`: it ended without the
        model's end of turn (`train.mask_truncated` leaves such episodes out of the loss)."""
        return any(turn.truncated for turn in self.turns)

    @property
    def generated_tokens(self) -> int:
        return sum(self.loss_mask)

    @property
    def tool_seconds(self) -> float:
        return sum(t.env_seconds for t in self.turns)

    @property
    def critical_steps(self) -> int:
        """Steps on the episode's critical path: for each turn, 1 plus the longest (in critical
        steps) sub-agent run it started. Equals `num_turns` for an episode without sub-agents;
        sub-agents that run beside a longer one add nothing."""
        longest = [0] * len(self.turns)
        for sub in self.subagents:
            if sub.parent_turn is not None and 0 <= sub.parent_turn < len(longest):
                longest[sub.parent_turn] = max(longest[sub.parent_turn], sub.critical_steps)
        return sum(1 + extra for extra in longest)

    @property
    def total_steps(self) -> int:
        """Turns of this episode and of every sub-agent under it."""
        return self.num_turns + sum(sub.total_steps for sub in self.subagents)

    @property
    def critical_seconds(self) -> float:
        """Time on the critical path: the episode's model and tool time, where a spawn call's
        tool time is its wait for the slowest of the sub-agents it ran concurrently."""
        return sum(t.generation_seconds + t.env_seconds for t in self.turns)

    def all_subagents(self) -> list[Trajectory]:
        """Every sub-agent under this episode, depth first (a sub-agent before its own)."""
        found: list[Trajectory] = []
        for sub in self.subagents:
            found.append(sub)
            found.extend(sub.all_subagents())
        return found


@dataclass
class Sample:
    """One training sequence: a whole trajectory, or one model call of an agent episode
    (gateway), with the advantage it is trained with."""

    token_ids: list[int]
    loss_mask: list[int]
    behaviour_logprobs: list[float]
    policy_versions: list[int]
    advantage: float
    group_id: str = ""

    def __post_init__(self) -> None:
        n = len(self.token_ids)
        if not (len(self.loss_mask) == len(self.behaviour_logprobs) == len(self.policy_versions) == n):
            raise ValueError("Sample per-token lists must all have len(token_ids) entries")

    @classmethod
    def from_trajectory(cls, trajectory: Trajectory, advantage: float) -> Sample:
        """The trajectory up to its last trained token: what follows (the env's last
        observation, the eos closing a cut reply) moves no logprob the loss reads, and can
        run past the context the episode kept to (rollout.max_context_tokens, a model's
        learned positions), which the trainer's forward cannot hold."""
        end = max((i + 1 for i, trained in enumerate(trajectory.loss_mask) if trained), default=0)
        return cls(
            token_ids=list(trajectory.token_ids[:end]),
            loss_mask=list(trajectory.loss_mask[:end]),
            behaviour_logprobs=list(trajectory.behaviour_logprobs[:end]),
            policy_versions=list(trajectory.policy_versions[:end]),
            advantage=advantage,
            group_id=trajectory.group_id,
        )
