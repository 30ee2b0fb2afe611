"""env.latency: seeded heavy-tailed step delays for any env, awaited without blocking other
episodes, validated with messages that name the key."""

from __future__ import annotations

import asyncio
import statistics
import time

import pytest

from forge.config import ConfigError, load_config
from forge.env import Env, StepResult
from forge.env.calls import call_env
from forge.env.latency import LatencyEnv, LatencySampler, with_latency
from forge_envs.guess_number import GuessNumberEnv


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000, method="inclusive")[round(q * 1000) - 1]


def test_a_lognormal_sampler_has_the_asked_median_and_99th_percentile():
    sampler = LatencySampler(median_ms=50, p99_ms=2000, seed=7)
    delays = [sampler.sample() for _ in range(200_000)]
    assert quantile(delays, 0.5) == pytest.approx(0.050, rel=0.03)
    assert quantile(delays, 0.99) == pytest.approx(2.0, rel=0.06)
    assert sampler.quantile(0.5) == pytest.approx(0.050) and sampler.quantile(0.99) == pytest.approx(2.0)
    assert statistics.fmean(delays) > 3 * quantile(
        delays, 0.5
    )  # heavy-tailed: the mean sits far above the median


def test_the_same_seed_draws_the_same_delays_and_another_seed_others():
    first = [LatencySampler(50, 2000, seed=3).sample() for _ in range(1)]
    again = LatencySampler(50, 2000, seed=3)
    other = LatencySampler(50, 2000, seed=4)
    assert [again.sample()] == first
    assert other.sample() != first[0]


def test_the_cap_bounds_every_delay():
    sampler = LatencySampler(50, 2000, max_ms=300, seed=0)
    delays = [sampler.sample() for _ in range(20_000)]
    assert max(delays) == 0.3
    assert quantile(delays, 0.5) == pytest.approx(0.050, rel=0.05)


class SlowBlockingEnv(Env):
    """A plain, blocking env (it runs in a thread); each step counts."""

    def reset(self, task, seed):
        self.steps = 0
        return "go"

    def step(self, action):
        self.steps += 1
        return StepResult(f"step {self.steps}", reward=1.0, done=self.steps == 3, info={"action": action})


def test_the_wrapped_env_answers_as_before_and_keeps_its_prompt_and_tools():
    inner = GuessNumberEnv(n=4)
    env = LatencyEnv(inner, median_ms=1, p99_ms=5, max_ms=None, seed=0, step_timeout_s=5)
    assert env.system_prompt == inner.system_prompt and env.tools == inner.tools

    async def play() -> list[StepResult]:
        assert (
            await call_env(env.reset, {"secret": 2, "n": 4}, 0, timeout_s=5) == "guess a number from 0 to 3"
        )
        return [await call_env(env.step, guess, timeout_s=5) for guess in ("1", "3", "2")]

    results = asyncio.run(play())
    assert [r.observation for r in results] == ["higher", "lower", "correct"]
    assert results[-1].done and results[-1].reward == 1.0
    assert env.delay_seconds > 0


def test_delays_are_awaited_concurrently_so_episodes_do_not_wait_for_each_other():
    """Ten episodes whose every step sleeps ~0.2 s take about one episode's time, not ten:
    the waits overlap on the event loop (and a blocking env still runs in its threads)."""
    envs = [LatencyEnv(SlowBlockingEnv(), 200, 201, None, seed=i, step_timeout_s=5) for i in range(10)]

    async def episode(env: LatencyEnv) -> None:
        await call_env(env.reset, {}, 0, timeout_s=5)
        done = False
        while not done:
            done = (await call_env(env.step, "x", timeout_s=5)).done

    async def all_episodes() -> None:
        await asyncio.gather(*(episode(env) for env in envs))

    started = time.monotonic()
    asyncio.run(all_episodes())
    elapsed = time.monotonic() - started
    slept = max(env.delay_seconds for env in envs)
    assert slept == pytest.approx(0.6, rel=0.02)
    assert elapsed < 2 * slept  # one episode's delays, not the sum of ten (6 s)


def test_an_episode_seed_fixes_its_delays():
    def delays(seed: int) -> list[float]:
        env = LatencyEnv(GuessNumberEnv(), 5, 50, None, seed=5, step_timeout_s=5)

        async def play() -> None:
            await env.reset({"secret": 0, "n": 4}, seed)
            await env.step("1")
            await env.step("2")

        asyncio.run(play())
        return env.delay_seconds

    assert delays(11) == delays(11)
    assert delays(11) != delays(12)


def test_no_latency_leaves_the_env_unwrapped():
    env = GuessNumberEnv()
    assert with_latency(env, load_config(None).env.latency, 30.0) is env
    wrapped = with_latency(env, load_config(None, ["env.latency.dist=lognormal"]).env.latency, 30.0)
    assert isinstance(wrapped, LatencyEnv) and wrapped.env is env
    assert wrapped.settings == (50.0, 2000.0, 15_000.0)  # unset cap: half the step timeout


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["env.latency.dist=lognormal", "env.latency.p99_ms=40"], "p99_ms=40 must be above median_ms=50"),
        (["env.latency.dist=lognormal", "env.latency.median_ms=0"], "env.latency.median_ms"),
        (
            ["env.latency.dist=lognormal", "env.latency.max_ms=30000"],
            "max_ms=30000 reaches env.step_timeout_s=30",
        ),
        (["env.latency.dist=lognormal", "env.latency.max_ms=20"], "max_ms=20 is below median_ms=50"),
        (["env.latency.dist=pareto"], "env.latency.dist"),
        (["env.latency.p50_ms=3"], "env.latency.p50_ms: unknown key"),
    ],
)
def test_bad_latency_settings_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(None, overrides)


def test_the_issue_example_is_a_valid_config():
    latency = load_config(None, ["env.latency={dist: lognormal, median_ms: 50, p99_ms: 2000}"]).env.latency
    assert (latency.dist, latency.median_ms, latency.p99_ms) == ("lognormal", 50.0, 2000.0)
