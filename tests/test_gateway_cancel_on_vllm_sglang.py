"""A gateway call given up on a vLLM or SGLang engine server is stopped there too: the
client closes the call's connection (vLLM aborts a /v1/completions request whose client
disconnects) and, on SGLang, sends POST /abort_request with the request's `rid`. The fake
servers here behave as those servers' sources do (recorded shapes; vLLM's handler runs
beside a listener for http.disconnect, vllm/entrypoints/utils.py `with_cancellation`), and
the call is dropped as on the in-process engine: counted in calls_dropped, not recorded."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from forge.gateway import Gateway, GatewayServer
from forge.gateway.episodes import EpisodeStore
from forge.gateway.server import ThreadedServer
from forge.models.loading import load_tokenizer
from forge.rollout.engines.remote import Sampling
from forge.rollout.engines.router import Router
from forge.rollout.engines.sglang_client import SGLangClient
from forge.rollout.engines.vllm_client import VLLMClient
from forge_envs.guess_number import GuessNumberEnv

MESSAGES = [{"role": "user", "content": "guess a number from 0 to 7"}]
LONG_S = 8.0  # how long the fake servers take over a call of LONG tokens, were it run to its end
LONG = 600


class FakeServer:
    """What the fake server saw: each generate's body, when its client disconnected, which
    rids /abort_request named, and which calls it answered."""

    def __init__(self, reply_ids: list[int]) -> None:
        self.reply_ids = reply_ids
        self.bodies: list[dict] = []
        self.disconnected: list[float] = []
        self.aborted: list[str] = []
        self.answered = 0
        self.aborts: dict[str, asyncio.Event] = {}

    def seconds(self, max_tokens: int) -> float:
        return LONG_S if max_tokens >= LONG else 0.05

    def ids(self, max_tokens: int) -> list[int]:
        return (self.reply_ids * max_tokens)[:max_tokens]


async def until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def fake_vllm(seen: FakeServer) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await request.json()
        seen.bodies.append(body)
        # As vLLM's with_cancellation: the work runs beside a listener for http.disconnect,
        # and whichever ends first cancels the other (the engine request is then aborted).
        working = asyncio.ensure_future(asyncio.sleep(seen.seconds(body["max_tokens"])))
        listening = asyncio.ensure_future(until_disconnected(request))
        done, pending = await asyncio.wait({working, listening}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        if listening in done:
            seen.disconnected.append(time.monotonic())
            return None
        seen.answered += 1
        ids = seen.ids(body["max_tokens"])
        choice = {
            "index": 0,
            "text": "",
            "logprobs": {"tokens": [f"token_id:{i}" for i in ids], "token_logprobs": [-0.5] * len(ids)},
            "finish_reason": "length",
        }
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": len(ids)}
        return JSONResponse({"object": "text_completion", "choices": [choice], "usage": usage})

    return app


def fake_sglang(seen: FakeServer) -> FastAPI:
    app = FastAPI()

    @app.post("/generate")
    async def generate(request: Request) -> Any:
        body = await request.json()
        seen.bodies.append(body)
        rid = body.get("rid")
        aborted = seen.aborts.setdefault(rid, asyncio.Event())
        # SGLang looks at the connection only every few seconds (longer than this test
        # waits): the call ends early only when /abort_request names its rid.
        params = body["sampling_params"]
        try:
            await asyncio.wait_for(aborted.wait(), seen.seconds(params["max_new_tokens"]))
            reason: dict = {"type": "abort", "message": "Abort in waiting queue"}
            ids: list[int] = []
        except TimeoutError:
            reason = {"type": "length", "length": params["max_new_tokens"]}
            ids = seen.ids(params["max_new_tokens"])
            seen.answered += 1
        meta = {
            "id": rid,
            "finish_reason": reason,
            "prompt_tokens": len(body["input_ids"]),
            "cached_tokens": 0,
            "weight_version": "default",
            "output_token_logprobs": [[-0.5, i, None] for i in ids],
        }
        return JSONResponse({"text": "", "output_ids": ids, "meta_info": meta})

    @app.post("/abort_request")
    async def abort_request(request: Request) -> Any:
        rid = (await request.json())["rid"]
        seen.aborted.append(rid)
        seen.aborts.setdefault(rid, asyncio.Event()).set()
        return JSONResponse({})

    return app


def waited_for(condition: Any, since: float, limit_s: float = 5.0) -> float:
    """Seconds from `since` until `condition()` held (or the limit passed)."""
    while not condition() and time.monotonic() < since + limit_s:
        time.sleep(0.02)
    return time.monotonic() - since


@pytest.mark.parametrize("kind", ["vllm", "sglang"])
def test_a_call_whose_client_left_is_stopped_on_a_vllm_or_sglang_server(kind, tiny_checkpoint):
    tokenizer = load_tokenizer(tiny_checkpoint)
    seen = FakeServer(tokenizer.encode("four", add_special_tokens=False))
    app = fake_vllm(seen) if kind == "vllm" else fake_sglang(seen)
    with ThreadedServer(app, "127.0.0.1", 0, f"fake {kind}", "") as fake:
        url = f"http://127.0.0.1:{fake.port}"
        sampling = Sampling()
        engine = VLLMClient(url, "policy", sampling) if kind == "vllm" else SGLangClient(url, sampling)
        router = Router([engine], name="gateway", max_wait_s=0.01)
        store = EpisodeStore(lambda: GuessNumberEnv(n=8))
        with GatewayServer(Gateway(sampling, tokenizer, store, LONG, 2048, router=router)) as server:
            episode = httpx.post(f"{server.root_url}/forge/episodes", json={"task": {"secret": 3}}).json()
            agent = openai.OpenAI(base_url=server.base_url, api_key=episode["episode_id"], max_retries=0)
            # A call not given up passes through the watching client whole, and is recorded.
            reply = agent.chat.completions.create(model="policy", messages=MESSAGES, max_tokens=4)
            assert reply.choices[0].message.content
            leaving = agent.with_options(timeout=0.5)
            with pytest.raises(openai.APITimeoutError):
                leaving.chat.completions.create(model="policy", messages=MESSAGES, max_tokens=LONG)
            left = time.monotonic()
            stopped = waited_for(lambda: seen.disconnected if kind == "vllm" else seen.aborted, left)
            episode_state = store.get(episode["episode_id"])
            waited_for(lambda: episode_state.info.get("calls_dropped"), left)
            alive = router.alive
            server.call(router.close(), timeout_s=10)
    assert stopped < 2.0, f"the {kind} server still ran the call {stopped:.1f}s after its client left"
    assert seen.answered == 1  # the short call only: the long one was never generated to its end
    assert [call.completion_ids for call in episode_state.calls] == [seen.ids(4)]
    assert episode_state.info.get("calls_dropped") == 1
    assert alive == [url]  # an ended request loses its episode's call, not the engine
    if kind == "sglang":
        rids = [body.get("rid") for body in seen.bodies]
        assert all(rids) and len(set(rids)) == 2  # every call has its own id
        assert seen.aborted == [rids[1]]
