"""`make_client`: the engine client a `rollout.servers` entry names (Forge's own server, vLLM or
SGLang). Apart from `remote.py`, which the vLLM and SGLang clients build on, so no import cycle."""

from __future__ import annotations

from forge.rollout.engines.remote import EngineClient, ForgeClient, Sampling
from forge.rollout.engines.sglang_client import SGLangClient
from forge.rollout.engines.vllm_client import VLLMClient


def make_client(spec: str, model: str, sampling: Sampling, timeout_s: float = 120.0) -> EngineClient:
    """A client from a `rollout.servers` entry: `http://host:port` (forge serve),
    `vllm+http://host:port` or `sglang+http://host:port`."""
    kind, _, url = spec.partition("+") if "+" in spec.split("://")[0] else ("forge", "", spec)
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"rollout.servers entry {spec!r}: write http://host:port, vllm+http://... or sglang+http://...")
    if kind == "forge":
        return ForgeClient(url, timeout_s, sampling)
    if kind == "vllm":
        return VLLMClient(url, model, sampling, timeout_s)
    if kind == "sglang":
        return SGLangClient(url, sampling, timeout_s)
    raise ValueError(f"rollout.servers entry {spec!r}: unknown server kind {kind!r} (forge, vllm or sglang)")
