"""Python coding: write a function; the `run_tests` tool runs hidden unit tests in the sandbox.

The hidden expected values never enter the sandbox: the sandbox only returns what the
model's function produced for each input, and the env compares, so printed or forged
"all tests passed" text cannot earn reward.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from forge import sandbox
from forge.env import StepResult, ToolEnv, tool
from forge.env.tools import truncate

# Runs inside the sandbox: import the solution, call it on each input, write the results.
RUNNER = """
import json, os, traceback
inputs = json.load(open("inputs.json"))
results = []
try:
    import solution
    function = getattr(solution, FUNCTION)
except BaseException:
    # Relative paths: the work dir's name is random and would make feedback irreproducible.
    results = [{"error": traceback.format_exc(limit=2).replace(os.getcwd() + "/", "")}] * len(inputs)
else:
    for args in inputs:
        try:
            results.append({"value": function(*args)})
        except BaseException as exc:
            results.append({"error": f"{type(exc).__name__}: {exc}"})
with open("results.json", "w") as out:
    json.dump(results, out, default=repr)
"""


@dataclass(frozen=True)
class Problem:
    name: str
    signature: str
    description: str
    reference: Callable[..., Any]
    make_args: Callable[[random.Random], list[Any]]


def _ints(rng: random.Random, low: int = -20, high: int = 20, max_len: int = 8) -> list[int]:
    return [rng.randint(low, high) for _ in range(rng.randint(0, max_len))]


def _word(rng: random.Random, max_len: int = 10) -> str:
    return "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(rng.randint(0, max_len)))


def _brackets(rng: random.Random) -> str:
    return "".join(rng.choice("()[]{}") for _ in range(rng.randint(0, 8)))


def _balanced(text: str) -> bool:
    pairs, stack = {")": "(", "]": "[", "}": "{"}, []
    for char in text:
        if char in "([{":
            stack.append(char)
        elif not stack or stack.pop() != pairs[char]:
            return False
    return not stack


def _digital_root(n: int) -> int:
    while n >= 10:
        n = sum(int(d) for d in str(n))
    return n


PROBLEMS = [
    Problem("count_multiples", "count_multiples(xs: list[int], k: int) -> int",
            "Return how many elements of xs are divisible by k (k is never 0).",
            lambda xs, k: sum(x % k == 0 for x in xs), lambda r: [_ints(r), r.choice([2, 3, 4, 5, 7])]),
    Problem("rotate_left", "rotate_left(xs: list[int], k: int) -> list[int]",
            "Return xs rotated left by k positions (k >= 0 may exceed len(xs); an empty list stays empty).",
            lambda xs, k: xs[k % len(xs):] + xs[:k % len(xs)] if xs else [], lambda r: [_ints(r), r.randint(0, 12)]),
    Problem("running_max", "running_max(xs: list[int]) -> list[int]",
            "Return the list whose i-th element is max(xs[:i+1]).",
            lambda xs: [max(xs[: i + 1]) for i in range(len(xs))], lambda r: [_ints(r)]),
    Problem("caesar", "caesar(text: str, shift: int) -> str",
            "Shift every lowercase letter forward by shift places, wrapping z to a; keep other characters.",
            lambda t, s: "".join(chr((ord(c) - 97 + s) % 26 + 97) if c.islower() else c for c in t),
            lambda r: [_word(r), r.randint(0, 30)]),
    Problem("dedupe", "dedupe(xs: list[int]) -> list[int]",
            "Return xs without repeated values, keeping each value's first occurrence in order.",
            lambda xs: list(dict.fromkeys(xs)), lambda r: [_ints(r, 0, 5, 10)]),
    Problem("is_balanced", "is_balanced(text: str) -> bool",
            "Return True when the brackets ()[]{} in text are balanced and properly nested.",
            _balanced, lambda r: [_brackets(r)]),
    Problem("digital_root", "digital_root(n: int) -> int",
            "Repeatedly sum the decimal digits of n (n >= 0) until one digit remains; return it.",
            _digital_root, lambda r: [r.randint(0, 10**6)]),
    Problem("second_largest", "second_largest(xs: list[int]) -> int | None",
            "Return the second largest distinct value in xs, or None if there are fewer than two.",
            lambda xs: sorted(set(xs))[-2] if len(set(xs)) > 1 else None, lambda r: [_ints(r, -5, 5)]),
]  # fmt: skip
PROBLEMS_BY_NAME = {p.name: p for p in PROBLEMS}


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value))


class PythonCodingEnv(ToolEnv):
    """Write the requested function. `run_tests(code)` runs it against hidden tests in the
    sandbox and reports the first failure, so the model can debug over several turns; the
    episode ends with reward 1.0 when every test passes, or with the graded `<answer>`."""

    runs_untrusted_code = True
    system_prompt = (
        "You write Python functions. Test a solution with "
        '<tool_call>{"name": "run_tests", "arguments": {"code": "def f(...): ..."}}</tool_call>; '
        "you may fix it and test again. All tests passing ends the task. You may instead give a "
        "final solution as <answer>code</answer>."
    )

    def __init__(self, num_tests: int = 12, timeout_s: float = 5.0, min_sandbox_level: int = 0) -> None:
        self.num_tests = num_tests
        self.timeout_s = timeout_s
        self.min_sandbox_level = min_sandbox_level
        self.function_name = ""
        self.inputs: list[list[Any]] = []
        self.expected: list[Any] = []

    @classmethod
    def generate_tasks(cls, num_tasks: int, seed: int, num_tests: int = 12, **_: Any) -> list[dict[str, Any]]:
        rng = random.Random(seed)
        tasks = []
        for i in range(num_tasks):
            problem = PROBLEMS[rng.randrange(len(PROBLEMS))]
            inputs = [_as_json(problem.make_args(rng)) for _ in range(num_tests)]
            expected = [_as_json(problem.reference(*args)) for args in inputs]
            tasks.append(
                {
                    "task_id": f"coding-{seed}-{i}-{problem.name}",
                    "function_name": problem.name,
                    "prompt": f"Write a Python function `{problem.signature}`. {problem.description}\n"
                    f"Example: {problem.name}({', '.join(map(repr, inputs[0]))}) == {expected[0]!r}",
                    "tests": json.dumps({"inputs": inputs, "expected": expected}),
                }
            )
        return tasks

    def reset(self, task: dict[str, Any], seed: int) -> str:
        self.function_name = task["function_name"]
        tests = json.loads(task["tests"])
        self.inputs, self.expected = tests["inputs"], tests["expected"]
        self.best_passed = 0
        return task["prompt"]

    def grade(self, code: str) -> tuple[int, str]:
        """Run `code` on the hidden inputs in the sandbox: (tests passed, feedback)."""
        result = sandbox.run(
            RUNNER.replace("FUNCTION", repr(self.function_name)),
            files={"solution.py": code, "inputs.json": json.dumps(self.inputs)},
            collect=["results.json"],
            timeout_s=self.timeout_s,
            limits=sandbox.Limits(memory_bytes=512 << 20, output_bytes=64 << 10),
            min_level=self.min_sandbox_level,
        )
        if result.memory_exceeded:  # a process was killed: whatever it wrote may be incomplete
            return 0, "killed for using more memory than the tests may"
        if result.timed_out:
            return 0, f"timed out after {self.timeout_s:.0f}s"
        try:
            results = json.loads(result.files["results.json"])
        except (KeyError, json.JSONDecodeError):
            return (
                0,
                f"the tests did not run (exit code {result.exit_code}):\n{truncate(result.stderr, 1500)}",
            )
        count = len(self.inputs)
        results = (results if isinstance(results, list) else [])[:count]
        results += [{"error": "no result"}] * (count - len(results))
        passed = 0
        first_failure = ""
        for args, want, got in zip(self.inputs, self.expected, results, strict=True):
            if isinstance(got, dict) and "value" in got and _as_json(got["value"]) == want:
                passed += 1
            elif not first_failure:
                shown = (
                    got.get("error") if isinstance(got, dict) and "error" in got else repr(got.get("value"))
                )
                call = f"{self.function_name}({', '.join(map(repr, args))})"
                first_failure = f"\nfirst failure: {call} returned {shown}, expected {want!r}"
        return passed, f"{passed}/{len(self.inputs)} tests passed{first_failure}"

    @tool
    def run_tests(self, code: str) -> str | StepResult:
        """Run the hidden unit tests against a solution.

        Args:
            code: Python source defining the requested function
        """
        passed, feedback = self.grade(code)
        self.best_passed = max(self.best_passed, passed)
        if passed == len(self.inputs):
            return self.done(1.0, True, feedback, tests_passed=passed, tests_total=len(self.inputs))
        return feedback

    def score_answer(self, answer: str) -> StepResult:
        code = answer.strip().removeprefix("```python").removeprefix("```").removesuffix("```")
        passed, feedback = self.grade(code)
        success = passed == len(self.inputs)
        return self.done(float(success), success, feedback, tests_passed=passed, tests_total=len(self.inputs))
