"""Envs for runs whose rollout workers sit on a weaker node than the driver: a process that
imports this module with FORGE_TEST_WORKER_SANDBOX_LEVEL set (the tests give it to the
workers only, through their Ray runtime env) takes that level as its probe's answer, as a
node without bubblewrap or user namespaces would find."""

from __future__ import annotations

import os

from forge.sandbox import levels
from forge_envs.guess_number import GuessNumberEnv

LEVEL_VAR = "FORGE_TEST_WORKER_SANDBOX_LEVEL"

if (simulated := os.environ.get(LEVEL_VAR)) is not None:
    levels._level = int(simulated)
    levels._unavailable.update({level: "simulated weaker node" for level in range(int(simulated) + 1, 3)})


class TrustedGuessEnv(GuessNumberEnv):
    pass


class UntrustedGuessEnv(GuessNumberEnv):
    runs_untrusted_code = True
