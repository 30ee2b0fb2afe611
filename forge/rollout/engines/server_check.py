"""vLLM and SGLang servers a run names (`rollout.servers`), checked before it starts: each
answers, serves the model its requests name, holds the run's context and (vLLM, where it
shows its configuration) was started with the flags the run needs; a mismatch is refused
naming the server and the setting, instead of every episode failing or sampling wrongly later."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from forge.config import ConfigError
from forge.env.output import console
from forge.rollout.engines.remote import NO_KEYS, EngineLost, HttpCall, HttpTransport, ProtocolError
from forge.rollout.engines.server_keys import ServerKeys


@dataclass
class Needs:
    """What a run asks of its servers."""

    model: str  # the name vLLM requests carry (model.path)
    max_context_tokens: int
    lora_rank: int | None = None  # model.lora.r in LoRA runs, else None (full weights by NCCL)
    top_p: float = 1.0  # rollout.top_p


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


def vllm_flag_problems(info: Any, needs: Needs) -> list[str]:
    """What a vLLM's `GET /server_info?config_format=json` (its VllmConfig as JSON and its
    VLLM_ environment; vllm/entrypoints/serve/instrumentator/server_info.py) says is missing
    for this run. A part the server does not show is not judged."""
    config = info.get("vllm_config") if isinstance(info, dict) else None
    if not isinstance(config, dict):
        return []
    env = info.get("vllm_env") if isinstance(info.get("vllm_env"), dict) else {}
    problems = []
    mode = (config.get("model_config") or {}).get("logprobs_mode")
    if mode is not None and mode != "processed_logprobs":
        # What each other mode returns in the logprob fields (Sampler.forward, vllm/v1/sample/sampler.py).
        what = {
            "raw_logprobs": "logprobs of the logits before temperature",
            "raw_logits": "the logits before temperature, not logprobs",
            "processed_logits": "the logits after temperature, not normalised into logprobs",
        }.get(mode, "not the logprobs of the distribution it samples")
        problems.append(
            f"its --logprobs-mode is {mode} ({what}): start it with --logprobs-mode processed_logprobs"
        )
    if needs.lora_rank is not None:
        if "lora_config" in config:
            lora = config["lora_config"]
            if not lora:
                problems.append("model.lora.enabled needs runtime LoRA: start it with --enable-lora")
            elif isinstance(lora.get("max_lora_rank"), int) and lora["max_lora_rank"] < needs.lora_rank:
                problems.append(
                    f"its --max-lora-rank {lora['max_lora_rank']} is below model.lora.r={needs.lora_rank}"
                )
        if str(env.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")).lower() not in ("true", "1"):
            problems.append("loading each version's adapter needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=True")
    elif "weight_transfer_config" in config:
        backend = (config["weight_transfer_config"] or {}).get("backend")
        if backend != "nccl":
            problems.append(
                "full weights reach it by NCCL weight transfer: start it with "
                f'--weight-transfer-config \'{{"backend": "nccl"}}\' (it has {backend or "none"})'
            )
    return problems


def vllm_sampling_problems(needs: Needs) -> list[str]:
    """What no vLLM flag can give this run. Its processed logprobs are the log-softmax of the
    logits after temperature *and* the top-k / top-p mask (TopKTopPSampler.forward_native in
    vllm/v1/sample/ops/topk_topp_sampler.py), so below top-p 1 each is renormalised over the
    nucleus: higher by -log(nucleus mass) than the tempered distribution's own logprob, which
    Forge's engine and SGLang report. The other modes are of the logits before temperature."""
    if needs.top_p >= 1:
        return []
    return [
        f"rollout.top_p={needs.top_p:g}: vLLM reports each token's logprob renormalised over the top-p nucleus "
        "(--logprobs-mode processed_logprobs; no mode gives the tempered distribution's own, which Forge's engine "
        "and SGLang report), so its behaviour logprobs would not be comparable: set rollout.top_p: 1.0 for vLLM "
        "servers"
    ]


def sglang_flag_problems(info: dict, needs: Needs) -> list[str]:
    """What an SGLang's `GET /server_info` (its ServerArgs, its scheduler's limits and its
    version, flat; get_server_info in python/sglang/srt/entrypoints/http_server.py) says is
    wrong for this run. A field the server does not show is not judged."""
    problems = []
    if info.get("allow_auto_truncate") is True:
        problems.append(
            "it keeps the first tokens of a prompt over its limit (--allow-auto-truncate), which would sample "
            "from context the trajectory does not hold: start it without that flag"
        )
    pool = info.get("max_total_num_tokens")
    # One request holds at most min(context_len, max_total_num_tokens) - 2 tokens (Scheduler.max_req_len).
    if isinstance(pool, int) and pool - 2 < needs.max_context_tokens:
        problems.append(
            f"its KV cache holds {pool} tokens (max_total_num_tokens), fewer than one request of "
            f"rollout.max_context_tokens={needs.max_context_tokens} needs: give it more memory "
            "(--mem-fraction-static, more GPUs) or lower rollout.max_context_tokens"
        )
    return problems


async def probe(
    spec: str,
    needs: Needs,
    transport: Any = None,
    wait_s: float = 120.0,
    poll_s: float = 2.0,
    timeout_s: float = 10.0,
    keys: ServerKeys = NO_KEYS,
) -> str:
    """Check one `vllm+` / `sglang+` server, waiting up to `wait_s` for one still starting
    (a large model takes minutes to load before the server listens); returns a line saying
    what it serves. Asked with the API key `keys` names: a server that refuses it (or wants one
    and gets none) is refused here, before the run starts."""
    kind, _, url = spec.partition("+")
    name = {"vllm": "vLLM", "sglang": "SGLang"}[kind]
    http = HttpTransport(url, timeout_s, transport, keys)
    http.busy_retry_delays_s = ()
    version, flags = "", ""
    problems: list[str] = []
    try:
        deadline = time.monotonic() + wait_s
        said = False
        while True:
            try:
                names, context = served_models(await http.send(HttpCall("GET", "/v1/models")))
                break
            except EngineLost as exc:
                if time.monotonic() + poll_s > deadline:
                    raise ConfigError(
                        f"rollout.servers entry {spec}: the server did not answer within {wait_s:g}s "
                        f"(rollout.engine_timeout_s) ({exc.reason}); start it, or fix the URL"
                    ) from None
                if not said:
                    print(
                        f"forge: waiting up to {wait_s:g}s for {spec} to answer", file=console(), flush=True
                    )
                    said = True
                await asyncio.sleep(poll_s)
            except ProtocolError as exc:
                if exc.status in (401, 403):  # the message says which setting to fix
                    raise ConfigError(f"rollout.servers entry {spec} ({name}): {exc}") from None
                raise ConfigError(
                    f"rollout.servers entry {spec}: GET /v1/models did not answer as {name} does ({exc}); "
                    f"is this a {name} server? (forge serve is written http://host:port)"
                ) from None
        if kind == "vllm":
            try:
                answer = await http.send(HttpCall("GET", "/version"))
                version = f" {answer['version']}" if isinstance(answer, dict) and "version" in answer else ""
            except (EngineLost, ProtocolError):
                pass
            shown = False
            try:
                info = await http.send(HttpCall("GET", "/server_info", params={"config_format": "json"}))
                shown = isinstance(info, dict) and isinstance(info.get("vllm_config"), dict)
                problems = vllm_flag_problems(info, needs)
            except (EngineLost, ProtocolError):
                pass
            if not shown:  # older servers show their config as text; none without VLLM_SERVER_DEV_MODE
                flags = "; its flags not shown (GET /server_info), so not checked"
            problems += vllm_sampling_problems(needs)
        else:
            info = None
            for path in ("/server_info", "/get_server_info"):  # the older name first had get_
                try:
                    info = await http.send(HttpCall("GET", path))
                    break
                except (EngineLost, ProtocolError):
                    continue
            if isinstance(info, dict):
                version = f" {info['version']}" if info.get("version") else ""
                problems = sglang_flag_problems(info, needs)
            else:
                flags = "; its flags not shown (GET /server_info), so not checked"
    finally:
        await http.close()
    # vLLM's completions name the model (model.path); SGLang's native /generate names none.
    if kind == "vllm" and needs.model not in names:
        problems.insert(
            0,
            f"it serves {names}, but Forge's requests name the model model.path={needs.model!r} (vLLM answers 404 "
            f"to every one): start it with --served-model-name {needs.model}",
        )
    # vLLM serves prompt + max_tokens up to max_model_len (vllm/renderers/params.py). SGLang
    # keeps two tokens back: a request is at most context_len - 1 tokens and generation is
    # cut one before that (Scheduler.max_req_len, init_req_max_new_tokens).
    usable = None if context is None else context - (2 if kind == "sglang" else 0)
    if usable is not None and usable < needs.max_context_tokens:
        flag = "--max-model-len" if kind == "vllm" else "--context-length"
        kept = "" if kind == "vllm" else f" less the 2 SGLang keeps back, {usable}"
        problems.append(
            f"it holds {context} tokens of context (its {flag}){kept}, less than rollout.max_context_tokens="
            f"{needs.max_context_tokens}, so a long episode's turns would be refused or cut: set "
            f"rollout.max_context_tokens <= {usable}, or start it with {flag} >= "
            f"{needs.max_context_tokens + context - usable}"
        )
    if problems:
        raise ConfigError(f"rollout.servers entry {spec} ({name}{version}): " + "; ".join(problems))
    return f"{spec}: {name}{version} serving {', '.join(names)} ({context or '?'} tokens of context){flags}"


def check_servers(cfg: Any, transport: Any = None, wait: bool = True) -> list[str]:
    """Probe every `vllm+` / `sglang+` entry of a remote run's `rollout.servers` (forge
    serve entries are Forge's own, checked by their first call); one line per server. With
    `wait`, a server not answering yet is waited for up to rollout.engine_timeout_s (a run
    starting beside its servers); without, it is refused at once (a dry run)."""
    if cfg.rollout.engine != "remote":
        return []
    needs = Needs(
        cfg.model.path or "policy",
        cfg.rollout.max_context_tokens,
        cfg.model.lora.r if cfg.model.lora.enabled else None,
        cfg.rollout.top_p,
    )
    keys = ServerKeys.of(cfg.rollout)  # a variable named but unset is refused here
    keys.values()
    kinds = ("vllm+http", "vllm+https", "sglang+http", "sglang+https")
    specs = [s for s in cfg.rollout.servers if s.split("://")[0] in kinds]

    async def all_of() -> list[str]:
        wait_s = cfg.rollout.engine_timeout_s if wait else 0.0
        return list(await asyncio.gather(*(probe(s, needs, transport, wait_s, keys=keys) for s in specs)))

    return asyncio.run(all_of()) if specs else []
