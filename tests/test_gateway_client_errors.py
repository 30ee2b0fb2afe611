"""What frameworks over the openai SDK make of the gateway's errors: a prompt over the
context limit is each framework's own context-overflow error (the one its agents catch to
trim or summarise the conversation), not a generic bad request; and a 409 no retry can mend
is not retried by the SDK. Each framework's test skips when it is not installed."""

from __future__ import annotations

import pytest
from family_tokenizers import byte_level_tokenizer
from gateway_helpers import ScriptedEngine, serve, start

LONG = [{"role": "user", "content": "guess a number " * 40}]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return byte_level_tokenizer("qwen", tmp_path_factory.mktemp("qwen"))


@pytest.fixture
def gateway(qwen):
    with serve(ScriptedEngine([qwen.eos_token_id]), qwen, max_context_tokens=64) as server:
        yield server


def test_litellm_raises_its_context_window_error(gateway, monkeypatch):
    # LiteLLM fetches its model price list from the network on import unless told not to.
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    litellm = pytest.importorskip("litellm")
    episode = start(gateway)
    with pytest.raises(litellm.ContextWindowExceededError, match="maximum context length is 64"):
        litellm.completion(
            model="openai/forge-policy",
            api_base=gateway.base_url,
            api_key=episode["episode_id"],
            messages=LONG,
            num_retries=0,
        )


def test_langchain_raises_its_context_overflow_error(gateway):
    pytest.importorskip("langchain_openai")
    from langchain_core.exceptions import ContextOverflowError
    from langchain_openai import ChatOpenAI

    episode = start(gateway)
    model = ChatOpenAI(
        model="forge-policy", base_url=gateway.base_url, api_key=episode["episode_id"], max_retries=0
    )
    with pytest.raises(ContextOverflowError, match="maximum context length is 64"):
        model.invoke(LONG)


def test_the_sdk_does_not_retry_a_call_on_a_finished_episode(gateway, monkeypatch):
    """The openai SDK retries a 409 twice by default (as a lock timeout); the gateway's 409s
    (the episode is finished, a call was given up on) say `x-should-retry: false`, so the
    agent hears at once rather than after retries that cannot succeed."""
    import openai

    episode = start(gateway)
    gateway.call(gateway.gateway.finish_episode(episode["episode_id"], reward=0.0))
    requests = []
    resolve = gateway.gateway.resolve_episode
    monkeypatch.setattr(gateway.gateway, "resolve_episode", lambda *a: requests.append(a) or resolve(*a))
    agent = openai.OpenAI(base_url=gateway.base_url, api_key=episode["episode_id"], max_retries=2)
    with pytest.raises(openai.ConflictError, match="already finished"):
        agent.chat.completions.create(model="forge-policy", messages=[{"role": "user", "content": "hi"}])
    assert len(requests) == 1
