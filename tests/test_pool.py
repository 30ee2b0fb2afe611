"""DataPool: windowed FIFO over generation order, staleness bound, back-pressure."""

from __future__ import annotations

import pytest

from forge.pool import DataPool, group_version, staleness_metrics
from forge.types import NO_VERSION, Sample, Trajectory


def episode(version: int, status: str = "ok") -> Trajectory:
    return Trajectory(
        task_id="t",
        group_id="g",
        token_ids=[1, 2, 3],
        loss_mask=[0, 1, 1],
        behaviour_logprobs=[0.0, -1.0, -1.0],
        policy_versions=[NO_VERSION, version, version],
        prompt_length=1,
        status=status,  # type: ignore[arg-type]
    )


def group(version: int = 0, size: int = 2) -> list[Trajectory]:
    return [episode(version) for _ in range(size)]


def samples(batch: list[list[Trajectory]]) -> list[Sample]:
    return [Sample.from_trajectory(t, 1.0) for g in batch for t in g]


def test_groups_leave_in_generation_order_when_all_are_finished():
    pool = DataPool(batch_groups=2, max_staleness=1, window=1.0)
    seqs = [pool.reserve() for _ in range(4)]
    for seq in reversed(seqs):
        pool.put(seq, group())
    first = pool.take(trainer_version=0)
    assert first is not None and len(first) == 2
    assert pool.stats()["pool/ready"] == 2.0


def test_a_straggler_holds_back_groups_beyond_the_window():
    pool = DataPool(batch_groups=4, max_staleness=1, window=0.5, capacity_groups=8)  # window: 2 groups
    seqs = [pool.reserve() for _ in range(6)]
    for seq in seqs[1:]:  # seqs[0] is still running
        pool.put(seq, group())
    assert pool.take(trainer_version=0) is None
    pool.put(seqs[0], group())
    batch = pool.take(trainer_version=0)
    assert batch is not None and len(batch) == 4


def test_groups_past_the_staleness_bound_are_dropped_and_counted():
    pool = DataPool(batch_groups=1, max_staleness=1, window=1.0)
    old, fresh = pool.reserve(), pool.reserve()
    pool.put(old, group(version=0))
    pool.put(fresh, group(version=2))
    batch = pool.take(trainer_version=3)
    assert batch is not None and group_version(batch[0]) == 2
    assert pool.stats()["pool/dropped_stale"] == 1.0


def test_a_group_spanning_a_sync_counts_as_its_oldest_version():
    mixed = [episode(3), episode(1)]
    assert group_version(mixed) == 1


def test_a_batch_from_policy_version_0_is_one_version_stale_for_a_trainer_at_1():
    # Version 0 (the initial weights) is a version like any other, not "no version".
    batch = [group(version=0), group(version=1)]
    metrics = staleness_metrics(batch, at_version=1, trained=samples(batch))
    assert metrics["staleness_mean"] == 0.5 and metrics["staleness_max"] == 1.0
    assert metrics["staleness_tokens/1"] == metrics["staleness_tokens/0"] == 4.0


def test_a_group_without_generated_tokens_counts_as_fresh():
    empty = [Trajectory("t", "g", [1], [0], [0.0], [NO_VERSION], prompt_length=1)]
    batch = [empty, group(version=2)]
    assert staleness_metrics(batch, at_version=3, trained=samples(batch)) == {
        "staleness_mean": 0.5,
        "staleness_max": 1.0,
        "staleness_tokens/1": 4.0,
    }


def test_reserve_refuses_when_the_pool_is_full_and_resumes_after_a_take():
    pool = DataPool(batch_groups=2, max_staleness=1, window=1.0, capacity_groups=3)
    seqs = [pool.reserve() for _ in range(3)]
    assert pool.reserve() is None
    for seq in seqs:
        pool.put(seq, group())
    assert pool.take(trainer_version=0) is not None
    assert pool.reserve() is not None


def test_lost_episodes_are_left_out_and_an_all_lost_group_is_dropped():
    pool = DataPool(batch_groups=1, max_staleness=1, window=1.0)
    partial, gone = pool.reserve(), pool.reserve()
    pool.put(partial, [episode(0), episode(0, status="lost")])
    pool.put(gone, [episode(0, status="lost")] * 2)
    batch = pool.take(trainer_version=0)
    assert batch is not None and len(batch[0]) == 1
    assert pool.stats()["pool/dropped_empty"] == 1.0


def test_put_of_an_unknown_group_is_an_error():
    pool = DataPool(batch_groups=1, max_staleness=1)
    with pytest.raises(KeyError):
        pool.put(7, group())


def test_reserve_all_numbers_groups_up_to_the_capacity_in_order():
    pool = DataPool(batch_groups=2, max_staleness=1, window=1.0, capacity_groups=3)
    assert pool.reserve_all() == [0, 1, 2]
    assert pool.reserve_all() == []


def test_reserve_all_holds_back_groups_the_staleness_bound_would_drop():
    # batch 4, room for 6, but with one step already queued only one batch can still be
    # trained within max_staleness=1 of the weights it is generated with.
    pool = DataPool(batch_groups=4, max_staleness=1, window=0.5, capacity_groups=6)
    assert pool.capacity == 6
    assert pool.reserve_all(steps_queued=2) == []
    first = pool.reserve_all(steps_queued=1)
    assert first == [0, 1, 2, 3]
    for seq in first:
        pool.put(seq, group(version=0))
    # Trained one version on (the queued step finished): all four are within the bound.
    assert len(pool.take(trainer_version=1)) == 4
    assert pool.stats()["pool/dropped_stale"] == 0.0
    # Nothing queued: the capacity is the limit again.
    assert pool.reserve_all(steps_queued=0) == [4, 5, 6, 7, 8, 9]


def test_exchange_puts_takes_and_reserves_in_one_call():
    pool = DataPool(batch_groups=2, max_staleness=2, window=1.0, capacity_groups=4)
    batches, stats, seqs = pool.exchange([], [], trainer_version=0, max_takes=2, steps_queued=0)
    assert (batches, seqs) == ([], [0, 1, 2, 3])
    assert stats["pool/in_flight"] == 4.0
    # Groups 1 and 0 arrive: one batch forms, in generation order, and the room it frees is
    # reserved in the same call.
    batches, stats, seqs = pool.exchange(
        [1, 0], [group(0, size=2), group(0, size=1)], 0, max_takes=2, steps_queued=0
    )
    assert [[len(g) for g in batch] for batch in batches] == [[1, 2]]
    assert seqs == [4, 5] and stats["pool/taken"] == 2.0
    # With the trainer queue full nothing is taken, and a dead fleet reserves nothing.
    batches, _, seqs = pool.exchange(
        [2, 3], [group(0), group(0)], 1, max_takes=0, steps_queued=1, reserve=False
    )
    assert (batches, seqs) == ([], [])
    batches, stats, _ = pool.exchange([], [], 1, max_takes=1, steps_queued=1)
    assert len(batches) == 1 and stats["pool/ready"] == 0.0


def batch_tags(batch: list[list[Trajectory]]) -> list[str]:
    return [g[0].task_id for g in batch]


def tagged(tag: str) -> list[Trajectory]:
    trajectories = group()
    for t in trajectories:
        t.task_id = tag
    return trajectories


def test_strict_fifo_waits_for_the_oldest_group_however_many_newer_ones_finished():
    pool = DataPool(batch_groups=2, max_staleness=5, window="fifo", capacity_groups=6)
    seqs = [pool.reserve() for _ in range(6)]
    for seq in seqs[1:]:
        pool.put(seq, tagged(str(seq)))
    assert pool.take(trainer_version=0) is None  # group 0 is out: nothing may pass it
    pool.put(seqs[0], tagged("0"))
    assert batch_tags(pool.take(trainer_version=0)) == ["0", "1"]
    assert batch_tags(pool.take(trainer_version=0)) == ["2", "3"]


def test_a_window_lets_a_batch_skip_a_running_group_and_fifo_does_not():
    """Group 0 finished, group 1 still running, groups 2 and 3 finished; batches of 2. A
    2-group window may take group 2 past the running group 1; a strict FIFO waits for it."""
    for window, expected in (("fifo", None), (1.0, ["0", "2"]), ("none", ["0", "2"])):
        pool = DataPool(batch_groups=2, max_staleness=5, window=window, capacity_groups=4)
        seqs = [pool.reserve() for _ in range(4)]
        for seq in (0, 2, 3):
            pool.put(seqs[seq], tagged(str(seq)))
        batch = pool.take(trainer_version=0)
        assert (batch_tags(batch) if batch else None) == expected, window


def test_only_no_window_lets_a_batch_form_while_the_oldest_group_runs():
    for window, expected in (("fifo", None), (1.0, None), ("none", ["1", "2"])):
        pool = DataPool(batch_groups=2, max_staleness=5, window=window, capacity_groups=4)
        seqs = [pool.reserve() for _ in range(3)]
        for seq in (1, 2):
            pool.put(seqs[seq], tagged(str(seq)))
        batch = pool.take(trainer_version=0)
        assert (batch_tags(batch) if batch else None) == expected, window


def test_no_window_takes_whatever_finished_first_oldest_first():
    pool = DataPool(batch_groups=2, max_staleness=5, window="none", capacity_groups=8)
    seqs = [pool.reserve() for _ in range(8)]
    for seq in (7, 3, 5):  # groups 0-2 are still running
        pool.put(seqs[seq], tagged(str(seq)))
    assert batch_tags(pool.take(trainer_version=0)) == ["3", "5"]
    assert pool.take(trainer_version=0) is None  # one finished group left, a batch needs two


def test_by_default_the_pool_holds_as_many_groups_as_the_staleness_bound_lets_train():
    for window in (0.3, "fifo", "none"):
        assert DataPool(batch_groups=8, max_staleness=1, window=window).capacity == 16
    assert DataPool(batch_groups=8, max_staleness=0).capacity == 8
    assert DataPool(batch_groups=8, max_staleness=3).capacity == 32
    assert DataPool(batch_groups=8, max_staleness=1, capacity_groups=10).capacity == 10


def test_a_window_that_is_neither_a_fraction_nor_a_mode_is_refused():
    with pytest.raises(ValueError, match="'fifo' or 'none'"):
        DataPool(batch_groups=2, max_staleness=1, window="greedy")
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        DataPool(batch_groups=2, max_staleness=1, window=1.5)


def test_a_group_the_driver_leaves_out_frees_its_slot_and_no_longer_holds_the_window():
    """Dynamic sampling in async runs: a finished group without signal is discarded, not put."""
    pool = DataPool(batch_groups=2, max_staleness=0, window="fifo")  # capacity 2
    first, second = pool.reserve(), pool.reserve()
    assert pool.reserve() is None  # full
    pool.put(second, group())
    batches, stats, reserved = pool.exchange([], [], 0, max_takes=1, steps_queued=0, discarded=[first])
    assert batches == [] and stats["pool/dropped_no_signal"] == 1.0 and stats["pool/dropped_empty"] == 0.0
    # Its slot went to a new group, and the second group heads the window.
    assert reserved == [2] and pool.pending() == [1, 2]
    pool.put(2, group())
    batch = pool.take(trainer_version=0)
    assert batch is not None and len(batch) == 2
    with pytest.raises(KeyError, match="never reserved or was already put"):
        pool.discard(first)
