"""A long run's resources: `forge train` for many steps in sync, async and gateway mode,
sampling every process of the run (resident memory, open fds, threads) and the run folder.

Per mode and process kind it reports the start, the end and two slopes per 1,000 steps over
the second half of the run: `slope_per_1000_steps`, least squares over every sample, and
`floor_slope_per_1000_steps`, the slope of the memory the process comes back to between
steps (the 20th percentile of each of 20 spans, Theil-Sen through them, less one rise from
one flat stretch onto another, reported as `one_time_rise_mb`). The bar (1 MB per
1,000 steps) is judged on the floor: a swing within a step is not growth, and samples taken
at random phases of a 50 MB swing make the least-squares slope noise of several MB, while
a leak raises the floor, which is what runs out over days. The run folder's growth per
1,000 steps too. Prints one JSON object and writes bench/results/soak.json (modes not run
keep their earlier result); every sample goes to <workdir>/<mode>.series.jsonl.

    python -m bench.soak --steps 5000 --parallel   # sync, async, gateway (500 steps) side by side
    python -m bench.soak --modes gateway --gateway-steps 2400   # one mode, merged into soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

from bench.report import save_result

# Each mode: the built-in config and its overrides. A gateway step starts an agent process
# per episode; its agents are bench/soak_agent.py (the reference agent's requests on the
# standard library: importing the openai SDK takes ~1 s an episode), all 8 of a step at
# once. Still slower than a sync step, so a gateway soak runs a share of the steps.
SOAK_AGENT = Path(__file__).with_name("soak_agent.py")
MODES = {
    "sync": ["smoke"],
    "async": ["smoke", "train.mode=async", "rollout.num_workers=1"],
    "gateway": [
        "configs/gateway-smoke.yaml",
        f'gateway.agent_command="{{python}} {shlex.quote(str(SOAK_AGENT))}"',
        "gateway.max_concurrent_agents=8",
    ],
}
GATEWAY_SHARE = 0.1
COMMON = ["logging.progress_bar=false", "logging.tensorboard=true"]
QUANTITIES = ("rss_mb", "private_mb", "shared_mb", "fds", "threads")
# bench/results/soak.json keeps this many samples of each mode's series (every sample went
# into the slopes), and of each process kind its private and object-store memory: the whole
# series of a 2,000-step soak took ~300 KB a mode.
SERIES_POINTS = 40
SERIES_KEYS = ("private_mb", "shared_mb")
# The second half's steps are cut into this many spans for the floor slope, each read at
# this percentile: a 2,000-step soak sampled every second has 50 steps and ~10-50 samples
# a span (gateway ~1 step a second, sync and async 2-5). On synthetic series shaped like
# the gateway driver's swing and the async worker's dips, 20 spans at the 20th percentile
# erred by at most 0.27 and 0.75 MB per 1,000 steps over 30 seeds; spans' minima by up to
# 1.7 on the dips, their medians by up to 14 on the swing.
FLOOR_WINDOWS = 20
FLOOR_QUANTILE = 0.2
# A rise of the floor from one span to the next, between two flat stretches, is memory taken
# once, not a leak, when it is at least this many MB and this many times the floor's typical
# move between spans (`one_time_rise`): a steady leak of 3 MB per 1,000 steps moves a floor
# of 20 spans over 750 steps by ~0.11 MB a span, the synthetic series' noise by up to ~0.5.
ONE_TIME_RISE_MB = 2.0
ONE_TIME_RISE_FACTOR = 5.0


def process_kind(process: psutil.Process, driver_pid: int) -> str:
    """A process's role in the run, from its pid or Ray's process title / command line."""
    if process.pid == driver_pid:
        return "driver"
    try:
        cmdline = " ".join(process.cmdline())
        name = process.name()
    except psutil.Error:
        return "gone"
    if "gcs_server" in name or "gcs_server" in cmdline:
        return "gcs_server"
    if name == "raylet" or "/raylet" in cmdline.split(" ")[0]:
        return "raylet"
    for title, kind in (
        ("ray::Trainer", "trainer"),
        ("ray::Rollout", "worker"),
        ("ray::DataPool", "pool"),
        ("ray::Gateway", "gateway"),
        ("ray::DashboardAgent", "dashboard_agent"),
        ("ray::RuntimeEnvAgent", "runtime_env_agent"),
        ("ray::IDLE", "ray_idle_worker"),
        ("ray::", "ray_actor_other"),
    ):
        if cmdline.startswith(title):
            return kind
    if "forge.openai_agent" in cmdline or SOAK_AGENT.name in cmdline:
        return "agent_process"
    for marker, kind in (
        ("dashboard/agent.py", "dashboard_agent"),
        ("runtime_env/agent", "runtime_env_agent"),
        ("log_monitor", "log_monitor"),
        ("autoscaler/_private/monitor", "autoscaler_monitor"),
        ("dashboard", "dashboard"),
    ):
        if marker in cmdline:
            return kind
    return "other:" + name


def memory_parts(process: psutil.Process) -> dict[str, float]:
    """A process's resident memory in MB split by what holds it (Linux /proc/PID/status):
    `private_mb` its anonymous memory (Python objects, tensors, the allocator's heap) and
    `shared_mb` the shared memory it has mapped, which here is Ray's object store: every
    process that writes or reads an object maps its pages, so this counts the store's pages
    once per process, up to the store's high-water mark."""
    fields = {}
    with open(f"/proc/{process.pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("RssAnon", "RssShmem"):
                fields[name] = int(value.split()[0]) / 1024
    return {"private_mb": fields.get("RssAnon", 0.0), "shared_mb": fields.get("RssShmem", 0.0)}


def sample(driver: psutil.Process) -> dict[str, dict[str, float]]:
    """Every process under the driver, summed per kind: RSS in MB (and its private and shared
    parts), open fds, threads, count."""
    kinds: dict[str, dict[str, float]] = {}
    for process in [driver, *driver.children(recursive=True)]:
        kind = process_kind(process, driver.pid)
        try:
            with process.oneshot():
                if process.status() == psutil.STATUS_ZOMBIE:  # an agent that exited, not yet reaped
                    continue
                values = {
                    "rss_mb": process.memory_info().rss / 2**20,
                    **memory_parts(process),
                    "fds": process.num_fds(),
                    "threads": process.num_threads(),
                }
        except (psutil.Error, FileNotFoundError, ProcessLookupError):
            continue
        if kind in ("gone", "agent_process"):  # agents live one episode each: not a long-lived process
            continue
        total = kinds.setdefault(kind, {**dict.fromkeys(QUANTITIES, 0.0), "processes": 0})
        for key, value in values.items():
            total[key] += value
        total["processes"] += 1
    return kinds


def steps_done(run_dir: Path) -> int:
    """The last step metrics.jsonl recorded (0 before the first)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    with path.open("rb") as handle:
        handle.seek(0, os.SEEK_END)
        handle.seek(max(0, handle.tell() - 65536))
        lines = handle.read().splitlines()
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return 0


def folder_bytes(folder: Path) -> dict[str, int]:
    """Bytes per top-level entry of the run folder (a folder counts everything under it)."""
    sizes: dict[str, int] = {}
    for entry in folder.iterdir() if folder.exists() else []:
        files = [entry] if entry.is_file() else [p for p in entry.rglob("*") if p.is_file()]
        sizes[entry.name] = sum(p.stat().st_size for p in files)
    return sizes


def second_half(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The points from half the last step on: the first half holds the warm-up (pools
    starting, Ray's kept task events filling, the object store's pages mapped)."""
    if not points:
        return []
    half = points[-1][0] / 2
    return [(s, v) for s, v in points if s >= half]


def slope_per_1000(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of value against step, times 1,000, over the second half of the steps."""
    tail = second_half(points)
    if len(tail) < 3:
        return 0.0
    mean_s = sum(s for s, _ in tail) / len(tail)
    mean_v = sum(v for _, v in tail) / len(tail)
    spread = sum((s - mean_s) ** 2 for s, _ in tail)
    return 1000 * sum((s - mean_s) * (v - mean_v) for s, v in tail) / spread if spread else 0.0


def theil_sen(points: list[tuple[int, float]]) -> float:
    """The median of the slopes between every two points of different steps (Theil-Sen):
    a few outlying points move it little, unlike a least-squares fit."""
    slopes = sorted(
        (vb - va) / (sb - sa) for i, (sa, va) in enumerate(points) for sb, vb in points[i + 1 :] if sb != sa
    )
    if not slopes:
        return 0.0
    middle = len(slopes) // 2
    return slopes[middle] if len(slopes) % 2 else (slopes[middle - 1] + slopes[middle]) / 2


def span_floors(
    points: list[tuple[int, float]], windows: int = FLOOR_WINDOWS, quantile: float = FLOOR_QUANTILE
) -> list[tuple[int, float]] | None:
    """The second half's steps cut into `windows` equal spans, each span's `quantile` (its
    20th-percentile sample) at its middle step; None when there are too few samples for a
    percentile per span (fewer than 9)."""
    tail = second_half(points)
    windows = min(windows, len(tail) // 3)  # a span needs a few samples for its percentile
    if windows < 3:
        return None
    first, last = tail[0][0], tail[-1][0]
    if last == first:
        return [tail[0]]
    spans: dict[int, list[tuple[int, float]]] = {}
    for step, value in tail:
        spans.setdefault(min(int((step - first) / (last - first) * windows), windows - 1), []).append(
            (step, value)
        )
    floors = []
    for span in spans.values():
        values = sorted(value for _, value in span)
        floors.append((span[len(span) // 2][0], values[int(quantile * (len(values) - 1))]))
    return sorted(floors)


def one_time_rise(floors: list[tuple[int, float]]) -> tuple[int, float] | None:
    """The one rise between two neighbouring span floors that lifts a flat floor onto another
    flat floor, as (index of the span after it, MB), or None. It must be at least
    ONE_TIME_RISE_MB and ONE_TIME_RISE_FACTOR times the median size of the floor's moves from
    span to span, with at least two spans on each side and the floor on each side within half
    the rise: a leak keeps moving the floor, and a floor coming back from a dip or rising
    twice is not flat on both sides."""
    moves = [b - a for (_, a), (_, b) in zip(floors, floors[1:], strict=False)]
    if len(moves) < 3:
        return None
    typical = sorted(abs(move) for move in moves)[len(moves) // 2]
    index = max(range(len(moves)), key=moves.__getitem__)
    rise = moves[index]
    if rise < ONE_TIME_RISE_MB or rise < ONE_TIME_RISE_FACTOR * typical:
        return None
    before, after = [v for _, v in floors[: index + 1]], [v for _, v in floors[index + 1 :]]
    if min(len(before), len(after)) < 2 or max(max(side) - min(side) for side in (before, after)) > rise / 2:
        return None
    return index + 1, rise


def floor_slope_per_1000(points: list[tuple[int, float]]) -> float:
    """The slope per 1,000 steps of the memory a process comes back to between steps, over
    the second half: the Theil-Sen slope through the span floors (`span_floors`), with one
    rise that stands out (`one_time_rise`) taken out first.

    The bar is judged on this one. A process's memory swings within a step (a gateway
    driver's by ~50 MB: agents running, requests in flight, the step's episodes held), and
    samples taken at random phases of that swing give a least-squares fit whose slope is
    noise of several MB per 1,000 steps. What a leak adds is memory the process never comes
    back below, which raises the floor; over days the floor is what runs out of memory. The
    gateway driver sits on its floor a third of the time, so a span's 20th percentile reads
    it; a lone low sample or a dip of a few samples (the async worker's 375 MB among 380-383)
    stays below that percentile, where a span's minimum would follow it, and Theil-Sen
    through the spans leaves an odd span out as well.

    A leak keeps raising the floor; a single rise on a flat floor is memory taken once. The
    tiny llama's rollout worker takes a 7.3 MB mapping at step ~1,200 of the smoke run, every
    run (its seed fixes the step), and is flat from there to step 3,000, where it ends at the
    same 678 MB as the tiny qwen2's worker, which takes it in the first half: judged with that
    rise in, the 1,500-step soak read it as 6 MB per 1,000 steps. The rise is reported beside
    the slope (`one_time_rise_mb`)."""
    floors = span_floors(points)
    if floors is None:
        return slope_per_1000(points)
    rise = one_time_rise(floors)
    if rise is not None:
        after, size = rise
        floors = floors[:after] + [(step, value - size) for step, value in floors[after:]]
    return 1000 * theil_sen(floors)


def one_time_rise_mb(points: list[tuple[int, float]]) -> float:
    """The one rise of the second half's floor that `floor_slope_per_1000` took out, in MB (0 if none)."""
    floors = span_floors(points)
    rise = one_time_rise(floors) if floors is not None else None
    return rise[1] if rise is not None else 0.0


def summarize(series: list[dict]) -> dict:
    """Per process kind and quantity: start (first sample after step 0), end and slope."""
    started = [row for row in series if row["step"] > 0] or series
    kinds = sorted({kind for row in started for kind in row["processes"]})
    summary: dict[str, dict] = {}
    for kind in kinds:
        rows = [(row["step"], row["processes"][kind]) for row in started if kind in row["processes"]]
        summary[kind] = {"processes": rows[-1][1]["processes"]}
        for key in QUANTITIES:
            points = [(step, values[key]) for step, values in rows]
            summary[kind][key] = {
                "start": round(points[0][1], 1),
                "end": round(points[-1][1], 1),
                "slope_per_1000_steps": round(slope_per_1000(points), 2),
                "floor_slope_per_1000_steps": round(floor_slope_per_1000(points), 2),
                "one_time_rise_mb": round(one_time_rise_mb(points), 2),
            }
    return summary


def soak_mode(mode: str, steps: int, every_s: float, workdir: Path, extra: list[str]) -> dict:
    """Train `steps` steps of `mode` in a subprocess, sampling every `every_s` seconds. Every
    sample also goes to `workdir`/`mode`.series.jsonl (the result keeps a thinned series)."""
    run_dir = workdir / mode
    command = [
        sys.executable,
        "-m",
        "forge.cli",
        "train",
        *MODES[mode][:1],
        *MODES[mode][1:],
        *COMMON,
        f"train.max_steps={steps}",
        "--output-dir",
        str(run_dir),
        *extra,
    ]
    started = time.monotonic()
    load_at_start = os.getloadavg()[0]
    log = (workdir / f"{mode}.log").open("w")
    child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    driver = psutil.Process(child.pid)
    series = []
    raw = (workdir / f"{mode}.series.jsonl").open("w")
    next_sample = time.monotonic()
    while child.poll() is None:
        try:
            row = {
                "t_s": round(time.monotonic() - started, 1),
                "step": steps_done(run_dir),
                "processes": sample(driver),
                "disk": folder_bytes(run_dir),
            }
        except (psutil.Error, FileNotFoundError):
            break
        if row["step"] < steps:  # the last steps' samples would catch the shutdown
            series.append(row)
            raw.write(json.dumps(row) + "\n")
        next_sample += every_s  # a sample takes ~0.1 s: keep the period, not the gap
        time.sleep(max(0.0, next_sample - time.monotonic()))
    raw.close()
    if child.wait() != 0:
        tail = (workdir / f"{mode}.log").read_text()[-3000:]
        raise RuntimeError(f"soak {mode}: forge train exited {child.returncode}:\n{tail}")
    disk_points = [(row["step"], sum(row["disk"].values())) for row in series if row["step"] > 0]
    per_file = {
        name: round(
            slope_per_1000([(row["step"], row["disk"].get(name, 0)) for row in series if row["step"] > 0])
            / 1024,
            1,
        )
        for name in folder_bytes(run_dir)
    }
    return {
        "steps": steps,
        "command": " ".join(["forge", *command[3:]]),
        "wall_s": round(time.monotonic() - started, 1),
        "load_avg": {"start": round(load_at_start, 1), "end": round(os.getloadavg()[0], 1)},
        "samples": len(series),
        "processes": summarize(series),
        "disk": {
            "end_kb": round(sum(folder_bytes(run_dir).values()) / 1024, 1),
            "kb_per_1000_steps": round(slope_per_1000(disk_points) / 1024, 1),
            "kb_per_1000_steps_by_entry": per_file,
        },
        "series": kept_series(series),
    }


def kept_series(series: list[dict]) -> list[dict]:
    """The rows of `series` soak.json keeps: a few, with each kind's private and shared memory."""
    return [
        {
            "step": row["step"],
            "t_s": row["t_s"],
            **{
                f"{kind}_{key}": round(v[key], 1)
                for kind, v in row["processes"].items()
                for key in SERIES_KEYS
            },
        }
        for row in thinned(series)
    ]


def with_steepest(measured: dict) -> dict:
    """`measured` with the kinds whose RSS and private memory have the steepest floor slope
    and least-squares slope per process."""
    for key in ("rss_mb", "private_mb"):
        kind, slope = worst(measured, key)
        ols_kind, ols = worst(measured, key, "slope_per_1000_steps")
        measured[f"steepest_{key}"] = {
            "kind": kind,
            "mb_per_1000_steps_per_process": slope,  # the floor slope: the bar's
            "least_squares": {"kind": ols_kind, "mb_per_1000_steps_per_process": ols},
        }
    return measured


def resummarized(measured: dict, samples_path: Path) -> dict:
    """`measured` with its processes' figures worked out again from every sample an earlier
    soak wrote (`<workdir>/<mode>.series.jsonl`), by this version's slopes; the command,
    wall time, load and disk stay as measured."""
    series = [json.loads(line) for line in samples_path.read_text().splitlines() if line]
    return with_steepest(
        {**measured, "samples": len(series), "processes": summarize(series), "series": kept_series(series)}
    )


def thinned(series: list, points: int = SERIES_POINTS) -> list:
    """At most `points` rows of `series`, evenly spread and keeping its first and last: the
    slopes are fitted on every sample, the kept rows only show the curve's shape."""
    if len(series) <= points:
        return series
    return [series[round(i * (len(series) - 1) / (points - 1))] for i in range(points)]


def per_process_slopes(
    result: dict, key: str = "rss_mb", slope: str = "floor_slope_per_1000_steps"
) -> dict[str, float]:
    """Each process kind's second-half slope of `key` per process (a kind's values are
    summed over its processes: two rollout workers, say); by default the floor slope, the
    one the bar is judged on (`floor_slope_per_1000`), else `slope="slope_per_1000_steps"`
    for the least-squares fit over every sample."""
    return {
        kind: values[key][slope] / max(values["processes"], 1) for kind, values in result["processes"].items()
    }


def worst(result: dict, key: str = "rss_mb", slope: str = "floor_slope_per_1000_steps") -> tuple[str, float]:
    """The process kind with the steepest second-half slope of `key` per process, and that slope."""
    slopes = per_process_slopes(result, key, slope)
    kind = max(slopes, key=slopes.get)
    return kind, round(slopes[kind], 2)


def merge_into(out: Path, mode: str, measured: dict) -> None:
    """Write `measured` as `mode`'s result into `out`, keeping the other modes there: the
    file is read at the write, so soaks of different modes can run side by side into it."""
    from forge.run.cluster import ray_system_config

    earlier = json.loads(out.read_text()) if out.exists() else {}
    modes = earlier.get("modes", {}) if earlier.get("bench") == "soak" else {}
    for kept in modes.values():  # written before the series were thinned
        kept["series"] = [
            {k: v for k, v in row.items() if k in ("step", "t_s") or k.endswith(SERIES_KEYS)}
            for row in thinned(kept.get("series", []))
        ]
    modes[mode] = measured
    result = {
        "bench": "soak",
        "cpus": os.cpu_count(),
        "ray_system_config": ray_system_config(),
        "modes": dict(sorted(modes.items())),
    }
    save_result(result, out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=1500, help="training steps for sync and async")
    parser.add_argument(
        "--gateway-steps", type=int, help=f"gateway mode's steps (default {GATEWAY_SHARE} x --steps)"
    )
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument(
        "--every",
        type=float,
        default=1.0,
        help="seconds between samples (several per step's swing, for the floor slope)",
    )
    parser.add_argument("--out", default="bench/results/soak.json")
    parser.add_argument(
        "--parallel", action="store_true", help="run the modes side by side (each its own Ray)"
    )
    parser.add_argument(
        "--resummarize",
        type=Path,
        metavar="WORKDIR",
        help="run nothing: work the --modes' figures in --out out again from the samples an "
        "earlier soak left in WORKDIR (after a change to the slopes)",
    )
    parser.add_argument("overrides", nargs="*", help="extra dotted overrides for every mode")
    args = parser.parse_args()
    workdir = args.resummarize or Path(tempfile.mkdtemp(prefix="forge-soak-"))
    print(f"bench.soak: runs, logs and every sample under {workdir}", file=sys.stderr)

    out = Path(args.out)
    lock = threading.Lock()

    def run(mode: str) -> None:
        steps = (
            args.gateway_steps or max(10, int(args.steps * GATEWAY_SHARE))
            if mode == "gateway"
            else args.steps
        )
        if args.resummarize:
            measured = resummarized(
                json.loads(out.read_text())["modes"][mode], args.resummarize / f"{mode}.series.jsonl"
            )
        else:
            measured = with_steepest(soak_mode(mode, steps, args.every, workdir, args.overrides))
        with lock:  # after each mode: a long soak's first modes survive a failure
            merge_into(out, mode, measured)

    if args.parallel:  # slopes are per step, so modes sharing the machine measure the same
        with ThreadPoolExecutor(len(args.modes)) as pool:
            list(pool.map(run, args.modes))
    else:
        for mode in args.modes:
            run(mode)
    result = json.loads(out.read_text())
    print(
        json.dumps(
            {
                mode: {
                    "steps": r["steps"],
                    "wall_s": r["wall_s"],
                    "steepest_rss": r["steepest_rss_mb"],
                    "steepest_private": r["steepest_private_mb"],
                    "disk_kb_per_1000_steps": r["disk"]["kb_per_1000_steps"],
                }
                for mode, r in result["modes"].items()
                if mode in args.modes
            }
        )
    )


if __name__ == "__main__":
    main()
