"""Sandbox overhead: wall seconds of a trivial python run at each available level, run one
at a time and many at once; where calls get a cgroup each (a root harness), one at a time
with and without it, alternated. Prints one JSON object; writes
bench/results/sandbox_latency.json.

    python -m bench.sandbox_latency
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.report import save_result
from forge import sandbox
from forge.sandbox import cgroup

RUNS = 30
CONCURRENT = 8


def timed_run(level: int) -> float:
    started = time.monotonic()
    result = sandbox.run("print('ok')", level=level, timeout_s=30)
    assert result.ok, result
    return time.monotonic() - started


def main(output: Path) -> None:
    best = sandbox.available_level()
    cgroups = cgroup.enabled()
    levels = {}
    for level in range(best + 1):
        timed_run(level)  # warm the page cache
        serial, without = [], []
        for run in range(RUNS):
            order = (True, False) if run % 2 == 0 else (False, True)
            for with_cgroup in order if cgroups else (True,):
                cgroup.set_allowed(with_cgroup)
                (serial if with_cgroup else without).append(timed_run(level))
        cgroup.set_allowed(True)
        started = time.monotonic()
        with ThreadPoolExecutor(CONCURRENT) as pool:
            list(pool.map(timed_run, [level] * RUNS))
        concurrent_wall = time.monotonic() - started
        levels[str(level)] = {
            "name": sandbox.LEVEL_NAMES[level],
            "serial_p50_s": round(statistics.median(serial), 4),
            "serial_max_s": round(max(serial), 4),
            f"runs_per_s_with_{CONCURRENT}_threads": round(RUNS / concurrent_wall, 2),
        }
        if without:
            levels[str(level)]["no_cgroup_serial_p50_s"] = round(statistics.median(without), 4)
            levels[str(level)]["cgroup_over_none"] = round(
                statistics.median(serial) / statistics.median(without), 3
            )
    result = {
        "benchmark": "sandbox_latency",
        "available_level": best,
        "runs_per_level": RUNS,
        "as_root": os.geteuid() == 0,
        "call_cgroup": cgroups or cgroup.why_not(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "levels": levels,
    }
    save_result(result, output)
    print(json.dumps(result))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).parent / "results" / "sandbox_latency.json"
    )
    main(parser.parse_args().output)
