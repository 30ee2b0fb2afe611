"""DataPool: between asynchronous rollout and the trainer (run it as a Ray actor).

Groups are numbered in generation order when they are launched (`reserve`), arrive in
any order (`put`), and leave as training batches (`take`) through a windowed FIFO: a
finished group may be taken only while it lies within `window` positions of the oldest
group not yet taken, so a straggler holds back at most a window's worth of newer data.
`window="fifo"` is a strict FIFO (a window of one group: groups leave in generation order);
`window="none"` has no window (any finished groups, oldest first, whatever is still out).
Groups whose oldest generated token is more than `max_staleness` policy versions behind
the trainer are dropped and counted. `reserve` refuses once `capacity` groups are in
flight or waiting (by default as many as the staleness bound lets train): that is the
back-pressure that pauses rollout when the trainer lags; `reserve_all` also holds back
groups the staleness bound would drop before their turn.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from forge.types import NO_VERSION, Sample, Trajectory


def generated_versions(trajectories: list[Trajectory]) -> list[int]:
    """The policy version of every token the model generated in `trajectories`."""
    return [v for t in trajectories for v in t.policy_versions if v != NO_VERSION]


def group_version(trajectories: list[Trajectory]) -> int | None:
    """The oldest policy version that generated any token of the group (None: no tokens)."""
    versions = generated_versions(trajectories)
    return min(versions) if versions else None


def staleness_metrics(
    batch: list[list[Trajectory]], at_version: int, trained: list[Sample]
) -> dict[str, float]:
    """How many policy versions `batch` lags a trainer at `at_version`: per group (its oldest
    token; a group without generated tokens counts as fresh) and per token of `trained`, the
    samples the step trains on (sub-agents' too, with swarm.train_subagents)."""
    versions = [group_version(g) for g in batch]
    lags = [0 if v is None else at_version - v for v in versions]
    # Per token, the distribution actually trained on: an episode that spanned weight
    # updates holds tokens of several versions. Counted from the samples, not the batch's
    # episodes, whose sub-agents train as samples of their own.
    token_lags = Counter(
        at_version - v
        for sample in trained
        for v, mask in zip(sample.policy_versions, sample.loss_mask, strict=True)
        if mask and v != NO_VERSION
    )
    return {
        "staleness_mean": sum(lags) / len(lags),
        "staleness_max": float(max(lags)),
        **{f"staleness_tokens/{lag}": float(n) for lag, n in sorted(token_lags.items())},
    }


DEFAULT_WINDOW = 0.3  # async.window's default, as a fraction of the batch


def window_groups(window: float | str, batch_groups: int) -> int | None:
    """The window in groups: a fraction of the batch rounded up (at least 1), 1 for
    "fifo", None (unbounded) for "none"."""
    if window == "fifo":
        return 1
    if window == "none":
        return None
    if isinstance(window, str) or not 0 < window <= 1:
        raise ValueError(
            f"DataPool window={window!r}: give a fraction of the batch in (0, 1], 'fifo' or 'none'"
        )
    return max(1, math.ceil(window * batch_groups))


class DataPool:
    def __init__(
        self,
        batch_groups: int,
        max_staleness: int,
        window: float | str = DEFAULT_WINDOW,
        capacity_groups: int | None = None,
    ) -> None:
        if batch_groups < 1:
            raise ValueError(f"DataPool batch_groups={batch_groups} must be at least 1")
        self.batch_groups = batch_groups
        self.max_staleness = max_staleness
        self.window = window_groups(window, batch_groups)
        # By default as many groups as the staleness bound lets train (`reserve_all` holds
        # back the rest): on the straggler workload 16 groups in flight for batches of 8
        # made 2.15x sync's steps per minute against 1.31x with the earlier default of a
        # batch plus the window (11), in the same bench run (bench/stragglers.py). The
        # window then only says which finished groups may leave.
        self.capacity = capacity_groups or (max_staleness + 1) * batch_groups
        if self.capacity < batch_groups:
            raise ValueError(
                f"DataPool capacity {self.capacity} cannot hold one batch of {batch_groups} groups"
            )
        self._next_seq = 0
        self._open: set[int] = set()  # launched, not yet put
        self._ready: dict[int, list[Trajectory]] = {}  # put, not yet taken
        self.dropped_stale = 0
        self.dropped_empty = 0
        self.dropped_no_signal = 0
        self.taken = 0

    def reserve(self) -> int | None:
        """A generation-order number for a group about to be launched, or None when the
        pool is full (rollout should wait for the trainer)."""
        if len(self._open) + len(self._ready) >= self.capacity:
            return None
        seq = self._next_seq
        self._next_seq += 1
        self._open.add(seq)
        return seq

    def reserve_all(self, steps_queued: int = 0) -> list[int]:
        """Numbers for as many groups as the pool has room for (one call for the driver),
        leaving out groups that would be dropped as stale before they could be trained.

        Groups are trained in generation order, a batch per step, after the `steps_queued`
        steps already submitted to the trainer (the one running included). A group launched
        now at backlog position p (the groups reserved and not yet taken come first) is
        trained `steps_queued + p // batch_groups` versions after the weights it is
        generated with; past `max_staleness` it would only be generated to be dropped."""
        horizon = (self.max_staleness - steps_queued + 1) * self.batch_groups
        seqs = []
        while len(self._open) + len(self._ready) < horizon and (seq := self.reserve()) is not None:
            seqs.append(seq)
        return seqs

    def put(self, seq: int, trajectories: list[Trajectory]) -> None:
        """The finished group `seq`. Lost episodes are left out; a group with no played
        episode is dropped."""
        if seq not in self._open:
            raise KeyError(f"group {seq} was never reserved or was already put")
        self._open.discard(seq)
        played = [t for t in trajectories if t.status != "lost"]
        if not played:
            self.dropped_empty += 1
            return
        self._ready[seq] = played

    def discard(self, seq: int) -> None:
        """The finished group `seq` is left out by the driver: it has no learning signal
        (`rollout.max_rounds_per_step`, `forge.run.rounds`); its slot is free again."""
        if seq not in self._open:
            raise KeyError(f"group {seq} was never reserved or was already put")
        self._open.discard(seq)
        self.dropped_no_signal += 1

    def put_all(self, seqs: list[int], groups: list[list[Trajectory]]) -> None:
        """`put` for each of several finished groups (one call for the driver)."""
        for seq, trajectories in zip(seqs, groups, strict=True):
            self.put(seq, trajectories)

    def _head(self) -> int | None:
        pending = self._open | self._ready.keys()
        return min(pending) if pending else None

    def take(self, trainer_version: int) -> list[list[Trajectory]] | None:
        """`batch_groups` groups for a trainer at `trainer_version`, or None (nothing is
        removed) if the window does not hold enough fresh finished groups yet."""
        oldest_allowed = trainer_version - self.max_staleness
        for seq in sorted(self._ready):
            version = group_version(self._ready[seq])
            if version is not None and version < oldest_allowed:
                del self._ready[seq]
                self.dropped_stale += 1
        head = self._head()
        if head is None:
            return None
        # Taking a group can move the head forward, which opens the window further.
        chosen: list[int] = []
        while len(chosen) < self.batch_groups:
            remaining = sorted((self._open | self._ready.keys()) - set(chosen))
            if not remaining:
                break
            limit = remaining[0] + self.window if self.window is not None else math.inf
            eligible = [seq for seq in sorted(self._ready) if seq < limit and seq not in chosen]
            if not eligible:
                break
            chosen.append(eligible[0])
        if len(chosen) < self.batch_groups:
            return None
        self.taken += len(chosen)
        return [self._ready.pop(seq) for seq in chosen]

    def exchange(
        self,
        seqs: list[int],
        groups: list[list[Trajectory]],
        trainer_version: int,
        max_takes: int,
        steps_queued: int,
        reserve: bool = True,
        discarded: list[int] | None = None,
    ) -> tuple[list[list[list[Trajectory]]], dict[str, Any], list[int]]:
        """The driver's whole turn in one round trip (each actor call costs both sides
        ~1 ms of CPU, which an async run on 2 cores pays out of training): `discard` the
        groups the driver left out, `put_all` the finished groups, take up to `max_takes`
        batches (the k-th for a trainer at `trainer_version + k`), then `reserve_all` behind the `steps_queued` steps plus the
        batches just taken, unless `reserve` is False. Returns (batches, stats, seqs)."""
        for seq in discarded or []:
            self.discard(seq)
        self.put_all(seqs, groups)
        batches: list[list[list[Trajectory]]] = []
        while len(batches) < max_takes and (batch := self.take(trainer_version + len(batches))) is not None:
            batches.append(batch)
        reserved = self.reserve_all(steps_queued + len(batches)) if reserve else []
        return batches, self.stats(), reserved

    def pending(self) -> list[int]:
        """Groups launched and not yet taken or dropped, in generation order."""
        return sorted(self._open | self._ready.keys())

    def stats(self) -> dict[str, Any]:
        return {
            "pool/in_flight": float(len(self._open)),
            "pool/ready": float(len(self._ready)),
            "pool/dropped_stale": float(self.dropped_stale),
            "pool/dropped_empty": float(self.dropped_empty),
            "pool/dropped_no_signal": float(self.dropped_no_signal),
            "pool/taken": float(self.taken),
        }
