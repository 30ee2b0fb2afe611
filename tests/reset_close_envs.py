"""Envs whose reset, close or generate_tasks fails, for the tests that none can hang or
crash the harness: `on_reset` "raise", "sleep" (hangs) or "dict" (the wrong type);
`on_close` "raise", "sleep" (hangs in a C call) or "spin" (hangs in Python); `on_tasks`
"sleep" (generate_tasks hangs). With `once=PATH` the first reset anywhere (the dry run's)
claims PATH and works; later ones fail."""

from __future__ import annotations

import os
import time

from forge.env.base import Env, StepResult


class ResetCloseEnv(Env):
    def __init__(self, on_reset: str = "", on_close: str = "", once: str = "", on_tasks: str = "") -> None:
        self.on_reset = on_reset
        self.on_close = on_close
        self.once = once

    @classmethod
    def generate_tasks(cls, num_tasks, seed, on_tasks="", **kwargs):
        if on_tasks == "sleep":
            time.sleep(10**6)  # generate_tasks stuck here
        return [{"task_id": str(i)} for i in range(num_tasks)]

    def reset(self, task, seed):
        failing = self.on_reset
        if self.once:
            try:
                os.close(os.open(self.once, os.O_CREAT | os.O_EXCL))
                failing = ""  # the first reset claims PATH
            except FileExistsError:
                pass
        if failing == "raise":
            raise ValueError("no such level")  # reset raised here
        if failing == "sleep":
            time.sleep(10**6)  # reset stuck here
        if failing == "dict":
            return {"board": "...."}
        return "guess"

    def step(self, action):
        return StepResult("done", reward=1.0, done=True)

    def close(self):
        if self.on_close == "raise":
            raise OSError("the board file is gone")  # close raised here
        if self.on_close == "sleep":
            time.sleep(10**6)  # close stuck here
        while self.on_close == "spin":  # close spins here
            pass


class InlineResetCloseEnv(ResetCloseEnv):
    """The same, with `blocking = False`: its calls run on the event loop, under the watchdog."""

    blocking = False
