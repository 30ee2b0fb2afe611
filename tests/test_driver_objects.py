"""bench.driver_objects reads the gateway driver at the same point of every step and counts
its objects every N steps; what it reports as growing."""

from __future__ import annotations

from collections import Counter

from bench.driver_objects import growth, heap_mb, hooked, private_mb


def test_every_step_end_is_read_and_every_nth_counts_objects():
    released = []
    readings: list[dict] = []
    counts: list[dict] = []
    release = hooked(lambda: released.append(1) or True, 3, readings, counts)
    assert all(release() for _ in range(7))
    assert len(released) == 7
    assert [r["step"] for r in readings] == list(range(1, 8))
    assert all(r["private_mb"] > 0 for r in readings)
    assert [c["step"] for c in counts] == [3, 6]
    assert counts[0]["by_type"]["function"] > 0 and counts[0]["objects"] == sum(counts[0]["by_type"].values())


def test_the_types_that_grew_most_after_the_warm_up_come_first():
    samples = [
        {"step": 100, "by_type": Counter(dict=500, list=10)},  # warm-up: left out
        {"step": 400, "by_type": Counter(dict=1000, list=10, Episode=5)},
        {"step": 1400, "by_type": Counter(dict=1002, list=9, Episode=805, Task=1)},
    ]
    grown = growth(samples)
    assert list(grown) == ["Episode", "dict", "Task"]
    assert grown["Episode"] == {"from": 5, "to": 805, "per_1000_steps": 800.0}


def test_the_heap_and_private_memory_are_read_on_this_machine():
    assert private_mb() > 10
    heap = heap_mb()
    assert heap == {} or heap["in_use_mb"] > 0  # {} where the C library has no mallinfo2
