"""What a gateway run's driver keeps from step to step: `forge train` in this process, its
memory read at the same point of every step (right after the step's end hands freed heap
back, `forge.heap.release_free_heap`), and its Python objects counted by type every N steps.

Outside the process a soak samples the driver at random phases of a step that swings it by
up to 80 MB; here every reading is at the same point of a step, after the step's garbage is
freed, so a slope through them is what the driver keeps. Prints one JSON object and writes
bench/results/driver_objects.json: the private memory and glibc heap in use per step
(thinned), their slopes per 1,000 steps over the second half, and the object types whose
count grew most between the count after a quarter of the steps and the last.

    python -m bench.driver_objects --steps 1200 --every-steps 100   # bench.soak's gateway run
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from bench.report import save_result
from bench.soak import COMMON, MODES, floor_slope_per_1000, slope_per_1000, thinned


class MallInfo2(ctypes.Structure):
    """glibc's `struct mallinfo2` (glibc 2.33+): sizes in bytes."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def heap_mb() -> dict[str, float]:
    """The C heap: bytes in use by allocations (main arena and mmapped blocks) and bytes
    freed but kept; empty where the C library has no `mallinfo2`."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):
        return {}
    mallinfo2.restype = MallInfo2
    info = mallinfo2()
    return {
        "in_use_mb": round((info.uordblks + info.hblkhd) / 2**20, 2),
        "free_mb": round(info.fordblks / 2**20, 2),
    }


def private_mb() -> float:
    """This process's anonymous resident memory (RssAnon) in MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return 0.0


def object_counts() -> tuple[Counter, int]:
    """Live objects that the cyclic collector tracks, by type name (containers, class
    instances, frames, tasks; not str, int or bytes), after a full collection: what is
    kept, not garbage in cycles waiting for the collector (closed socket transports and
    their loops' references are); and how many objects that collection freed."""
    freed = gc.collect()
    return Counter(type(o).__name__ for o in gc.get_objects()), freed


def hooked(
    release: Callable[[], bool], every_steps: int, readings: list[dict], counts: list[dict]
) -> Callable[[], bool]:
    """`release` (the gateway step's last call) followed by a reading of this process's
    memory, and every `every_steps` steps a count of its objects by type."""

    def release_and_read() -> bool:
        released = release()
        step = len(readings) + 1
        readings.append({"step": step, "private_mb": round(private_mb(), 2), **heap_mb()})
        if step % every_steps == 0:
            started = time.perf_counter()
            by_type, freed = object_counts()
            counts.append(
                {
                    "step": step,
                    "objects": sum(by_type.values()),
                    "garbage_collected": freed,
                    "count_s": round(time.perf_counter() - started, 2),
                    "by_type": by_type,
                }
            )
        return released

    return release_and_read


def growth(samples: list[dict], top: int = 15) -> dict[str, dict]:
    """The types whose count grew most from the first sample at or after a quarter of the
    steps to the last: count there, count at the end, growth per 1,000 steps."""
    last = samples[-1]
    first = next(s for s in samples if s["step"] >= last["step"] / 4)
    span = max(last["step"] - first["step"], 1)
    grown = {
        name: (first["by_type"].get(name, 0), count)
        for name, count in last["by_type"].items()
        if count > first["by_type"].get(name, 0)
    }
    ranked = sorted(grown.items(), key=lambda item: item[1][1] - item[1][0], reverse=True)[:top]
    return {
        name: {
            "from": start,
            "to": end,
            "per_1000_steps": round(1000 * (end - start) / span, 1),
        }
        for name, (start, end) in ranked
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--every-steps", type=int, default=100, help="steps between object counts")
    parser.add_argument("--out", default="bench/results/driver_objects.json")
    parser.add_argument(
        "train_args", nargs="*", help="a gateway run's config and overrides (default: bench.soak's)"
    )
    args = parser.parse_args()
    import forge.run.gateway
    from forge.cli import main as forge_main

    train_args = [*(args.train_args or MODES["gateway"]), *COMMON, f"train.max_steps={args.steps}"]
    run_dir = Path(tempfile.mkdtemp(prefix="forge-driver-objects-")) / "run"
    readings: list[dict] = []
    counts: list[dict] = []
    forge.run.gateway.release_free_heap = hooked(
        forge.run.gateway.release_free_heap, args.every_steps, readings, counts
    )
    started = time.monotonic()
    code = forge_main(["train", *train_args, "--output-dir", str(run_dir)])
    if code != 0 or len(counts) < 2:
        raise SystemExit(
            f"bench.driver_objects: forge train exited {code} after {len(readings)} gateway steps "
            f"({len(counts)} object counts; a gateway run with --steps of at least 2 x --every-steps)"
        )
    slopes = {}
    for key in ("private_mb", "in_use_mb", "free_mb"):
        points = [(r["step"], r[key]) for r in readings if key in r]
        slopes[key] = {
            "start": points[len(points) // 2][1],
            "end": points[-1][1],
            "slope_per_1000_steps": round(slope_per_1000(points), 2),
            "floor_slope_per_1000_steps": round(floor_slope_per_1000(points), 2),
        }
    result = {
        "bench": "driver_objects",
        "train_args": train_args,
        "wall_s": round(time.monotonic() - started, 1),
        "load_avg": round(os.getloadavg()[0], 1),
        "second_half": slopes,
        "readings": thinned(readings),
        "counts": [{k: v for k, v in c.items() if k != "by_type"} for c in counts],
        "growing_types": growth(counts),
    }
    print(json.dumps(result))
    save_result(result, Path(args.out))


if __name__ == "__main__":
    main()
