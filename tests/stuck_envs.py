"""Inline (`blocking = False`) envs whose step gets stuck inside one C call, for the tests
that a stuck env cannot hang a run: a task with `"stuck": "sleep"` sleeps (the GIL
released), one with `"stuck": "regex"` backtracks in `re` (the GIL held); others finish.
With `"once": PATH` it gets stuck only the first time (PATH marks that it did)."""

from __future__ import annotations

import os
import re
import time

from forge.env.base import Env, StepResult


class StuckInlineEnv(Env):
    blocking = False

    def reset(self, task, seed):
        self.stuck = task.get("stuck", "")
        once = task.get("once", "")
        if self.stuck and once:
            try:
                os.close(os.open(once, os.O_CREAT | os.O_EXCL))  # the first episode of the task claims it
            except FileExistsError:
                self.stuck = ""
        return "guess"

    def step(self, action):
        if self.stuck == "sleep":
            time.sleep(10**6)  # stuck here: one C call, the GIL released
        if self.stuck == "regex":
            re.match(r"(a+)+$", "a" * 64 + "b")  # stuck here: one C call, the GIL held
        return StepResult("done", reward=1.0, done=True)
