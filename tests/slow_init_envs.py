"""Envs whose constructor hangs or raises, for the tests that building an env cannot hang
the harness: `hang="sleep"` sleeps in one C call (the GIL released), `"regex"` backtracks
in `re` (the GIL held), `"spin"` loops in Python, `"raise"` raises. With `once=PATH` the
first construction anywhere (the dry run's) claims PATH and is quick; later ones hang."""

from __future__ import annotations

import os
import re
import time

from forge.env.base import Env, StepResult


class SlowInitEnv(Env):
    def __init__(self, hang: str = "", once: str = "") -> None:
        if once:
            try:
                os.close(os.open(once, os.O_CREAT | os.O_EXCL))
                hang = ""  # the first construction claims PATH
            except FileExistsError:
                pass
        if hang == "sleep":
            time.sleep(10**6)  # stuck here: one C call, the GIL released
        if hang == "regex":
            re.match(r"(a+)+$", "a" * 64 + "b")  # stuck here: one C call, the GIL held
        while hang == "spin":  # stuck here: a Python loop
            pass
        if hang == "raise":
            raise ValueError("no board of that size")  # raised here: the user's bug

    @classmethod
    def generate_tasks(cls, num_tasks, seed, **kwargs):
        return [{"task_id": str(i)} for i in range(num_tasks)]

    def reset(self, task, seed):
        return "guess"

    def step(self, action):
        return StepResult("done", reward=1.0, done=True)


class InlineSlowInitEnv(SlowInitEnv):
    """The same, with `blocking = False`: built on the event loop, like its calls run."""

    blocking = False
