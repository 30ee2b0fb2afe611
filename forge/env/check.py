"""`forge env check NAME`: run an env through its contract and report what to fix.

Checks construction, tasks, reset/step types, empty, huge and garbage actions, finishing
an episode, determinism under a seed, the harness timeouts (and that an env claiming
`blocking = False` answers quickly), tool schemas and close.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from forge.env.base import Env, StepResult, reset_problem, step_problem
from forge.env.calls import EnvTimeout, ThreadCall, build_env, call_env, in_daemon_thread
from forge.env.errors import user_frame
from forge.env.preflight import text_problem, tool_schema_problem
from forge.env.registry import resolve_env
from forge.env.tasks import as_dataset, generated_rows, load_tasks

HUGE_ACTION_CHARS = 1_000_000
HUGE_ACTION = "huge action"  # the check's name; its 1M-char probe is exempt from INLINE_LIMIT_S
HUNG_GRACE_S = 2.0  # past the timeout, a call the watchdog could not interrupt is reported hung
INLINE_LIMIT_S = 0.01
TASKS_FIX = (
    "generate_tasks runs before a run starts: keep it quick for the number asked (env.num_tasks), "
    "or write the tasks to a file once and set env.tasks to it"
)
MAX_TOKEN_SAMPLES = 20  # observations of the probe episode whose tokens are checked  # an env with blocking = False must answer every call within this
GARBAGE_ACTIONS = [
    "\x00\x01\x02\ufffd\U0001f600" * 50,
    "<tool_call>{not json</tool_call>",
    '<tool_call>{"name": "no_such_tool", "arguments": {}}</tool_call>',
    "<tool_call>" * 100,
    "<answer></answer>",
    "-1e309 NaN None null ]]]}}}",
]


@dataclass
class Check:
    name: str
    passed: bool
    detail: str
    fix: str = ""


@dataclass
class CheckReport:
    env: str
    checks: list[Check] = field(default_factory=list)
    # Told each check as it is recorded and each env call as it starts and ends (None), for a
    # parent process to watch (`forge.env.check_process`).
    sink: Callable[[dict[str, Any]], None] | None = field(default=None, repr=False, compare=False)

    def add(self, check: Check) -> None:
        self.checks.append(check)
        if self.sink is not None:
            self.sink({"check": [check.name, check.passed, check.detail, check.fix]})

    def calling(self, call: tuple[str, str, bool] | None) -> None:
        """An env call (check, method, whether inline) starts, or (None) the call running ended."""
        if self.sink is not None:
            self.sink({"call": list(call) if call else None})

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def render(self) -> str:
        lines = [f"forge env check {self.env}"]
        for c in self.checks:
            lines.append(f"  {'PASS' if c.passed else 'FAIL'}  {c.name:<16} {c.detail}")
            if not c.passed and c.fix:
                lines.append(f"        fix: {c.fix}")
        failed = sum(not c.passed for c in self.checks)
        verdict = "PASSED" if failed == 0 else "FAILED"
        lines.append(f"{verdict}: {len(self.checks) - failed} passed, {failed} failed")
        return "\n".join(lines)


class _Stop(Exception):
    """A check failed in a way that makes the later checks meaningless."""


def _step_problem(step: Any) -> str | None:
    problem = step_problem(step)
    if problem is not None:
        return problem
    try:
        json.dumps(step.info)
    except (TypeError, ValueError) as exc:
        where, value = _first_unserializable(step.info, "StepResult.info")
        kind = type(value)
        named = (
            kind.__name__
            if kind.__module__ == "builtins"
            else f"{kind.__module__.split('.')[0]}.{kind.__name__}"
        )
        return (
            f"{where} is {named}, which is not JSON-serializable ({exc}); the gateway sends info to agent "
            "programs as JSON, where it would arrive as its str(): give plain Python values (bool(x), float(x), "
            "int(x), x.tolist() for a numpy value; a list for a set)"
        )
    return None


def _first_unserializable(value: Any, where: str) -> tuple[str, Any]:
    """The first value inside `value` that json cannot write, and where it is (`info['a'][0]`)."""
    if isinstance(value, dict):
        items = [(f"{where}[{key!r}]", item) for key, item in value.items()]
    elif isinstance(value, (list, tuple)):
        items = [(f"{where}[{index}]", item) for index, item in enumerate(value)]
    else:
        return where, value
    for inner, item in items:
        try:
            json.dumps(item)
        except (TypeError, ValueError):
            return _first_unserializable(item, inner)
    return where, value


def _probe_actions(task: dict[str, Any], count: int) -> list[str]:
    """Generic replies that finish many simple envs: numbers, answers built from task values."""
    actions = []
    for value in task.values():
        if isinstance(value, (str, int, float)) and len(str(value)) < 200:
            actions += [str(value), f"<answer>{value}</answer>"]
    return (actions + [str(i) for i in range(count)])[:count]


def _first_difference(a: list[tuple], b: list[tuple]) -> str:
    for index, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            what = "reset observation" if index == 0 else f"step {index} (observation, reward, done)"
            return f"{what}: {str(x)[:150]!r} vs {str(y)[:150]!r}"
    return f"episodes of {len(a) - 1} and {len(b) - 1} steps"


def _inline(method: Callable) -> bool:
    """Whether the harness calls `method` (an env's method, or an env class: its
    constructor) inline (the env sets blocking = False)."""
    owner = method if isinstance(method, type) else getattr(method, "__self__", None)
    return getattr(owner, "blocking", True) is False


def _timeout_fix(method: Callable) -> str:
    if _inline(method):
        return (
            "the env sets blocking = False, so the harness calls it inline and only a watchdog can stop it; "
            "drop `blocking = False` (its calls then run in threads) or find what hangs"
        )
    return "keep each reset/step under env.step_timeout_s; run slow work in the sandbox with its own timeout"


class _Checker:
    def __init__(
        self,
        env_class: type[Env],
        kwargs: dict[str, Any],
        timeout_s: float,
        report: CheckReport,
        tokenizer: tuple[str, Any] | None = None,
    ):
        self.tokenizer = tokenizer  # (name, tokenizer) whose view of the env's text is checked
        self.env_class = env_class
        self.kwargs = kwargs
        self.timeout_s = timeout_s
        self.report = report
        self.slowest: tuple[float, str] = (0.0, "")
        self.slowest_inline = 0.0  # the slowest call but the 1M-char probe, for blocking = False
        self.opened: list[Env] = []  # closed at the end, also when a check stops early
        self.in_call: tuple[str, str, float] | None = None  # (check, method, started) of the call running
        self.stage = "construct"  # the check running, failed if anything escapes it

    def crashed(self, exc: BaseException) -> None:
        """Fail the check running with what escaped it: one line, and the user's frame when
        the exception came from the env's own code."""
        message = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        frame = user_frame(exc, self.env_class)
        where = f" at {frame.filename}:{frame.lineno} in {frame.name}" if frame else ""
        self.record(self.stage, False, f"the check raised {type(exc).__name__}: {message}{where}",
                    "fix what the error names; if it is in Forge's code, the env gave it something of the "
                    "wrong type (system_prompt, tools, an observation)")  # fmt: skip

    def record(self, name: str, passed: bool, detail: str, fix: str = "") -> bool:
        self.report.add(Check(name, passed, detail, fix))
        return passed

    async def call(self, name: str, method: Callable, *args: Any) -> Any:
        self.stage = name
        self.report.calling((name, method.__qualname__, _inline(method)))  # before the clock starts
        started = time.monotonic()
        self.in_call = (name, method.__qualname__, started)
        try:
            return await call_env(method, *args, timeout_s=self.timeout_s)
        except EnvTimeout:
            self.record(name, False, f"{method.__qualname__} did not return within {self.timeout_s:g}s",
                        _timeout_fix(method))  # fmt: skip
            raise _Stop from None
        except Exception as exc:
            self.record(
                name, False, f"{method.__qualname__} raised {type(exc).__name__}: {str(exc)[:200]}",
                "an env must answer every action (even invalid ones) with a StepResult, not raise",
            )  # fmt: skip
            raise _Stop from None
        finally:
            seconds = time.monotonic() - started
            self.in_call = None
            self.report.calling(None)
            self.slowest = max(self.slowest, (seconds, method.__qualname__))
            if name != HUGE_ACTION:
                self.slowest_inline = max(self.slowest_inline, seconds)

    async def new_env(self) -> Env:
        """Build the env as a run does (`build_env`: within the timeout, where its calls run),
        watched like any env call, so a constructor that hangs fails the check."""
        self.stage = "construct"
        label = f"{self.env_class.__name__}.__init__"
        self.report.calling(("construct", label, _inline(self.env_class)))
        self.in_call = ("construct", label, time.monotonic())
        try:
            env = await build_env(self.env_class, self.kwargs, timeout_s=self.timeout_s, limit="--timeout")
        except EnvTimeout as exc:
            where = f" (stuck at {exc.stuck_at.filename}:{exc.stuck_at.lineno} in {exc.stuck_at.name})"
            self.record("construct", False, f"{exc}{where if exc.stuck_at else ''}",
                        "keep __init__ quick: a run gives building an env env.step_timeout_s, like a step; "
                        "do slow setup lazily or once per process")  # fmt: skip
            raise _Stop from None
        except Exception as exc:
            self.record("construct", False, f"{self.env_class.__name__}(**{self.kwargs}) raised {exc!r}",
                        "the class must construct from env.kwargs alone")  # fmt: skip
            raise _Stop from None
        finally:
            self.in_call = None
            self.report.calling(None)
        self.opened.append(env)
        return env

    async def load_tasks(self, source: str | None, num_tasks: int, seed: int) -> Any:
        """The tasks a run would load; `generate_tasks` runs in a daemon thread, watched like
        an env call and failed past the timeout (naming where it was stuck), so a generator
        that hangs fails the check instead of hanging it."""
        if source is not None:  # a task file: data, not the env's code
            return load_tasks(self.env_class, source, num_tasks, seed, **self.kwargs)
        self.stage = "tasks"
        label = f"{self.env_class.__name__}.generate_tasks"
        self.report.calling(("tasks", label, False))
        self.in_call = ("tasks", label, time.monotonic())
        call = ThreadCall()

        def generate() -> list[dict[str, Any]]:
            return generated_rows(self.env_class, num_tasks, seed, **self.kwargs)

        try:
            rows = await asyncio.wait_for(in_daemon_thread(generate, call=call), timeout=self.timeout_s)
        except TimeoutError:
            stuck = call.give_up()
            where = f" (stuck at {stuck.filename}:{stuck.lineno} in {stuck.name})" if stuck else ""
            self.record("tasks", False, f"{label} did not return within {self.timeout_s:g}s (--timeout){where}",
                        TASKS_FIX)  # fmt: skip
            raise _Stop from None
        finally:
            self.in_call = None
            self.report.calling(None)
        return as_dataset(rows)  # after the limit: the env's time is its own code's only

    async def reset(self, env: Env, task: dict[str, Any], seed: int) -> str:
        observation = await self.call("reset", env.reset, task, seed)
        problem = reset_problem(observation, getattr(env, "system_prompt", None))
        if problem is not None:
            self.record("reset", False, f"reset {problem}",
                        "return the first observation as a string")  # fmt: skip
            raise _Stop
        return observation

    async def step(self, name: str, env: Env, action: str) -> StepResult:
        step = await self.call(name, env.step, action)
        problem = _step_problem(step)
        if problem:
            self.record(
                name,
                False,
                f"step {problem}",
                "return StepResult(observation: str, reward: float, done: bool, info: dict)",
            )
            raise _Stop
        return step

    async def episode(self, env: Env, task: dict[str, Any], seed: int, actions: list[str]) -> list[tuple]:
        trace: list[tuple] = [(await self.reset(env, task, seed),)]
        for action in actions:
            step = await self.step("episode", env, action)
            trace.append((step.observation, float(step.reward), step.done))
            if step.done:
                break
        return trace

    async def run(self, tasks_source: str | None, num_tasks: int, seed: int, max_steps: int) -> None:
        env = await self.new_env()
        self.record("construct", True, f"{self.env_class.__name__}(**{self.kwargs})")
        self.check_text(env)
        self.check_tools(env)
        try:
            tasks = await self.load_tasks(tasks_source, num_tasks, seed)
        except _Stop:
            raise
        except Exception as exc:
            self.record("tasks", False, f"{type(exc).__name__}: {str(exc)[:300]}",
                        "implement generate_tasks(num_tasks, seed) or set env.tasks to a task file")  # fmt: skip
            raise _Stop from None
        task = dict(tasks[0])
        again = await self.load_tasks(tasks_source, num_tasks, seed)
        if tasks_source is None and list(again) != list(tasks):
            self.record("tasks", False, "two generate_tasks calls with the same seed gave different tasks",
                        "draw task randomness from random.Random(seed), not the global RNG")  # fmt: skip
        else:
            self.record("tasks", True, f"{len(tasks)} tasks, columns {tasks.column_names}")

        observation = await self.reset(env, task, seed)
        self.record("reset", True, f"returned {len(observation)} chars")
        step = await self.step("step", env, "hello")
        self.record(
            "step",
            True,
            f"observation {len(step.observation)} chars, reward {float(step.reward)}, done {step.done}",
        )

        await self.reset(env, task, seed)
        await self.step("empty action", env, "")
        self.record("empty action", True, "answered with a StepResult")
        await self.reset(env, task, seed)
        await self.step(HUGE_ACTION, env, "x" * HUGE_ACTION_CHARS)
        self.record(HUGE_ACTION, True, f"{HUGE_ACTION_CHARS:,} chars answered within {self.timeout_s:g}s")
        rng = random.Random(seed)
        garbage = GARBAGE_ACTIONS + ["".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(500))]
        await self.reset(env, task, seed)
        for action in garbage:
            await self.step("garbage action", env, action)
        self.record("garbage action", True, f"{len(garbage)} malformed replies answered without raising")

        actions = _probe_actions(task, max_steps)
        first = await self.episode(env, task, seed, actions)
        if first[-1][-1] is True:
            replay = await self.episode(env, task, seed, actions)
            same = replay == first
            self.record("done", same, f"episode ended after {len(first) - 1} steps; reset after done "
                        + ("replays it exactly" if same else f"differs: {_first_difference(first, replay)}"),
                        "reset must clear all per-episode state")  # fmt: skip
        else:
            self.record("done", True, f"not reached within {max_steps} probe actions (not an error)")

        if self.tokenizer is not None:
            shown = [first[0][0]] + [observation for observation, _, done in first[1:] if not done]
            self.check_tokens(env, shown[:MAX_TOKEN_SAMPLES])

        mine = await self.episode(await self.new_env(), task, seed, actions[:5])
        theirs = await self.episode(await self.new_env(), task, seed, actions[:5])
        self.record("determinism", mine == theirs,
                    "same task, seed and actions give the same observations and rewards" if mine == theirs
                    else f"fresh envs diverged: {_first_difference(mine, theirs)}",
                    "derive all randomness from the seed passed to reset (random.Random(seed))")  # fmt: skip

        seconds, slowest = self.slowest
        self.record(
            "timeouts",
            True,
            f"every call returned within {self.timeout_s:g}s (slowest: {slowest}, {seconds:.2f}s)",
        )
        if getattr(env, "blocking", True) is False:
            inline = self.slowest_inline
            quick = inline <= INLINE_LIMIT_S
            self.record(
                "blocking=False", quick,
                f"slowest call but the huge action {inline * 1000:.1f} ms "
                + ("(inline calls are quick)" if quick else f"> {INLINE_LIMIT_S * 1000:g} ms: it stalls every episode on its worker"),
                "drop `blocking = False` so the harness runs its calls in threads (and can time them out)",
            )  # fmt: skip
        await self.call("close", env.close)
        self.opened.remove(env)
        self.record("close", True, "close() returned")

    async def close_rest(self) -> None:
        for env in self.opened:
            try:
                await call_env(env.close, timeout_s=self.timeout_s)
            except Exception:  # already reported, or not the check that failed
                pass

    def check_tokens(self, env: Env, observations: list[str]) -> None:
        from forge.env.tokens import tokenize_env_text

        self.stage = "tokens"
        name, tokenizer = self.tokenizer
        report = tokenize_env_text(tokenizer, observations, env.system_prompt, env.tools)
        self.record("tokens", report.unknown_tokens == 0, f"for {name}: {report.summary()}",
                    "the model would read <unk> for that text: train a model whose tokenizer covers it "
                    "(model.path), or word the prompt and observations in text it covers")  # fmt: skip

    def check_text(self, env: Env) -> None:
        """The system prompt and tools every episode renders: refused as `forge train` refuses them."""
        self.stage = "text"
        problem = text_problem(env)
        if problem:
            self.record("text", False, f"{self.env_class.__name__}.{problem}",
                        "set system_prompt to a string (or None) and tools to a list of function schemas")  # fmt: skip
            raise _Stop

    def check_tools(self, env: Env) -> None:
        self.stage = "tools"
        from forge.env.tools import ToolEnv

        if isinstance(env, ToolEnv) and not env.tools:  # most often a forgotten @tool
            candidates = _untagged_methods(type(env))
            plain = "are plain methods" if len(candidates) > 1 else "is a plain method"
            said = f" ({', '.join(candidates)} {plain}, not a @tool)" if candidates else ""
            self.record("tools", False, f"{type(env).__name__} is a ToolEnv with no tools, so its model is offered nothing to call{said}",
                        "decorate each method the model may call with @tool (from forge.env.tools import tool); "
                        "an env whose replies are only answers subclasses Env")  # fmt: skip
            return
        if not env.tools:
            return
        problems = [problem] if (problem := tool_schema_problem(env.tools)) else []
        try:
            json.dumps(env.tools)
        except (TypeError, ValueError) as exc:
            problems.append(f"not JSON-serializable: {exc}")
        self.record("tools", not problems, "; ".join(problems) or f"{len(env.tools)} valid function schemas",
                    "use OpenAI function schemas, e.g. via forge.env.tool on a ToolEnv method")  # fmt: skip


def _untagged_methods(env_class: type) -> list[str]:
    """Public plain methods the env's own classes define that are not tools and not part of
    the Env / ToolEnv contract: what a ToolEnv with no tools most likely meant as its tools."""
    from forge.env.tools import ToolEnv

    contract = {name for klass in ToolEnv.__mro__ for name in vars(klass)}
    found = []
    for klass in env_class.__mro__:
        if klass in ToolEnv.__mro__:
            break
        for name, value in vars(klass).items():
            if (
                not name.startswith("_")
                and name not in contract
                and inspect.isfunction(value)
                and name not in found
            ):
                found.append(name)
    return found


def check_env(
    name: str | type[Env],
    kwargs: dict[str, Any] | None = None,
    tasks: str | None = None,
    num_tasks: int = 8,
    seed: int = 0,
    timeout_s: float = 30.0,
    max_steps: int = 40,
    tokenizer: tuple[str, Any] | None = None,
    sink: Callable[[dict[str, Any]], None] | None = None,
) -> CheckReport:
    """Run the contract checks on env `name` (registry name, `module:Class` or the class);
    with `tokenizer` (a name for the report, the tokenizer), also how its prompt and
    observations tokenize, failing on unknown tokens; `sink` is told of each check and env
    call as it happens (see `CheckReport.sink`)."""
    label = name if isinstance(name, str) else f"{name.__module__}:{name.__qualname__}"
    report = CheckReport(label, sink=sink)
    try:
        env_class = resolve_env(name) if isinstance(name, str) else name
    except ValueError as exc:
        fix = (
            "make the module importable: run from the folder that holds it, add it to PYTHONPATH, or pip install it"
            if ":" in name
            else "pip install the package that registers it, or name it as package.module:ClassName"
        )
        report.add(Check("resolve", False, str(exc), fix))
        return report
    checker = _Checker(env_class, dict(kwargs or {}), timeout_s, report, tokenizer)

    async def run_all() -> None:
        try:
            await checker.run(tasks, num_tasks, seed, max_steps)
        except _Stop:
            pass
        except Exception as exc:  # a bug the checks did not foresee must fail, not pass unseen
            checker.crashed(exc)
        finally:
            await checker.close_rest()

    # On a thread of its own: an inline (blocking = False) call stuck inside C code (a long
    # sleep, a read) outlasts the watchdog, and must not hang the check with it.
    thread = threading.Thread(target=asyncio.run, args=(run_all(),), name="forge-env-check", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.1)
        current = checker.in_call
        if current is not None and time.monotonic() - current[2] > timeout_s + HUNG_GRACE_S:
            name, method, _ = current
            report.add(
                hung_check(name, method, timeout_s, inline=getattr(env_class, "blocking", True) is False)
            )
            break
    return report


def hung_check(name: str, method: str, timeout_s: float, inline: bool, held_gil: bool = False) -> Check:
    """The failed check of an env call that outlasted the timeout and its watchdog; `held_gil`:
    it stopped every thread of the check's process (C code that holds the GIL)."""
    how = "held the GIL, stopping every thread of the check" if held_gil else "could not be interrupted"
    if inline:
        fix = (
            "the env sets blocking = False, so its calls run on the worker's event loop, which one stuck call "
            "stalls (a run ends and restarts such a worker); drop `blocking = False` (its calls then run in "
            "threads) or find what hangs"
        )
    elif held_gil:
        fix = "C code that holds the GIL stops every thread; release the GIL in it or run it in a subprocess"
    elif name == "tasks":
        fix = TASKS_FIX
    elif name == "construct":
        fix = "keep __init__ quick (a run gives building an env env.step_timeout_s) and find what hangs"
    else:
        fix = (
            "keep each reset/step under env.step_timeout_s; run slow work in the sandbox with its own timeout"
        )
    return Check(name, False, f"{method} did not return within {timeout_s:g}s and {how}", fix)


def list_envs() -> str:
    """One line per installed env: registry name and `module:Class`."""
    from forge.env.registry import registered_envs

    envs = registered_envs()
    if not envs:
        return "no envs installed (entry point group forge.envs); pip install -e . registers the built-ins"
    width = max(map(len, envs))
    return "\n".join(f"{name:<{width}}  {target}" for name, target in sorted(envs.items()))


def add_check_arguments(parser: Any) -> None:
    parser.add_argument("name", help="registry name or package.module:ClassName")
    parser.add_argument(
        "--kwargs", default=None,
        help="JSON object of constructor arguments (default: the config's env.kwargs when NAME is its env, else {})",
    )  # fmt: skip
    parser.add_argument(
        "--tasks",
        default=None,
        help="jsonl/parquet/arrow file or dataset name (default: the config's env.tasks when NAME is its env)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds allowed per reset/step")
    parser.add_argument(
        "--model", default=None,
        help="checkpoint folder whose tokenizer the prompts are checked with (default: the config's model.path, "
        "else the built-in tiny model with the config's model.tiny.extra_words)",
    )  # fmt: skip
    parser.add_argument(
        "--config", default=None,
        help="a training config: its env is built with its env.kwargs (and env.tasks) and the text checked with "
        "the tokenizer of the model it trains; --kwargs, --tasks and --model, when given, win over it",
    )  # fmt: skip
