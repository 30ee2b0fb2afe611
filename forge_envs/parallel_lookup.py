"""Parallel lookup: find the values of K keys in a generated table. One agent looks up one
key a turn (K turns); a team spawns one sub-agent per key and is done in 2 critical steps.

Replies use a grammar a tiny model can sample (configs/swarm.yaml adds its two words,
`find` and `spawn`, to the tiny tokenizer): a reply's first number is a lookup (`3` ->
`3 is 7`); `spawn 3 9 12` (with swarm.enabled) starts one sub-agent per number, each on
the sub-task `find 3`, and their answers come back as the spawn call's result. The
episode succeeds once every asked key's value has reached the agent.
"""

from __future__ import annotations

import random
import re
from typing import Any

from forge.env import StepResult, ToolEnv, tool
from forge.env.tools import ToolCall

_FACT = re.compile(r"\b(\d+) is (\d+)\b")
_INTEGER = re.compile(r"\b\d+\b")
VALUES = 16  # values are 0..15: single tokens of the tiny tokenizer


class ParallelLookupEnv(ToolEnv):
    """Look up every key named in the prompt (`find 3 9 12 5`); solved once all their values
    were read (by the agent's own lookups or its sub-agents'), within the harness's
    `max_turns`. Each asked key's first reading earns 1/k, so the outcome is the share of
    keys found (1.0 when solved) and a success outranks a failure by at least 1/k: train
    with reward.outcome_gap = 1/k. `partial_credit=False` scores 1.0 for solved, else 0."""

    blocking = False  # table lookups and regexes: inline, no thread hand-off
    render_tools = False  # the grammar below, not JSON tool calls
    max_calls_per_turn = 1
    subagent_system_prompt = None  # a sub-agent reads `find 3`, the same task with one key

    def __init__(
        self, num_keys: int = 10, k: int = 4, explain: bool = False, partial_credit: bool = True
    ) -> None:
        if not 1 <= k <= num_keys <= VALUES:
            raise ValueError(f"parallel_lookup: need 1 <= k={k} <= num_keys={num_keys} <= {VALUES}")
        self.num_keys = num_keys
        self.k = k
        self.keys: list[int] = []
        self.table: list[int] = []
        self.found: set[int] = set()
        self.partial_credit = partial_credit
        if explain:  # for a model that reads instructions; the tiny one learns the grammar by trying
            self.system_prompt = "Reply with a key to look it up (3), or spawn sub-agents that each look one up (spawn 3 9 12)."

    @classmethod
    def generate_tasks(
        cls, num_tasks: int, seed: int, num_keys: int = 10, k: int = 4, **_: Any
    ) -> list[dict]:
        rng = random.Random(seed)
        return [
            {
                "task_id": f"lookup-{seed}-{i}",
                "keys": rng.sample(range(num_keys), k),
                "table": [rng.randrange(VALUES) for _ in range(num_keys)],
            }  # fmt: skip
            for i in range(num_tasks)
        ]

    @classmethod
    def demonstrations(
        cls, tasks: list[dict[str, Any]], spawn: bool = False, **_: Any
    ) -> list[list[dict[str, str]]]:
        """Transcripts for `forge sft`, keys in ascending order (the next one is the smallest
        not yet looked up: an order a tiny model learns far sooner than the prompt's): one
        agent looking up a key a turn, or with `spawn` (what `forge sft` asks for under
        swarm.enabled) a team's: per task the orchestrator handing every key out in one
        call (`spawn 3 9 12`, whose result solves the episode) and one sub-agent transcript
        per key (`find 3` -> `3`)."""
        transcripts = []
        for task in tasks:
            keys = sorted(task["keys"])
            prompt = "find " + " ".join(map(str, task["keys"]))
            if spawn:
                transcripts.append([{"role": "user", "content": prompt},
                                    {"role": "assistant", "content": "spawn " + " ".join(map(str, keys))}])  # fmt: skip
                transcripts += [
                    [{"role": "user", "content": f"find {key}"}, {"role": "assistant", "content": str(key)}]
                    for key in keys
                ]
                continue
            messages = [{"role": "user", "content": prompt}]
            for key in keys:
                messages.append({"role": "assistant", "content": str(key)})
                messages.append({"role": "user", "content": f"{key} is {task['table'][key]}"})
            transcripts.append(messages[:-1])
        return transcripts

    def reset(self, task: dict[str, Any], seed: int) -> str:
        self.keys = [int(key) for key in task["keys"]]
        self.table = [int(value) for value in task["table"]]
        self.found = set()
        return "find " + " ".join(map(str, self.keys))

    def parse_calls(self, action: str) -> tuple[list[ToolCall], list[str]]:
        words = action.split()
        if words and words[0] == "spawn":
            keys = [w for w in words[1:] if w.isdigit()]
            if not keys:
                return [], ["invalid"]
            return [ToolCall("spawn", {"tasks": [{"prompt": f"find {key}"} for key in keys]})], []
        number = _INTEGER.search(action)
        if number is None:
            return [], ["invalid"]
        return [ToolCall("lookup", {"key": int(number.group())})], []

    def format_responses(self, responses: list[str]) -> str:
        return "\n".join(responses)

    @tool
    async def lookup(self, key: int) -> str:
        """The value stored under a key.

        Args:
            key: the key, a number
        """
        if not 0 <= key < len(self.table):
            return "invalid"
        return f"{key} is {self.table[key]}"

    async def step(self, action: str) -> StepResult:
        result = await super().step(action)
        before = len(self.found)
        for key, value in _FACT.findall(result.observation):
            if int(key) in self.keys and self.table[int(key)] == int(value):
                self.found.add(int(key))
        credit = (len(self.found) - before) / len(self.keys) if self.partial_credit else 0.0
        if len(self.found) == len(self.keys):
            return self.done(
                credit if self.partial_credit else 1.0, True, result.observation, found=len(self.found)
            )
        result.reward = credit
        result.info["found"] = len(self.found)
        return result

    def subtask_succeeded(self, prompt: str, answer: str) -> bool:
        """A sub-agent on `find 3` finished when its answer holds key 3's value."""
        asked = _INTEGER.search(prompt)
        if asked is None or not 0 <= int(asked.group()) < len(self.table):
            return False
        return f"{asked.group()} is {self.table[int(asked.group())]}" in answer
