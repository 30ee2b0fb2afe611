"""Heavy-tailed step latency for any env (`env.latency`): a straggler workload from config.

`LatencyEnv` wraps an env so that each step, after the env answered, waits a delay drawn
from a seeded distribution. The wait is an `asyncio.sleep`, so a waiting episode holds no
thread and no other episode on the worker waits for it; the wrapped env's own methods are
still called as its `blocking` setting says (`forge.env.calls.call_env`).
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
from typing import Any

from forge.env.base import Env, StepResult
from forge.env.calls import call_env

# The standard normal's 99th percentile: a lognormal's p99 is exp(mu + Z99 * sigma).
Z99 = statistics.NormalDist().inv_cdf(0.99)


class LatencySampler:
    """Delays in seconds: lognormal with the given median and 99th percentile, capped at
    `max_ms` when set. Seeded, so the same seed draws the same delays."""

    def __init__(self, median_ms: float, p99_ms: float, max_ms: float | None = None, seed: int = 0) -> None:
        if not 0 < median_ms < p99_ms:
            raise ValueError(
                f"latency: need 0 < median_ms < p99_ms, got median_ms={median_ms}, p99_ms={p99_ms}"
            )
        self.mu = math.log(median_ms / 1000.0)
        self.sigma = math.log(p99_ms / median_ms) / Z99
        self.max_s = None if max_ms is None else max_ms / 1000.0
        self.rng = random.Random(seed)

    def quantile(self, q: float) -> float:
        """The distribution's q-quantile in seconds (before the cap)."""
        return math.exp(self.mu + self.sigma * statistics.NormalDist().inv_cdf(q))

    def sample(self) -> float:
        delay = self.rng.lognormvariate(self.mu, self.sigma)
        return delay if self.max_s is None else min(delay, self.max_s)


class LatencyEnv(Env):
    """`env` whose every step takes a sampled extra delay; its prompt, tools and close are
    the wrapped env's. The delays of an episode are seeded by its episode seed."""

    def __init__(
        self,
        env: Env,
        median_ms: float,
        p99_ms: float,
        max_ms: float | None,
        seed: int,
        step_timeout_s: float,
    ) -> None:
        LatencySampler(median_ms, p99_ms, max_ms)  # bad settings fail here, not at the first reset
        self.env = env
        self.settings = (median_ms, p99_ms, max_ms)
        self.seed = seed
        self.step_timeout_s = step_timeout_s
        self.sampler: LatencySampler | None = None
        self.tools = env.tools
        self.system_prompt = env.system_prompt
        self.runs_untrusted_code = env.runs_untrusted_code
        self.delay_seconds = 0.0  # this episode's delays so far

    async def reset(self, task: dict[str, Any], seed: int) -> str:
        # An int mixing both seeds: the same episode seed and latency seed give the same delays.
        self.sampler = LatencySampler(*self.settings, seed=seed * 1_000_003 + self.seed)
        self.delay_seconds = 0.0
        return await call_env(self.env.reset, task, seed, timeout_s=self.step_timeout_s)

    async def step(self, action: str) -> StepResult:
        result = await call_env(self.env.step, action, timeout_s=self.step_timeout_s)
        if self.sampler is None:
            raise RuntimeError("LatencyEnv.step called before reset")
        delay = self.sampler.sample()
        self.delay_seconds += delay
        await asyncio.sleep(delay)
        return result

    def close(self) -> None:
        self.env.close()


def unwrapped(env: Env) -> Env:
    """The env a `LatencyEnv` wraps (whose class and methods messages should name), else `env`."""
    return env.env if isinstance(env, LatencyEnv) else env


def with_latency(env: Env, latency: Any, step_timeout_s: float) -> Env:
    """`env` wrapped by `env.latency` (a `forge.config.LatencyConfig`), or `env` itself
    when the config asks for no latency. Unset, the cap is half the step timeout, so a
    delay alone never times a step out."""
    if latency.dist == "none":
        return env
    max_ms = latency.max_ms if latency.max_ms is not None else step_timeout_s * 500.0
    return LatencyEnv(env, latency.median_ms, latency.p99_ms, max_ms, latency.seed, step_timeout_s)
