"""Harness-side calls into envs: sync or async methods, under timeouts the env cannot dodge."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from forge.env import Env, EnvTimeout, StepResult, call_env
from forge.env.calls import Abandoned, build_env, call_sync, step_with_timeout


class SyncEnv(Env):
    def reset(self, task, seed):
        return f"task {task['x']} seed {seed}"

    def step(self, action):
        return StepResult(action.upper(), 1.0, True)


class AsyncEnv(Env):
    async def reset(self, task, seed):
        await asyncio.sleep(0)
        return "async start"

    async def step(self, action):
        return StepResult(action[::-1])


def test_sync_and_async_methods_are_both_awaited():
    async def play():
        return (
            await call_env(SyncEnv().reset, {"x": 1}, 7, timeout_s=5),
            await call_env(AsyncEnv().reset, {}, 0, timeout_s=5),
            await step_with_timeout(AsyncEnv(), "abc", timeout_s=5),
        )

    sync_obs, async_obs, step = asyncio.run(play())
    assert (sync_obs, async_obs, step.observation) == ("task 1 seed 7", "async start", "cba")


def test_a_sync_env_runs_in_a_thread_unless_it_says_it_never_blocks():
    class WhereAmI(SyncEnv):
        def step(self, action):
            return StepResult(threading.current_thread().name)

    class Inline(WhereAmI):
        blocking = False

        def reset(self, task, seed):
            raise ValueError("bad task")

    async def play():
        loop_thread = threading.current_thread().name
        threaded = await step_with_timeout(WhereAmI(), "x", timeout_s=5)
        inline = await step_with_timeout(Inline(), "x", timeout_s=5)
        with pytest.raises(ValueError, match="bad task"):
            await call_env(Inline().reset, {}, 0, timeout_s=5)
        return loop_thread, threaded.observation, inline.observation

    loop_thread, threaded, inline = asyncio.run(play())
    assert threaded != loop_thread and threaded == "forge-env-call"
    assert inline == loop_thread


def test_a_hung_sync_step_times_out_and_does_not_hold_up_shutdown():
    release = threading.Event()

    class Hangs(Env):
        def step(self, action):
            release.wait()
            return StepResult("late")

    async def play():
        with pytest.raises(EnvTimeout, match="Hangs.step took longer than 0.1s"):
            await step_with_timeout(Hangs(), "x", timeout_s=0.1)

    try:
        asyncio.run(play())  # returns although the step's thread is still blocked
        assert not release.is_set()
    finally:
        release.set()


def test_a_hung_async_step_times_out():
    class Sleeps(Env):
        async def step(self, action):
            await asyncio.sleep(3600)

    async def play():
        await step_with_timeout(Sleeps(), "x", timeout_s=0.05)

    with pytest.raises(EnvTimeout):
        asyncio.run(play())


def test_an_env_exception_reaches_the_caller():
    class Broken(Env):
        def step(self, action):
            raise KeyError("missing")

    async def play():
        await step_with_timeout(Broken(), "x", timeout_s=5)

    with pytest.raises(KeyError, match="missing"):
        asyncio.run(play())


def test_call_sync_runs_either_kind_to_completion():
    assert call_sync(SyncEnv().step, "a").observation == "A"
    assert call_sync(AsyncEnv().step, "ab").observation == "ba"


def test_env_call_threads_are_reused_and_a_hung_one_is_left_behind():
    release = threading.Event()
    hung: list[threading.Thread] = []
    served: list[threading.Thread] = []

    class Hangs(Env):
        def step(self, action):
            hung.append(threading.current_thread())
            release.wait()
            return StepResult("late")

    class Records(Env):
        def step(self, action):
            served.append(threading.current_thread())
            return StepResult(action.upper())

    async def play():
        with pytest.raises(EnvTimeout):
            await step_with_timeout(Hangs(), "x", timeout_s=0.05)
        return [(await step_with_timeout(Records(), f"a{i}", timeout_s=5)).observation for i in range(50)]

    try:
        assert asyncio.run(play()) == [f"A{i}" for i in range(50)]
        assert len(set(served)) == 1  # 50 calls, one after another, all on one reused thread
        assert hung[0] not in served  # the stuck thread is never handed another call
        assert all(t.daemon for t in served + hung)
    finally:
        release.set()


def spinner(where: str, stopped: list[BaseException]) -> None:
    """Loops in Python, as a buggy env can, until an exception lands in it."""
    try:
        while where:
            pass
    except BaseException as exc:  # what stopped it
        stopped.append(exc)
        raise


def wait_for(condition, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_a_step_given_up_on_while_looping_in_python_is_stopped():
    # Left looping, its thread would take the GIL turn by turn from every later call.
    stopped: list[BaseException] = []

    class Spins(Env):
        def step(self, action):
            spinner("step", stopped)

    async def play():
        with pytest.raises(EnvTimeout, match="Spins.step took longer than 0.1s") as timeout:
            await step_with_timeout(Spins(), "x", timeout_s=0.1)
        return timeout.value

    timeout = asyncio.run(play())
    assert timeout.stuck_at is not None and timeout.stuck_at.name == "spinner"
    assert wait_for(lambda: stopped) and isinstance(stopped[0], Abandoned)


def test_a_constructor_given_up_on_while_looping_in_python_is_stopped():
    stopped: list[BaseException] = []

    class SpinsAtBirth(SyncEnv):
        def __init__(self) -> None:
            spinner("init", stopped)

    with pytest.raises(EnvTimeout, match="building SpinsAtBirth took longer than 0.1s"):
        asyncio.run(build_env(SpinsAtBirth, timeout_s=0.1))
    assert wait_for(lambda: stopped) and isinstance(stopped[0], Abandoned)


def test_a_call_that_returns_as_it_is_given_up_on_leaves_nothing_for_the_next_call(monkeypatch):
    # Calls that end right at their limit, on reused threads: a stop meant for one that had
    # just returned must never land in a later call, nor kill its thread.
    killed: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: killed.append(args.exc_value))

    class AtTheLimit(Env):
        def step(self, action):
            time.sleep(0.005)
            return StepResult(action)

    async def play() -> tuple[int, list[str]]:
        timeouts = 0
        for _ in range(200):
            try:
                await step_with_timeout(AtTheLimit(), "x", timeout_s=0.005)
            except EnvTimeout:
                timeouts += 1
        return timeouts, [
            (await step_with_timeout(SyncEnv(), f"b{i}", timeout_s=5)).observation for i in range(100)
        ]

    timeouts, after = asyncio.run(play())
    assert 0 < timeouts  # the race was run
    assert after == [f"B{i}" for i in range(100)]
    assert killed == []


SLOW_MODULE = """import time
end = time.monotonic() + 0.5
while time.monotonic() < end:  # the import takes a while, in Python code
    pass
LOADED = True
"""


@pytest.mark.parametrize("give_up", ["abandon", "inline watchdog"])
def test_a_call_given_up_on_while_importing_finishes_the_import_first(tmp_path, monkeypatch, give_up):
    # An exception raised inside the import machinery can leave an import lock held, and every
    # later import in the process waits forever: a test run hung on a lazy `import datasets`
    # after a generate_tasks importing it was abandoned at its time limit.
    import sys

    from forge.env.calls import ThreadCall
    from forge.env.watchdog import InlineTimeout, call_inline, importing

    name = f"slow_to_import_{give_up.split()[0]}"
    (tmp_path / f"{name}.py").write_text(SLOW_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)

    def work():
        __import__(name)
        while True:  # then loops, so the stop lands here
            pass

    call, outcome = ThreadCall(), {}

    def run():
        try:
            if give_up == "abandon":
                call.run(work)
            else:
                call_inline(work, timeout_s=0.05)
        except BaseException as exc:
            outcome["raised"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    if give_up == "abandon":
        while not importing(thread.ident):
            time.sleep(0.01)
        call.abandon()
    thread.join(timeout=30)
    assert isinstance(outcome.get("raised"), Abandoned if give_up == "abandon" else InlineTimeout)
    assert sys.modules[name].LOADED
