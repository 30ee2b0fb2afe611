"""Routing episodes over engine servers: affinity, load balance, lost engines, and the
agent loop on top (token-exact whatever the engine)."""

from __future__ import annotations

import asyncio

import pytest

from forge.rollout.agent import EpisodeLimits, run_episode
from forge.rollout.chat import ChatFormat
from forge.rollout.engines.protocol import GenerationRequest, GenerationResult
from forge.rollout.engines.remote import EngineLost, generate_each
from forge.rollout.engines.router import Router


class FakeClient:
    """An engine client that replies with fixed ids, or fails / hangs when told to."""

    def __init__(self, url: str, reply: list[int] | None = None, version: int = 3) -> None:
        self.url = url
        self.reply = reply or [9]
        self.policy_version = version
        self.calls: list[GenerationRequest] = []
        self.released: list[str] = []
        self.batches: list[int] = []  # requests per generate_batch call
        self.fail = False
        self.hang = False

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        self.calls.append(request)
        if self.hang:
            try:
                await asyncio.wait_for(asyncio.sleep(60), timeout=0.2)  # what the HTTP timeout does
            except TimeoutError:
                raise EngineLost(self.url, "no answer within 0.2s (rollout.engine_timeout_s)") from None
        if self.fail:
            raise EngineLost(self.url, "ConnectError: connection refused")
        return GenerationResult(list(self.reply), [-0.5] * len(self.reply), True, self.policy_version, 1)

    async def generate_batch(
        self, requests: list[GenerationRequest], release: list[str] | None = None
    ) -> list:
        self.batches.append(len(requests))
        self.released.extend(release or [])
        return await generate_each(self, requests)

    async def release(self, episode_ids: list[str]) -> None:
        self.released.extend(episode_ids)

    async def healthy(self) -> bool:
        return not self.fail

    async def close(self) -> None:
        pass


def request(group: str, seed: int, tokens: list[int] | None = None) -> GenerationRequest:
    return GenerationRequest(tokens or [1, 2, 3], 4, f"{group}/{seed:08x}")


def test_all_turns_of_an_episode_and_all_episodes_of_a_group_go_to_one_engine():
    engines = [FakeClient("http://a"), FakeClient("http://b")]
    router = Router(engines)

    async def scenario() -> None:
        for turn in range(3):
            await asyncio.gather(
                *(router.generate(request("task1@v0#aa", seed, [1] * (turn + 1))) for seed in range(4))
            )

    asyncio.run(scenario())
    counts = [len(e.calls) for e in engines]
    assert sorted(counts) == [0, 12]


def test_turns_of_a_workers_live_episodes_go_to_each_engine_in_one_call():
    engines = [FakeClient("http://a"), FakeClient("http://b")]
    router = Router(engines, max_wait_s=5.0)

    async def episode(group: str, seed: int) -> None:
        router.register()
        try:
            for turn in range(3):
                await asyncio.sleep(0.001 * seed)  # env steps of different lengths
                await router.generate(request(group, seed, [1] * (turn + 1)))
        finally:
            router.unregister()
            router.release(f"{group}/{seed:08x}")

    async def scenario() -> None:
        await asyncio.gather(*(episode(group, seed) for group in ("g1", "g2") for seed in range(4)))
        await router.close()

    asyncio.run(scenario())
    # Every live episode waited for the others (max_wait_s is long): 3 turns, one call per engine each.
    assert [e.batches for e in engines] == [[4, 4, 4], [4, 4, 4]]
    assert router.calls == 6
    assert sorted(engines[0].released + engines[1].released) == sorted(
        f"{g}/{s:08x}" for g in ("g1", "g2") for s in range(4)
    )


def test_an_episode_busy_in_its_env_does_not_hold_the_others_back():
    engines = [FakeClient("http://a")]
    router = Router(engines, max_wait_s=0.01)

    async def scenario() -> float:
        for _ in range(3):
            router.register()
        started = asyncio.get_running_loop().time()
        await asyncio.gather(router.generate(request("g", 1)), router.generate(request("g", 2)))
        return asyncio.get_running_loop().time() - started  # the third episode never asked

    assert asyncio.run(scenario()) < 0.5
    assert engines[0].batches == [2]


def test_groups_are_spread_over_engines_by_load():
    engines = [FakeClient("http://a"), FakeClient("http://b")]
    router = Router(engines)

    async def scenario() -> None:
        await asyncio.gather(*(router.generate(request(f"task{g}", s)) for g in range(4) for s in range(2)))

    asyncio.run(scenario())
    assert [len(e.calls) for e in engines] == [4, 4]


def test_groups_played_one_at_a_time_take_turns_over_the_engines():
    """A gateway whose agents play one group at a time leaves every engine idle between
    groups: the next group goes to the next engine, not always to the first."""
    engines = [FakeClient("http://a"), FakeClient("http://b")]
    router = Router(engines)

    async def scenario() -> None:
        for g in range(4):
            await asyncio.gather(*(router.generate(request(f"task{g}", s)) for s in range(2)))
            for s in range(2):
                router.release(f"task{g}/{s:08x}")

    asyncio.run(scenario())
    assert [len(e.calls) for e in engines] == [4, 4]


def test_workers_with_different_offsets_start_on_different_engines():
    engines = [FakeClient("http://a"), FakeClient("http://b")]
    assert Router(engines, offset=0).engine_for("g/1", "g") != Router(engines, offset=1).engine_for(
        "g/1", "g"
    )


def test_release_frees_the_episode_on_its_engine_and_ends_the_group_affinity():
    engines = [FakeClient("http://a"), FakeClient("http://b")]
    router = Router(engines)

    async def scenario() -> None:
        await router.generate(request("g", 1))
        router.release("g/00000001")
        await router.close()

    asyncio.run(scenario())
    assert engines[0].released == ["g/00000001"]
    assert router._group_engine == {} and router._episode_engine == {}


def test_a_dead_engine_loses_its_episodes_with_a_console_line_and_the_others_go_on(capsys):
    engines = [FakeClient("http://a"), FakeClient("http://b")]
    router = Router(engines, name="rollout worker 0")

    async def scenario() -> None:
        await router.generate(request("g1", 1))  # g1 -> a
        await router.generate(request("g2", 1))  # g2 -> b
        engines[0].fail = True
        with pytest.raises(EngineLost, match="connection refused"):
            await router.generate(request("g1", 1, [1, 2, 3, 9, 4]))
        # The group's next episode starts on the engine that is left.
        assert (await router.generate(request("g1", 2))).policy_version == 3
        assert len(engines[1].calls) == 2

    asyncio.run(scenario())
    line = capsys.readouterr().err
    assert "rollout worker 0: engine http://a lost (ConnectError: connection refused)" in line
    assert "1 of 2 engines remain" in line


def test_a_hung_engine_counts_as_lost_after_its_timeout():
    engines = [FakeClient("http://a")]
    engines[0].hang = True
    router = Router(engines)
    with pytest.raises(EngineLost, match="no answer"):
        asyncio.run(router.generate(request("g", 1)))
    with pytest.raises(EngineLost, match="all 1 engines are lost"):
        asyncio.run(router.generate(request("g2", 1)))


def test_the_agent_loop_records_an_episode_whose_engine_died_as_lost(tiny_checkpoint):
    from forge.models.loading import load_tokenizer
    from forge_envs.guess_number import GuessNumberEnv

    chat = ChatFormat(load_tokenizer(tiny_checkpoint))
    client = FakeClient("http://a")
    client.fail = True
    limits = EpisodeLimits(
        max_turns=2, max_new_tokens=2, max_context_tokens=256, step_timeout_s=5, episode_timeout_s=10
    )
    trajectory = asyncio.run(
        run_episode(
            GuessNumberEnv(n=4), {"task_id": "0", "secret": 1}, 0, Router([client]), chat, limits, "0@v0#00"
        )
    )
    assert trajectory.status == "lost" and "http://a" in trajectory.error


def test_trajectories_hold_the_engines_sampled_ids_even_when_their_text_retokenizes_differently(
    tiny_checkpoint,
):
    """<|unk|> then 'system' decodes to 'system', which encodes as one token: a loop that
    re-tokenized the reply would train on [system], not on what the engine sampled."""
    from forge.models.loading import load_tokenizer
    from forge.types import Sample
    from forge_envs.guess_number import GuessNumberEnv

    tokenizer = load_tokenizer(tiny_checkpoint)
    sampled = [tokenizer.convert_tokens_to_ids("<|unk|>"), tokenizer.convert_tokens_to_ids("system")]
    text = tokenizer.decode(sampled, skip_special_tokens=True)
    assert tokenizer(text, add_special_tokens=False)["input_ids"] != sampled  # the premise
    chat = ChatFormat(tokenizer)
    client = FakeClient("http://a", reply=sampled, version=11)
    limits = EpisodeLimits(
        max_turns=1, max_new_tokens=4, max_context_tokens=256, step_timeout_s=5, episode_timeout_s=10
    )
    trajectory = asyncio.run(
        run_episode(
            GuessNumberEnv(n=4), {"task_id": "0", "secret": 1}, 0, Router([client]), chat, limits, "0@v0#00"
        )
    )
    generated = [t for t, m in zip(trajectory.token_ids, trajectory.loss_mask, strict=True) if m]
    assert generated == sampled
    assert [lp for lp, m in zip(trajectory.behaviour_logprobs, trajectory.loss_mask, strict=True) if m] == [
        -0.5,
        -0.5,
    ]
    assert {v for v, m in zip(trajectory.policy_versions, trajectory.loss_mask, strict=True) if m} == {11}
    sample = Sample.from_trajectory(trajectory, 1.0)
    assert [t for t, m in zip(sample.token_ids, sample.loss_mask, strict=True) if m] == sampled
