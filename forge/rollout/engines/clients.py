"""`make_client`: the engine client a `rollout.servers` entry names (Forge's own server, vLLM or
SGLang). Apart from `remote.py`, which the vLLM and SGLang clients build on, so no import cycle."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from forge.rollout.engines.remote import NO_KEYS, EngineClient, ForgeClient, Sampling
from forge.rollout.engines.server_keys import ServerKeys
from forge.rollout.engines.sglang_client import SGLangClient
from forge.rollout.engines.vllm_client import VLLMClient


def make_client(
    spec: str, model: str, sampling: Sampling, timeout_s: float = 120.0, keys: ServerKeys = NO_KEYS
) -> EngineClient:
    """A client from a `rollout.servers` entry: `http://host:port` (forge serve),
    `vllm+http://host:port` or `sglang+http://host:port`, sending the API keys `keys` names
    (`ServerKeys.of(rollout)`). The client's `spec` is that entry: the pool knows a server by it
    (`pool.dead`, `holders`), its client by its bare `url`."""
    kind, _, url = spec.partition("+") if "+" in spec.split("://")[0] else ("forge", "", spec)
    if not url.startswith(("http://", "https://")):
        raise ValueError(
            f"rollout.servers entry {spec!r}: write http://host:port, vllm+http://... or sglang+http://..."
        )
    client: EngineClient
    if kind == "forge":
        client = ForgeClient(url, timeout_s, sampling, keys)
    elif kind == "vllm":
        client = VLLMClient(url, model, sampling, timeout_s, keys)
    elif kind == "sglang":
        client = SGLangClient(url, sampling, timeout_s, keys)
    else:
        raise ValueError(
            f"rollout.servers entry {spec!r}: unknown server kind {kind!r} (forge, vllm or sglang)"
        )
    client.spec = spec  # type: ignore[attr-defined]
    return client


def run_sampling(rollout_cfg: Any, stop_token_ids: list[int]) -> Sampling:
    """The run's sampling (`rollout.temperature`, `rollout.top_p`), stopping at the chat's end tokens."""
    return Sampling(rollout_cfg.temperature, rollout_cfg.top_p, tuple(stop_token_ids))


def client_factory(model_cfg: Any, rollout_cfg: Any, sampling: Sampling) -> Callable[[str], EngineClient]:
    """How a run's rollout side (a worker, the gateway) reaches one engine URL: with
    `sampling` and `rollout.engine_timeout_s`, naming the model as `model.path`, with the API keys
    the rollout section names."""
    model = model_cfg.path or "policy"
    keys = ServerKeys.of(rollout_cfg)
    return lambda url: make_client(url, model, sampling, rollout_cfg.engine_timeout_s, keys)
