"""An inline env stuck inside one C call (the GIL held or released) cannot hang the
harness: its rollout worker ends itself with a report naming the env's line, the run
counts the worker's episodes lost, says so, and goes on; `forge env check` fails it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import stuck_envs
from env_fault_kit import LoopTicker
from side_by_side import Started, selected_tests

from forge.rollout.stuck import remove_unused_reports, stuck_report
from forge.run.faults import worker_death_note

ENV = "stuck_envs:StuckInlineEnv"  # tests/ is on the path, as a user's folder would be
ROOT = Path(__file__).resolve().parent.parent
# env.stuck_grace_s of the runs here (10 s by default): the guard ends a stuck process 7 s
# sooner. The healthy loops of these runs never went 0.3 s past their 1 s re-arm at load 19
# on a 2-core machine; the grace leaves them 2+ s.
GRACE = "env.stuck_grace_s=3"


def _stuck_line(kind: str) -> str:
    """'file:line in step' of the C call where StuckInlineEnv gets stuck for `kind`."""
    marker = "the GIL released" if kind == "sleep" else "the GIL held"
    source = Path(stuck_envs.__file__).read_text().splitlines()
    line = next(i for i, text in enumerate(source, 1) if f"# stuck here: one C call, {marker}" in text)
    return f"{stuck_envs.__file__}:{line} in step"


def _guarded_loop(tmp_path: Path, body: str, limit_s: float) -> subprocess.CompletedProcess:
    """Run `body` (awaited) on an event loop guarded by a LoopGuard in a fresh process."""
    script = textwrap.dedent(f"""
        import asyncio, time
        from forge.env.calls import call_env
        from forge.rollout.stuck import LoopGuard
        from stuck_envs import StuckInlineEnv

        async def main():
            guard = LoopGuard({str(tmp_path)!r}, "rollout_0", {limit_s})
            guard.start()
            {body}
            guard.stop()

        asyncio.run(main())
    """)
    return subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT / "tests", capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("kind", ["sleep", "regex"])
def test_a_loop_stuck_in_one_c_call_ends_its_process_with_a_report_of_the_env_line(tmp_path, kind):
    started = time.monotonic()
    done = _guarded_loop(
        tmp_path,
        f"env = StuckInlineEnv(); env.reset({{'stuck': {kind!r}}}, 0); await call_env(env.step, 'x', timeout_s=0.2)",
        limit_s=1.0,
    )
    assert done.returncode == 1, done.stderr
    assert time.monotonic() - started < 30
    stuck = stuck_report(tmp_path, "rollout_0", set())
    assert stuck.where == _stuck_line(kind) and stuck.on_loop and stuck.seconds == 1.0
    assert "Timeout (0:00:01)" in Path(stuck.path).read_text()


def test_work_on_the_loop_that_beats_goes_past_the_limit_and_a_stall_after_it_still_ends(tmp_path):
    # A generation batch runs on the worker's loop with no await between its decode steps; each
    # step beats. Beating for 3 s past a 2 s limit is fine; stopping (a C call) is not.
    healthy = "deadline = time.monotonic() + 3\n            while time.monotonic() < deadline:\n"
    healthy += "                time.sleep(0.05); guard.beat()\n            print('went on')"
    stalled = "for _ in range(20):\n                time.sleep(0.05); guard.beat()\n            time.sleep(4)"
    # The two processes run side by side (each mostly sleeps), each with its own report folder.
    with ThreadPoolExecutor(2) as pool:
        ran = pool.map(lambda body, folder: _guarded_loop(folder, body, limit_s=2.0),
                       [healthy, stalled], [tmp_path / "healthy", tmp_path / "stalled"])  # fmt: skip
        done, stalled_done = list(ran)
    assert done.returncode == 0 and "went on" in done.stdout, done.stderr
    assert stalled_done.returncode == 1


def test_a_prefill_longer_than_the_guards_limit_beats_between_its_chunks(tmp_path, monkeypatch):
    """Before, a prompt's prefill was one forward with no beat: a healthy worker prefilling a
    long agent context for longer than the guard's limit was ended as stuck. On a fake clock
    where the model takes 0.01 s per token it computes, a 400-token prompt's prefill takes 4 s
    against a 3 s limit; the guard is re-armed before it could fire all the way through."""
    import faulthandler
    from types import SimpleNamespace

    from forge.models.families import FAMILIES
    from forge.rollout import stuck
    from forge.rollout.engines.hf import HFEngine
    from forge.rollout.engines.protocol import GenerationRequest

    limit_s, now = 3.0, [0.0]
    armed: list[float] = []  # the fake times the guard's timer was (re-)armed at
    monkeypatch.setattr(stuck, "time", SimpleNamespace(monotonic=lambda: now[0]))
    monkeypatch.setattr(faulthandler, "dump_traceback_later", lambda *args, **kwargs: armed.append(now[0]))
    monkeypatch.setattr(faulthandler, "cancel_dump_traceback_later", lambda: None)
    model = FAMILIES["llama"].build("sdpa")
    engine = HFEngine(model, [], pad_token_id=0, self_check=False, prefill_chunk_tokens=64)

    def slow(module, args, kwargs):
        now[0] += 0.01 * kwargs["input_ids"].numel()

    model.register_forward_pre_hook(slow, with_kwargs=True)
    guard = stuck.LoopGuard(tmp_path, "rollout_0", limit_s)

    async def prefill_on_the_guarded_loop() -> float:
        guard.start()
        engine.heartbeat = guard.beat  # as RolloutWorker.rollout sets it
        engine.generate([GenerationRequest([2 + i % 60 for i in range(400)], 1)])
        guard.stop()
        return now[0]

    ended = asyncio.run(prefill_on_the_guarded_loop())
    guard.close()
    assert ended - armed[0] > limit_s  # the prefill outlasted the limit
    assert max(later - earlier for earlier, later in zip(armed, [*armed[1:], ended], strict=True)) < limit_s


def test_the_run_says_which_env_line_a_worker_was_stuck_at_and_then_that_others_died(tmp_path):
    done = _guarded_loop(
        tmp_path, "env = StuckInlineEnv(); env.reset({'stuck': 'sleep'}, 0); env.step('x')", limit_s=0.5
    )
    assert done.returncode == 1
    told: set[str] = set()
    note = worker_death_note(0, 16, tmp_path, told, ENV, 0.2)
    assert note.startswith(
        f"forge: rollout worker 0 was stuck for 0.5s at {_stuck_line('sleep')} (env {ENV}, "
    )
    assert (
        "env.step_timeout_s=0.2" in note
        and "blocking = False" in note
        and "16 episodes count as lost" in note
    )
    # The same report is not told twice: a later death of the worker is one it cannot explain.
    assert worker_death_note(3, 8, tmp_path, told, ENV, 0.2).startswith(
        "forge: rollout worker 3 died (its log"
    )


def test_a_paused_guard_lets_long_work_run_and_leaves_no_report(tmp_path):
    done = _guarded_loop(
        tmp_path,
        "with guard.paused_for(): time.sleep(2.0)\n            await asyncio.sleep(0.2)",
        limit_s=1.0,
    )
    assert done.returncode == 0, done.stderr
    assert stuck_report(tmp_path, "rollout_0", set()) is None
    remove_unused_reports(tmp_path)
    assert not tmp_path.exists()


def test_the_gateway_runs_an_inline_env_in_a_thread_so_a_stuck_step_only_times_out():
    from forge.gateway.episodes import EpisodeError, EpisodeStore

    async def play() -> tuple[float, int]:
        store = EpisodeStore(stuck_envs.StuckInlineEnv, step_timeout_s=0.3)
        episode = await store.start({"task_id": "a", "stuck": "sleep"}, seed=0)
        ticker = LoopTicker().start()  # the loop serves every agent: it must go on meanwhile
        started = time.monotonic()
        with pytest.raises(EpisodeError, match="env step failed: EnvTimeout"):
            await store.step(episode.episode_id, "x")
        ticker.stop()
        return time.monotonic() - started, ticker.ticks

    seconds, ticks = asyncio.run(play())
    assert seconds < 5 and ticks >= 3


def _run(
    tmp_path: Path, capsys, kind: str, mode: str, once: bool, *overrides: str
) -> tuple[int, list[dict], str]:
    """A short run on StuckInlineEnv, 4 tasks of which one gets stuck: its exit code,
    metrics rows and console."""
    from forge.cli import main

    rows = [{"task_id": str(i)} for i in range(4)]
    # Not the first: forge train resets that one before it starts (and would claim `once`).
    rows[-1].update(stuck=kind, **({"once": str(tmp_path / "stuck-once")} if once else {}))
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(row) + "\n" for row in rows))
    code = main([
        "train", "configs/smoke.yaml", f"env.name={ENV}", "env.kwargs={}", f"env.tasks={tasks}",
        "env.step_timeout_s=0.5", f"train.mode={mode}", "train.max_steps=2", "rollout.tasks_per_step=2",
        "rollout.group_size=2", "rollout.num_workers=2", "logging.progress_bar=false",
        "train.max_steps_without_signal=0", GRACE, *overrides,  # every episode that ends scores 1: nothing to learn
        "--output-dir", str(tmp_path / "run"),
    ])  # fmt: skip
    metrics = tmp_path / "run" / "metrics.jsonl"
    steps = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    return code, steps, capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "mode"), [("regex", "sync"), ("sleep", "async")])
def test_a_run_whose_env_gets_stuck_in_a_c_call_restarts_the_worker_and_trains_on(
    ray_session, tmp_path, capsys, kind, mode
):
    code, steps, console = _run(tmp_path, capsys, kind, mode, True)
    assert code == 0, console
    assert [s["step"] for s in steps] == [1, 2] and all(s["episodes"] > 0 for s in steps)
    assert sum(s["episodes_lost"] for s in steps) >= 2  # the stuck group, and any other the worker held
    lines = [line for line in console.splitlines() if " was stuck for 3.5s at " in line]
    assert len(lines) == 1 and f"at {_stuck_line(kind)} (env {ENV}, env.step_timeout_s=0.5)" in lines[0]
    reports = list((tmp_path / "run" / "stuck_workers").iterdir())
    assert len(reports) == 1 and str(reports[0]) in lines[0]  # the stuck worker's; the others' removed


@pytest.mark.slow
def test_a_run_whose_worker_stays_stuck_stops_with_exit_code_1(ray_session, tmp_path, capsys):
    code, _, console = _run(tmp_path, capsys, "sleep", "sync", False, "async.max_worker_restarts=0")
    assert code == 1
    assert " was stuck for 3.5s at " in console
    assert "died more than async.max_worker_restarts=0 times, so the run stopped" in console.splitlines()[-1]


def test_a_guard_report_names_the_env_call_a_thread_holding_the_gil_was_stuck_in(tmp_path):
    from forge.rollout.stuck import read_stuck_report
    from forge.rollout.stuck_watch import stuck_message

    # As in the gateway: the env call runs in a thread, whose regex stops the loop too.
    done = _guarded_loop(
        tmp_path,
        "from forge.env.calls import in_threads\n            env = StuckInlineEnv(); env.reset({'stuck': 'regex'}, 0)\n"
        "            with in_threads(): await call_env(env.step, 'x', timeout_s=0.2)",
        limit_s=1.0,
    )
    assert done.returncode == 1, done.stderr
    [path] = tmp_path.glob("rollout_0.*.txt")
    report = read_stuck_report(path, stuck_envs.__file__)
    assert (report.where, report.on_loop, report.call) == (_stuck_line("regex"), False, "step")
    message = stuck_message(report, ENV, 0.2, "the gateway run", "(on the loop)")
    assert message.startswith(
        f"forge: the gateway run was ended (exit code 1): the env call step() was stuck for 1s at "
        f"{_stuck_line('regex')} (env {ENV}, env.step_timeout_s=0.2): it ran in a thread inside C code that "
        "holds the GIL"
    )
    assert message.endswith(f"All threads' stacks: {path}")
    # Without the env's file: the thread running an env call, not the loop's frames outside Forge.
    unknown = read_stuck_report(path)
    assert (unknown.where, unknown.call) == (_stuck_line("regex"), None)
    assert (
        "the innermost frame outside Forge and Python's library, on a thread (one held the GIL), was "
        f"{_stuck_line('regex')}."
    ) in stuck_message(unknown, ENV, 0.2, "the gateway run", "(on the loop)")


def test_a_guard_report_of_a_call_stuck_on_the_loop_says_so_and_one_that_did_not_fire_is_none(tmp_path):
    from forge.rollout.stuck import read_stuck_report
    from forge.rollout.stuck_watch import stuck_message

    done = _guarded_loop(
        tmp_path, "env = StuckInlineEnv(); env.reset({'stuck': 'sleep'}, 0); env.step('x')", limit_s=0.5
    )
    assert done.returncode == 1
    [path] = tmp_path.glob("rollout_0.*.txt")
    report = read_stuck_report(path, stuck_envs.__file__)
    assert (report.where, report.on_loop, report.call) == (_stuck_line("sleep"), True, "step")
    message = stuck_message(report, ENV, 0.2, "forge eval", "it ran inline on the event loop")
    assert f"the env call step() was stuck for 0.5s at {_stuck_line('sleep')} " in message
    assert "env.step_timeout_s=0.2): it ran inline on the event loop. Make that code finish" in message
    unfired = tmp_path / "rollout_0.1.txt"
    unfired.write_text("rollout_0 event loop thread 0x0000000000000001, stuck after 0.5s\n")
    assert read_stuck_report(unfired) is None and read_stuck_report(tmp_path / "missing.txt") is None


def _command_line(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except OSError:
        return f"{pid} (ended)"


def _processes_with(marker: str) -> list[str]:
    """Processes whose environment holds `marker` (a run's, and whatever it started)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/environ").read_bytes():
                found.append(pid)
        except OSError:
            pass
    return found


def test_the_watcher_also_ends_a_marked_process_started_while_it_listed_them(monkeypatch):
    """A Ray node still starting its agents when its driver ended: an agent not yet in the list
    the watcher killed lived on after the run (seen in CI, 60 s after a gateway run ended)."""
    from forge.rollout import stuck_watch

    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    mark = f"{os.getpid()}-late"
    first = subprocess.Popen(sleep, env={**os.environ, stuck_watch.RUN_MARK: mark})
    late: list[subprocess.Popen] = []
    listed = stuck_watch.marked_processes

    def listing_while_one_starts(wanted: str) -> list[int]:
        found = listed(wanted)
        if not late:  # started just after the first listing, as it is killed
            late.append(subprocess.Popen(sleep, env={**os.environ, stuck_watch.RUN_MARK: mark}))
            time.sleep(0.5)  # its environment is readable once it runs Python
        return found

    monkeypatch.setattr(stuck_watch, "marked_processes", listing_while_one_starts)
    try:
        while first.pid not in listed(f"{stuck_watch.RUN_MARK}={mark}"):
            time.sleep(0.05)
        killed = stuck_watch.end_marked(f"{stuck_watch.RUN_MARK}={mark}", grace_s=0.0)
        assert sorted(killed) == sorted([first.pid, late[0].pid])
        assert [p.wait(timeout=10) for p in (first, late[0])] == [-9, -9]
    finally:
        for p in [first, *late]:
            p.kill()
            p.wait()


# What a local Ray's agents are called once they have retitled themselves.
RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
_LOCAL_RAY = """
import json, os, time
from forge.rollout.stuck_watch import RUN_MARK, marked_processes
from forge.run.cluster import start_ray

def read(pid, name):
    try:
        with open(f"/proc/{pid}/{name}", "rb") as file:
            return file.read()
    except OSError:
        return b""

start_ray(1)
mark = f"{RUN_MARK}={os.environ[RUN_MARK]}"
mine = [p for p in os.listdir("/proc") if p.isdigit() and read(p, "stat").rsplit(b")", 1)[-1].split()[1:2] == [str(os.getpid()).encode()]]
raylets = [p for p in mine if b"raylet" in read(p, "cmdline")]
agents = {}
deadline = time.monotonic() + 60
while len(agents) < AGENTS and time.monotonic() < deadline:  # each retitles itself once it runs
    time.sleep(0.5)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        title = read(pid, "cmdline").split(bytes(1))[0].decode(errors="replace")
        if title.startswith(TITLES) and read(pid, "stat").rsplit(b")", 1)[-1].split()[1].decode() in raylets:
            agents[int(pid)] = title
print(json.dumps({"agents": agents, "marked": marked_processes(mark)}))
"""


@pytest.mark.slow
def test_a_local_rays_agents_carry_the_runs_mark_where_the_watcher_reads_it():
    """Ray's agents retitle themselves (setproctitle), which by default writes over the
    environment /proc shows: the mark was gone from it, so a run ended abruptly left them
    running (seen: both alive 60 s after a gateway run was ended on a loaded machine)."""
    script = f"AGENTS, TITLES = {len(RAY_AGENTS)}, {RAY_AGENTS!r}\n" + _LOCAL_RAY
    # A small environment, as a shell's can be: where the mark sits past what a title overwrites,
    # it survived by chance.
    keep = ("PATH", "HOME", "PYTHONPATH", "LANG", "TMPDIR")
    environment = {key: os.environ[key] for key in keep if key in os.environ}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=180, env=environment, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted(found["agents"].values()) == sorted(RAY_AGENTS), found
    assert {int(pid) for pid in found["agents"]} <= set(found["marked"]), found


def test_the_watcher_ends_the_processes_carrying_the_runs_mark_and_no_others(monkeypatch):
    from forge.rollout.stuck_watch import RUN_MARK, end_marked, own_mark

    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    mark = f"{os.getpid()}-test"
    marked = [subprocess.Popen(sleep, env={**os.environ, RUN_MARK: mark}) for _ in range(2)]
    other = subprocess.Popen(sleep, env={**os.environ, RUN_MARK: f"{mark}-other"})  # a prefix is no match
    try:
        assert sorted(end_marked(f"{RUN_MARK}={mark}", grace_s=0.3)) == sorted(p.pid for p in marked)
        assert [p.wait(timeout=10) for p in marked] == [-9, -9]
        assert other.poll() is None
    finally:
        for p in [*marked, other]:
            p.kill()
            p.wait()
    monkeypatch.setenv(RUN_MARK, mark)
    assert own_mark() == mark
    monkeypatch.setenv(RUN_MARK, "1-inherited")  # another process's: never ours to end
    assert own_mark() == ""


@pytest.mark.parametrize("ending", ["killed", "shut down"])
def test_a_guarded_process_killed_from_outside_leaves_nothing_running(tmp_path, ending):
    """The watcher ends what a process left running when it died without letting go (here
    `kill -9`), and nothing when it shut down and let go."""
    script = textwrap.dedent(f"""
        import os, signal, subprocess, sys
        from forge.rollout.stuck_watch import RUN_MARK, StuckWatcher

        os.environ[RUN_MARK] = f"{{os.getpid()}}-test"
        watcher = StuckWatcher({str(tmp_path / "never.txt")!r}, "AnEnv", None, 1.0, "the gateway run", "")
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(child.pid, watcher.process.pid, flush=True)
        if {ending!r} == "killed":
            os.kill(os.getpid(), signal.SIGKILL)
        watcher.close()
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    child, watcher = (int(pid) for pid in run.stdout.split())
    try:
        deadline = time.monotonic() + 30
        while Path(f"/proc/{watcher}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not Path(f"/proc/{watcher}").exists()  # the watcher is done
        try:
            child_left = "State:\tZ" not in Path(f"/proc/{child}/status").read_text()  # not a zombie
        except OSError:
            child_left = False
        if ending == "killed":
            assert not child_left
            assert "forge: the gateway run ended without shutting down (killed, or out of memory?); " \
                   "ended the 1 processes it left running" in run.stderr  # fmt: skip
        else:
            assert child_left and "forge:" not in run.stderr
    finally:
        with contextlib.suppress(OSError):
            os.kill(child, 9)


# The tests below each check one whole process (`forge env check`'s, a rollout worker's,
# `forge eval`'s, a gateway run's), most of whose time is start-up and waiting on a time
# limit: the processes of the tests selected are all started at once, by the `processes`
# fixture, and each test waits for its own (on 2 cores they end in ~the time of the longest).
KINDS = ("sleep", "regex")
GENERATING = textwrap.dedent("""
    import asyncio, sys, time
    from forge.config import Config
    from forge.rollout.worker import RolloutWorker

    checkpoint, report_dir = sys.argv[1:]
    cfg = Config()
    cfg.env.step_timeout_s, cfg.env.stuck_grace_s = 1.0, 2.0  # the guard's limit: 3 s
    cfg.rollout.max_new_tokens, cfg.rollout.max_turns = 80, 1
    worker = RolloutWorker(checkpoint, cfg.model, cfg.env, cfg.rollout, 0.5, seed=0, stuck_report_dir=report_dir)
    # A slow model: each forward 0.06 s, so a batch of 80 decode steps takes ~5 s.
    worker.engine.model.register_forward_pre_hook(lambda *args: time.sleep(0.06))
    started = time.monotonic()
    played = asyncio.run(worker.rollout([{"task_id": "t", "secret": 1, "n": 4}], group_size=4))
    seconds = round(time.monotonic() - started, 1)
    # Longer than the guard's limit after the rollout: a guard left armed when the rollout
    # ended (its loop gone with asyncio.run) would end this process here, with exit code 1.
    time.sleep(3.5)
    print("rolled out", seconds, [t.status for t in played])
""")


@pytest.fixture(scope="module")
def processes(request, tmp_path_factory):
    """The processes of the tests below that were selected, started at once, by test name."""
    selected = selected_tests(request)
    if selected & {"test_a_rollout_worker_generating_past_the_guards_limit_is_not_taken_for_stuck",
                   "test_forge_eval_on_an_env_stuck_in_a_c_call_ends_with_the_env_line_instead_of_hanging"}:  # fmt: skip
        tiny_checkpoint = request.getfixturevalue("tiny_checkpoint")
    tests_path = os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    started = {}
    if "test_a_rollout_worker_generating_past_the_guards_limit_is_not_taken_for_stuck" in selected:
        folder = tmp_path_factory.mktemp("generating")
        started["generating"] = Started(
            folder,
            [sys.executable, "-c", GENERATING, str(tiny_checkpoint), str(folder / "reports")],
            ROOT / "tests",
        )
    if "test_env_check_fails_an_env_stuck_in_one_c_call" in selected:
        for kind in KINDS:
            folder = tmp_path_factory.mktemp(f"check-{kind}")
            tasks = folder / "tasks.jsonl"
            tasks.write_text(json.dumps({"task_id": "a", "stuck": kind}) + "\n")
            command = [
                sys.executable, "-m", "forge.cli", "env", "check", ENV, "--tasks", str(tasks), "--timeout", "0.3",
            ]  # fmt: skip
            started[f"check-{kind}"] = Started(
                folder, command, ROOT, {**os.environ, "PYTHONPATH": tests_path}
            )
    if "test_forge_eval_on_an_env_stuck_in_a_c_call_ends_with_the_env_line_instead_of_hanging" in selected:
        folder = tmp_path_factory.mktemp("eval")
        tasks = folder / "tasks.jsonl"
        tasks.write_text(json.dumps({"task_id": "a", "stuck": "regex"}) + "\n")
        command = [
            sys.executable, "-m", "forge.cli", "eval", "configs/smoke.yaml", "--checkpoint", str(tiny_checkpoint),
            "--episodes", "1", "--tasks", "1", "--no-progress",
            f"env.name={ENV}", "env.kwargs={}", f"env.tasks={tasks}", "env.step_timeout_s=0.2", GRACE,
        ]  # fmt: skip
        started["eval"] = Started(folder, command, ROOT, {**os.environ, "PYTHONPATH": tests_path})
    if "test_a_gateway_run_whose_env_holds_the_gil_ends_naming_the_env_line_instead_of_hanging" in selected:
        folder = tmp_path_factory.mktemp("gateway")
        tasks = folder / "tasks.jsonl"
        tasks.write_text(json.dumps({"task_id": "a", "stuck": "regex"}) + "\n")
        command = [
            sys.executable, "-m", "forge.cli", "train", "gateway-smoke", f"env.name={ENV}", "env.kwargs={}",
            f"env.tasks={tasks}", "env.step_timeout_s=1", "rollout.tasks_per_step=1", "rollout.group_size=2",
            "train.max_steps=1", GRACE, "--output-dir", str(folder / "run"),
        ]  # fmt: skip
        marked = {**os.environ, "PYTHONPATH": tests_path, "FORGE_TEST_RUN": folder.name}
        started["gateway"] = Started(folder, command, ROOT, marked)
    yield started
    for run in started.values():
        run.stop()


@pytest.mark.parametrize(("kind", "how"), [("sleep", "could not be interrupted"), ("regex", "held the GIL")])
def test_env_check_fails_an_env_stuck_in_one_c_call(processes, kind, how):
    run = processes[f"check-{kind}"]
    done = run.finish(timeout_s=120)
    assert done.returncode == 1, done.stderr[-2000:]
    assert run.seconds < 60
    out = done.stdout
    assert f"FAIL  step             StuckInlineEnv.step did not return within 0.3s and {how}" in out
    assert "drop `blocking = False`" in out and out.rstrip().endswith("FAILED: 3 passed, 1 failed")


@pytest.mark.slow
def test_a_rollout_worker_generating_past_the_guards_limit_is_not_taken_for_stuck(processes):
    """Before, a healthy batch that decoded longer than env.step_timeout_s + stuck_grace_s (a
    big model, long replies: 60 s by default) ended the worker as 'stuck inside C code' at a
    line of the model's forward, blamed on the env, and every episode of the step was lost."""
    done = processes["generating"].finish(timeout_s=120)
    assert done.returncode == 0, done.stderr[-2000:]
    seconds = float(done.stdout.split("rolled out ")[1].split()[0])
    assert seconds > 3.0, done.stdout  # the batch did outlast the guard's limit


@pytest.mark.slow
def test_forge_eval_on_an_env_stuck_in_a_c_call_ends_with_the_env_line_instead_of_hanging(processes):
    done = processes["eval"].finish(timeout_s=120)
    assert done.returncode == 1
    [line] = [line for line in done.stderr.splitlines() if line.startswith("forge: forge eval was ended")]
    assert f"the env call step() was stuck for 3.2s at {_stuck_line('regex')} (env {ENV}, " in line
    assert "the env sets blocking = False" in line
    report = Path(line.rsplit("All threads' stacks: ", 1)[1])
    file, number = _stuck_line("regex").removesuffix(" in step").rsplit(":", 1)
    assert f'File "{file}", line {number} in step' in report.read_text()
    shutil.rmtree(report.parent)


@pytest.mark.slow
def test_a_gateway_run_whose_env_holds_the_gil_ends_naming_the_env_line_instead_of_hanging(processes):
    run = processes["gateway"]
    done = run.finish(timeout_s=180)
    assert done.returncode == 1, done.stderr[-3000:]
    [report] = (run.folder / "run" / "stuck_workers").glob("gateway.*.txt")
    [line] = [
        line for line in done.stderr.splitlines() if line.startswith("forge: the gateway run was ended")
    ]
    assert (
        f"the env call step() was stuck for 4s at {_stuck_line('regex')} (env {ENV}, env.step_timeout_s=1)"
        in line
    )
    assert line.endswith(f"All threads' stacks: {report}") and "Timeout (0:00:04)!" in report.read_text()
    assert run.seconds < 120, run.seconds
    # Nothing the run started lives on: Ray's processes, the agents, the watcher (Ray's own
    # take a while to notice their driver is gone on a loaded machine).
    marker = f"FORGE_TEST_RUN={run.folder.name}"
    deadline = time.monotonic() + 60
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert [_command_line(pid) for pid in _processes_with(marker)] == []
