"""vLLM and SGLang servers a run names (`rollout.servers`), checked before it starts: each
answers, serves the model its requests name, and holds the run's context; a mismatch is
refused naming the server and the setting, instead of every episode failing later."""

from __future__ import annotations

import asyncio
from typing import Any

from forge.config import ConfigError
from forge.rollout.engines.remote import EngineLost, HttpCall, HttpTransport, ProtocolError


def served_models(body: Any) -> tuple[list[str], int | None]:
    """The base models' names in a `GET /v1/models` answer (vLLM's and SGLang's ModelList;
    LoRA adapters, which have a `parent`, left out) and the context length they report
    (`max_model_len`)."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        raise ProtocolError(f"GET /v1/models answered {str(body)[:200]}, not a model list")
    base = [card for card in data if isinstance(card, dict) and not card.get("parent")]
    lengths = [card["max_model_len"] for card in base if isinstance(card.get("max_model_len"), int)]
    return [str(card.get("id")) for card in base], (min(lengths) if lengths else None)


async def probe(
    spec: str, model: str, max_context_tokens: int, transport: Any = None, timeout_s: float = 10.0
) -> str:
    """Check one `vllm+` / `sglang+` server; returns a line saying what it serves."""
    kind, _, url = spec.partition("+")
    name = {"vllm": "vLLM", "sglang": "SGLang"}[kind]
    http = HttpTransport(url, timeout_s, transport)
    try:
        try:
            names, context = served_models(await http.send(HttpCall("GET", "/v1/models")))
        except EngineLost as exc:
            raise ConfigError(
                f"rollout.servers entry {spec}: the server does not answer ({exc.reason}); start it, or fix the URL"
            ) from None
        except ProtocolError as exc:
            raise ConfigError(
                f"rollout.servers entry {spec}: GET /v1/models did not answer as {name} does ({exc}); "
                f"is this a {name} server? (forge serve is written http://host:port)"
            ) from None
        version = ""
        if kind == "vllm":
            try:
                answer = await http.send(HttpCall("GET", "/version"), timeout_s=timeout_s)
                version = f" {answer['version']}" if isinstance(answer, dict) and "version" in answer else ""
            except (EngineLost, ProtocolError):
                pass
    finally:
        await http.close()
    # vLLM's completions name the model (model.path); SGLang's native /generate names none.
    if kind == "vllm" and model not in names:
        raise ConfigError(
            f"rollout.servers entry {spec}: vLLM serves {names}, but Forge's requests name the model "
            f"model.path={model!r} (vLLM answers 404 to every one): start vllm serve with "
            f"--served-model-name {model}"
        )
    if context is not None and context < max_context_tokens:
        flag = "--max-model-len" if kind == "vllm" else "--context-length"
        raise ConfigError(
            f"rollout.servers entry {spec}: the server holds {context} tokens of context (its {flag}), "
            f"less than rollout.max_context_tokens={max_context_tokens}, so a long episode's turns would be "
            f"refused or cut: set rollout.max_context_tokens <= {context}, or start the server with {flag} "
            f">= {max_context_tokens}"
        )
    return f"{spec}: {name}{version} serving {', '.join(names)} ({context or '?'} tokens of context)"


def check_servers(cfg: Any, transport: Any = None) -> list[str]:
    """Probe every `vllm+` / `sglang+` entry of a remote run's `rollout.servers` (forge
    serve entries are Forge's own, checked by their first call); one line per server."""
    if cfg.rollout.engine != "remote":
        return []
    model = cfg.model.path or "policy"
    specs = [
        s
        for s in cfg.rollout.servers
        if s.split("://")[0] in ("vllm+http", "vllm+https", "sglang+http", "sglang+https")
    ]

    async def all_of() -> list[str]:
        return list(
            await asyncio.gather(*(probe(s, model, cfg.rollout.max_context_tokens, transport) for s in specs))
        )

    return asyncio.run(all_of()) if specs else []
