"""Reach a target number from a start with the moves +1, +3 and x2. A custom Forge env in
its own package, with a solver whose play gives the demonstrations `forge sft` learns from."""

import random
import re
from collections import deque

from forge.env import Env, StepResult

MOVES = {"+1": lambda v: v + 1, "+3": lambda v: v + 3, "x2": lambda v: v * 2}
# A reply is a move when it starts with one, written exactly (reach.yaml makes each a single
# token of the tiny model); anything else, a bare 3 or "+ 3" included, spends the turn.
MOVE = re.compile(r"\s*(\+1|\+3|x2)(?![\w+])")


def solve(start, target):
    """The shortest list of moves from start to target (breadth-first search)."""
    paths, queue = {start: []}, deque([start])
    while target not in paths:
        value = queue.popleft()
        for name, move in MOVES.items():
            if move(value) <= target and move(value) not in paths:
                paths[move(value)] = paths[value] + [name]
                queue.append(move(value))
    return paths[target]


def in_split(start, target, split):
    """A fifth of the (start, target) pairs are held out as the test split."""
    return ((start * 7 + target) % 5 == 0) == (split == "test")


def split_pairs(split, max_target=15):
    """Every (start, target) pair of a split, 1 <= start < target <= max_target."""
    return [(s, t) for t in range(2, max_target + 1) for s in range(1, t) if in_split(s, t, split)]


class ReachEnv(Env):
    """Reply one move a turn; reach the target exactly within the task's turn budget
    (its shortest solution plus one). Reward 1.0 on reaching it; overshooting ends the episode."""

    system_prompt = "Reach the target number: reply with one move, +1 or +3 or x2."

    def __init__(self, split="train", max_target=15):
        self.value = self.target = self.left = 0

    @classmethod
    def generate_tasks(cls, num_tasks, seed, split="train", max_target=15):
        """The split's (start, target) pairs, shuffled by `seed`, cycled to `num_tasks`: any
        num_tasks at least the pair count plays every pair, each as often (within one)."""
        pairs = split_pairs(split, max_target)
        random.Random(seed).shuffle(pairs)
        return [{"task_id": f"{start}-{target}", "start": start, "target": target,
                 "turns": len(solve(start, target)) + 1}
                for start, target in (pairs[i % len(pairs)] for i in range(num_tasks))]  # fmt: skip

    @classmethod
    def demonstrations(cls, tasks, **kwargs):
        """One transcript per task: the solver's moves played through the env itself."""
        transcripts = []
        for task in tasks:
            env = cls(**kwargs)
            messages = [{"role": "system", "content": cls.system_prompt},
                        {"role": "user", "content": env.reset(task, seed=0)}]  # fmt: skip
            for move in solve(task["start"], task["target"]):
                messages.append({"role": "assistant", "content": move})
                result = env.step(move)
                if not result.done:
                    messages.append({"role": "user", "content": result.observation})
            transcripts.append(messages)
        return transcripts

    def reset(self, task, seed):
        self.value, self.target, self.left = task["start"], task["target"], task["turns"]
        return self._where()

    def step(self, action):
        self.left -= 1
        match = MOVE.match(action)
        if match:
            self.value = MOVES[match.group(1)](self.value)
        reached = self.value == self.target
        done = reached or self.value > self.target or self.left == 0
        return StepResult(self._where(), reward=float(reached), done=done, info={"valid": bool(match)})

    def _where(self):
        # Numbers stand apart from punctuation, so the tiny model reads each as one token.
        return f"from {self.value} to {self.target} {self.left} turns left"
