"""What a run's driver process keeps: `forge train` run in this process while a thread counts
its Python objects by type (`gc.get_objects()`, after a full collection) and reads glibc's
heap statistics every N steps.

Prints one JSON object: per sample the step, private memory, the heap's bytes in use and
free, and at the end the object types whose count grew most between the sample after the
warm-up (a quarter of the steps) and the last one, with the growth per 1,000 steps.

    python -m bench.driver_objects --steps 800 --every-steps 100   # bench.soak's gateway run
    python -m bench.driver_objects --steps 800 -- smoke train.mode=async   # another run
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from bench.soak import COMMON, MODES, steps_done


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


def watch(run_dir: Path, every_steps: int, samples: list[dict], stop: threading.Event) -> None:
    """Every `every_steps` steps of the run writing to `run_dir`: one sample into `samples`."""
    next_step = every_steps
    while not stop.wait(0.5):
        step = steps_done(run_dir)
        if step < next_step:
            continue
        next_step = step - step % every_steps + every_steps
        started = time.perf_counter()
        counts, freed = object_counts()
        samples.append(
            {
                "step": step,
                "private_mb": round(private_mb(), 1),
                **heap_mb(),
                "objects": sum(counts.values()),
                "garbage_collected": freed,
                "count_s": round(time.perf_counter() - started, 2),
                "by_type": counts,
            }
        )


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
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--every-steps", type=int, default=100)
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument(
        "train_args", nargs="*", help="forge train's config and overrides (default: bench.soak's gateway run)"
    )
    args = parser.parse_args()
    from forge.cli import main as forge_main

    train_args = [*(args.train_args or MODES["gateway"]), *COMMON, f"train.max_steps={args.steps}"]
    run_dir = Path(tempfile.mkdtemp(prefix="forge-driver-objects-")) / "run"
    samples: list[dict] = []
    stop = threading.Event()
    watcher = threading.Thread(target=watch, args=(run_dir, args.every_steps, samples, stop), daemon=True)
    watcher.start()
    try:
        code = forge_main(["train", *train_args, "--output-dir", str(run_dir)])
    finally:
        stop.set()
        watcher.join()
    if code != 0 or len(samples) < 2:
        raise SystemExit(f"bench.driver_objects: forge train exited {code} with {len(samples)} samples")
    result = {
        "bench": "driver_objects",
        "train_args": train_args,
        "samples": [{k: v for k, v in s.items() if k != "by_type"} for s in samples],
        "growing_types": growth(samples),
    }
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
