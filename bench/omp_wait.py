"""Why 2 torch threads decoded ~10x slower than 1 on a crowded 2-core machine, and faster inside
`asyncio.to_thread` (bench/results/generation-threads2.json): OpenMP's spin-waiting.

The same elementwise op (4M floats, x * 2 summed, 30 times) on the calling thread and inside
`asyncio.to_thread`, at 1 thread, 2 threads, and 2 threads with OMP_WAIT_POLICY=PASSIVE, each
in a fresh process (the policy is read at start), alternated for `--rounds` rounds. Wall and
process CPU seconds; a thread that spins while its partner waits for a core burns CPU that
the work needed.

    python -m bench.omp_wait [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from bench.report import save_result

RESULTS = Path(__file__).parent / "results"
PROBE = """
import asyncio, json, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
x = torch.randn(4_000_000)
def timed(n=30):
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        (x * 2).sum()
    return [round(time.perf_counter() - wall, 3), round(time.process_time() - cpu, 3)]
timed(2)
print(json.dumps({"calling_thread": timed(), "to_thread": asyncio.run(asyncio.to_thread(timed))}))
"""
WAYS = {
    "1_thread": ("1", {}),
    "2_threads": ("2", {}),
    "2_threads_passive": ("2", {"OMP_WAIT_POLICY": "PASSIVE"}),
}


def main(rounds: int, output: Path) -> dict:
    load_start = os.getloadavg()
    found: dict[str, list[dict]] = {name: [] for name in WAYS}
    for _ in range(rounds):
        for name, (threads, env) in WAYS.items():
            out = subprocess.run(
                [sys.executable, "-c", PROBE, threads],
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            found[name].append(json.loads(out.strip().splitlines()[-1]))
    report = {
        "what": __doc__.split("\n\n")[0],
        "cpus": os.cpu_count(),
        "load_avg_at_start": [round(x, 2) for x in load_start],
        "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
        "rounds": rounds,
        "columns": "[wall s, process CPU s] per round",
        "ways": found,
        "least_wall_s": {
            name: {where: min(r[where][0] for r in runs) for where in ("calling_thread", "to_thread")}
            for name, runs in found.items()
        },
        "least_cpu_s": {
            name: {where: min(r[where][1] for r in runs) for where in ("calling_thread", "to_thread")}
            for name, runs in found.items()
        },
    }
    save_result(report, output)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=RESULTS / "omp-wait.json")
    args = parser.parse_args()
    main(args.rounds, args.output)
