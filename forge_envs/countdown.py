"""Countdown: reach a target number from given numbers with + - * /, using a calculator tool."""

from __future__ import annotations

import ast
import random
from collections import Counter
from fractions import Fraction
from typing import Any

from forge.env import StepResult, ToolEnv, tool

MAX_EXPRESSION_CHARS = 200
MAX_MAGNITUDE = 10**12
_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b, ast.Div: None}


class ExpressionError(ValueError):
    pass


def evaluate(expression: str) -> tuple[Fraction, list[int]]:
    """Exact value of an arithmetic expression (+ - * / parentheses, integers) and the
    integers it uses. No names, calls or powers: this parses, it never executes."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise ExpressionError(f"not an arithmetic expression: {exc.msg}") from None
    numbers: list[int] = []

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            numbers.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = walk(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Div):
                if right == 0:
                    raise ExpressionError("division by zero")
                value = left / right
            else:
                value = _OPS[type(node.op)](left, right)
            if abs(value) > MAX_MAGNITUDE:
                raise ExpressionError("intermediate result too large")
            return value
        raise ExpressionError(
            f"only integers, + - * / and parentheses are allowed, not {type(node).__name__}"
        )

    return walk(tree.body), numbers


def _format(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def _random_expression(rng: random.Random, numbers: list[int]) -> tuple[str, Fraction]:
    """Combine all `numbers` with random operations, keeping every intermediate a positive integer."""
    items = [(str(n), Fraction(n)) for n in numbers]
    while len(items) > 1:
        (a_text, a), (b_text, b) = items.pop(rng.randrange(len(items))), items.pop(rng.randrange(len(items)))
        if a < b:
            (a_text, a), (b_text, b) = (b_text, b), (a_text, a)
        choices = [("+", a + b), ("*", a * b)]
        if a > b:
            choices.append(("-", a - b))
        if b > 1 and (a / b).denominator == 1:
            choices.append(("/", a / b))
        op, value = rng.choice(choices)
        items.append((f"({a_text} {op} {b_text})", value))
    return items[0]


class CountdownEnv(ToolEnv):
    """Use every given number exactly once with + - * / to reach the target. The model may
    try expressions with the `calculator` tool, then answers `<answer>expression</answer>`.
    Reward 1.0 for a correct final expression; one answer ends the episode."""

    system_prompt = (
        "You solve Countdown puzzles. Combine each given number exactly once with + - * / and "
        "parentheses to reach the target. Call the calculator tool as "
        '<tool_call>{"name": "calculator", "arguments": {"expression": "..."}}</tool_call> '
        "and give your final expression as <answer>...</answer>."
    )

    def __init__(self, num_numbers: int = 4, max_number: int = 25) -> None:
        if not 2 <= num_numbers <= 6:
            raise ValueError(f"countdown: num_numbers={num_numbers} must be between 2 and 6")
        self.num_numbers = num_numbers
        self.max_number = max_number
        self.numbers: list[int] = []
        self.target = 0

    @classmethod
    def generate_tasks(
        cls, num_tasks: int, seed: int, num_numbers: int = 4, max_number: int = 25, **_: Any
    ) -> list[dict[str, Any]]:
        rng = random.Random(seed)
        tasks = []
        while len(tasks) < num_tasks:
            numbers = [rng.randint(1, max_number) for _ in range(num_numbers)]
            expression, value = _random_expression(rng, numbers)
            if value.denominator == 1 and 1 <= value <= 1000:
                tasks.append(
                    {
                        "task_id": f"countdown-{seed}-{len(tasks)}",
                        "numbers": numbers,
                        "target": int(value),
                        "solution": expression,
                    }  # fmt: skip
                )
        return tasks

    def reset(self, task: dict[str, Any], seed: int) -> str:
        self.numbers = [int(n) for n in task["numbers"]]
        self.target = int(task["target"])
        return f"Numbers: {self.numbers}. Target: {self.target}."

    @tool
    def calculator(self, expression: str) -> str:
        """Evaluate an arithmetic expression exactly.

        Args:
            expression: integers with + - * / and parentheses, e.g. "(3 + 5) * 2"
        """
        try:
            value, _ = evaluate(expression)
        except ExpressionError as exc:
            return f"error: {exc}"
        return _format(value)

    def score_answer(self, answer: str) -> StepResult:
        try:
            value, used = evaluate(answer)
        except ExpressionError as exc:
            return self.done(0.0, False, f"invalid answer: {exc}", reason="invalid_expression")
        if Counter(used) != Counter(self.numbers):
            return self.done(
                0.0, False, f"the answer must use each of {self.numbers} exactly once", reason="wrong_numbers"
            )
        if value != self.target:
            return self.done(
                0.0, False, f"{answer} = {_format(value)}, not {self.target}", reason="wrong_value"
            )
        return self.done(1.0, True, "correct")
