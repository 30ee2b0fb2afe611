"""SGLang's server as an engine: `/generate` with `input_ids` and `return_logprob`;
`/update_weights_from_disk` for full weights (with `weight_version`, which SGLang stamps
on its outputs); `/load_lora_adapter` for LoRA; `/pause_generation` and
`/continue_generation` around updates.

Written against SGLang's documented shapes (`GenerateReqInput`, `UpdateWeightFromDiskReqInput`,
`LoadLoRAAdapterReqInput`, the native API docs), checked against recorded fixtures, not a
running SGLang. Launch flags are in the README ("Inference servers").
"""

from __future__ import annotations

import uuid
from typing import Any

from forge.rollout.engines.protocol import GenerationRequest, GenerationResult
from forge.rollout.engines.remote import (
    NEUTRAL_SAMPLING,
    NO_KEYS,
    PROBE_TIMEOUT_S,
    EngineLost,
    HttpCall,
    HttpTransport,
    ProtocolError,
    RequestAborted,
    Sampling,
    as_policy_version,
    check_prompt_kept,
    generate_each,
    lists_model,
    request_sampling,
    send_cancellable,
    top_logprob_pairs,
)
from forge.rollout.engines.server_keys import ServerKeys


def generate_call(
    request: GenerationRequest, sampling: Sampling, lora_name: str | None = None, rid: str | None = None
) -> HttpCall:
    """`rid`: the request's id on the server (GenerateReqInput.rid,
    python/sglang/srt/managers/io_struct.py), for POST /abort_request."""
    temperature, top_p = request_sampling(request, sampling)
    params: dict[str, Any] = {
        "max_new_tokens": request.max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        **NEUTRAL_SAMPLING,
        "skip_special_tokens": False,
        "no_stop_trim": True,  # keep the stop token in the output: the trajectory holds what was sampled
    }
    if sampling.stop_token_ids:
        params["stop_token_ids"] = list(sampling.stop_token_ids)
    if request.stop:  # SGLang ends at the token completing one; output_ids keep that token
        params["stop"] = list(request.stop)
    if request.seed is not None:
        params["sampling_seed"] = request.seed
    body: dict[str, Any] = {
        "input_ids": list(request.token_ids),
        "sampling_params": params,
        "return_logprob": True,
        "logprob_start_len": -1,  # logprobs of the output only, none of the prompt
        "stream": False,
    }
    if request.top_logprobs:  # meta_info.output_top_logprobs: per token, [[logprob, token_id, text], ...]
        body["top_logprobs_num"] = request.top_logprobs
    if lora_name:
        body["lora_path"] = lora_name
    if rid is not None:
        body["rid"] = rid
    return HttpCall("POST", "/generate", body)


def abort_call(rid: str) -> HttpCall:
    # AbortReq {"rid", "abort_all"} (python/sglang/srt/entrypoints/http_server.py,
    # /abort_request); a rid the server no longer runs is ignored.
    return HttpCall("POST", "/abort_request", {"rid": rid}, admin=True)


def parse_generate(
    body: Any,
    stop_token_ids: tuple[int, ...],
    policy_version: int,
    top_logprobs: int = 0,
    url: str = "sglang",
) -> GenerationResult:
    """Ids and logprobs from `meta_info.output_token_logprobs` ([logprob, token_id, text]);
    the version from `meta_info.weight_version` when the server reports one; with
    `top_logprobs` = k, each step's k most likely from `meta_info.output_top_logprobs`."""
    try:
        meta = body["meta_info"]
        entries = meta["output_token_logprobs"]
        reason = meta["finish_reason"]
        kind = reason["type"] if isinstance(reason, dict) else reason
    except (KeyError, TypeError) as exc:
        raise ProtocolError(
            f"not an SGLang /generate answer with return_logprob ({exc!r}): {str(body)[:300]}"
        ) from None
    try:
        logprobs = [float(entry[0]) for entry in entries]
        ids = [int(entry[1]) for entry in entries]
    except (TypeError, ValueError, IndexError) as exc:
        raise ProtocolError(
            f"SGLang output_token_logprobs entries are not [logprob, token_id, text]: {exc!r}"
        ) from None
    listed = body.get("output_ids")
    if listed is not None and [int(t) for t in listed] != ids:
        raise ProtocolError(
            f"SGLang's output_ids {listed[:8]}... disagree with its logprob tokens {ids[:8]}..."
        )
    if kind == "abort":  # the server goes on; this episode is lost
        raise RequestAborted(url, f"SGLang aborted the request: {reason}")
    if kind not in ("stop", "length"):
        raise ProtocolError(f"SGLang finish_reason {reason!r} is not stop, length or abort")
    version = meta.get("weight_version")
    if version not in (None, "", "default"):
        try:
            policy_version = int(version)
        except ValueError:
            raise ProtocolError(f"SGLang weight_version {version!r} is not a Forge policy version") from None
    finished = kind == "stop" and bool(ids) and ids[-1] in stop_token_ids
    cached = int(meta.get("cached_tokens") or 0)
    prompt = int(meta.get("prompt_tokens") or 0)
    tops = None
    if top_logprobs:
        steps = meta.get("output_top_logprobs")
        if not isinstance(steps, list) or len(steps) != len(ids):
            raise ProtocolError(
                f"SGLang returned no output_top_logprobs per token for top_logprobs_num="
                f"{top_logprobs}: {str(steps)[:200]}"
            )
        try:
            pairs = top_logprob_pairs([[(entry[1], entry[0]) for entry in step] for step in steps], "SGLang")
        except (TypeError, IndexError) as exc:
            raise ProtocolError(
                f"SGLang output_top_logprobs entries are not [logprob, token_id, text]: {exc!r}"
            ) from None
        tops = [step[:top_logprobs] for step in pairs]
    return GenerationResult(
        ids, logprobs, finished, policy_version, prefill_tokens=max(prompt - cached, 0), top_logprobs=tops
    )


def update_from_disk_call(path: str, version: int) -> HttpCall:
    return HttpCall(
        "POST",
        "/update_weights_from_disk",
        {
            "model_path": path,
            "weight_version": str(version),
            "abort_all_requests": False,
        },
        admin=True,
    )


def adapter_name(version: int) -> str:
    """A new name per version: SGLang keys adapters by name, and requests name the one they use."""
    return f"forge-v{version}"


def load_adapter_call(name: str, path: str) -> HttpCall:
    return HttpCall("POST", "/load_lora_adapter", {"lora_name": name, "lora_path": path}, admin=True)


def unload_adapter_call(name: str) -> HttpCall:
    return HttpCall("POST", "/unload_lora_adapter", {"lora_name": name}, admin=True)


# Admin routes (`admin=True` calls): abort, weight updates, LoRA loads, pause and continue are
# AuthLevel.ADMIN_OPTIONAL in SGLang's http_server.py. Its decide_request_auth (python/sglang/srt/
# utils/auth.py) lets them through with the --admin-api-key where one is set (the --api-key is then
# refused there), else with the --api-key; every other route but /health* and /metrics* wants the
# --api-key alone.


def pause_call() -> HttpCall:
    # "in_place" keeps running requests (and their KV) frozen until continue; "abort" would
    # end them, losing episodes mid-turn.
    return HttpCall("POST", "/pause_generation", {"mode": "in_place"}, admin=True)


def continue_call() -> HttpCall:
    return HttpCall("POST", "/continue_generation", {}, admin=True)


# GET /model_info (weight_version among the model's facts); SGLang before it named the route
# /get_model_info, which newer releases still answer with a deprecation warning logged on every
# call (http_server.py, "Endpoint '/get_model_info' is deprecated ... use '/model_info'").
MODEL_INFO_PATHS = ("/model_info", "/get_model_info")

# How SGLang refuses a request naming an adapter it has not loaded (LoRARegistry, python/sglang/
# srt/lora/lora_registry.py: a ValueError answered 400 {"error": {"message"}}), and where the
# message lists the ones it has.
ADAPTER_NOT_LOADED = "LoRA adapters are not loaded"
LOADED_ADAPTERS = "Loaded adapters:"


def lost_adapter(message: str) -> bool:
    """Whether a refusal says the server holds none of Forge's adapters (a restart drops them
    all), as opposed to an older version the driver has since unloaded, beside newer ones."""
    if ADAPTER_NOT_LOADED not in message:
        return False
    _, _, loaded = message.partition(LOADED_ADAPTERS)
    return "forge-v" not in loaded


def check_success(body: Any, what: str) -> None:
    """SGLang answers control calls with {"success": bool, "message" | "error_message": ...}."""
    if isinstance(body, dict) and body.get("success") is False:
        raise ProtocolError(
            f"SGLang refused {what}: {body.get('message') or body.get('error_message') or body}"
        )


class SGLangClient:
    """An SGLang server (`python -m sglang.launch_server`). Versions travel with the weights
    (`weight_version`), so every output is stamped by the server itself."""

    kind = "sglang"

    def __init__(
        self, url: str, sampling: Sampling, timeout_s: float = 120.0, keys: ServerKeys = NO_KEYS
    ) -> None:
        self.http = HttpTransport(url, timeout_s, keys=keys)
        self.url = self.http.url
        self.sampling = sampling
        self.policy_version = 0
        self.lora_name: str | None = None
        self._model_info_paths = MODEL_INFO_PATHS

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        # A request the gateway may give up (`cancel`) carries an id of Forge's making, unique
        # per call, so that it can be aborted: its connection is closed, which SGLang notices
        # only at its next look, and POST /abort_request names it.
        rid = f"forge-{uuid.uuid4().hex}" if request.cancel is not None else None
        try:
            body = await send_cancellable(
                self.http,
                generate_call(request, self.sampling, self.lora_name, rid),
                request.cancel,
                abort_call(rid) if rid is not None else None,
            )
        except ProtocolError as exc:
            if self.lora_name is not None and lost_adapter(str(exc)):
                # The server holds none of Forge's adapters: it restarted (runtime adapters do not
                # survive one), and every request naming the adapter would be refused. The engine
                # is lost, not this episode; the next sync loads the adapter again.
                raise EngineLost(
                    self.url, f"serves no LoRA adapter {self.lora_name!r} any more (restarted?): {exc}"
                ) from None
            raise
        result = parse_generate(
            body, self.sampling.stop_token_ids, self.policy_version, request.top_logprobs, self.url
        )
        check_prompt_kept(
            len(request.token_ids),
            (body.get("meta_info") or {}).get("prompt_tokens"),
            self.url,
            "Start the SGLang server without --allow-auto-truncate, and keep rollout.max_context_tokens "
            "within its --context-length.",
        )
        return result

    async def generate_batch(
        self, requests: list[GenerationRequest], release: list[str] | None = None
    ) -> list[GenerationResult | ProtocolError | EngineLost]:
        return await generate_each(self, requests)

    async def release(self, episode_ids: list[str]) -> None:
        """SGLang's radix cache evicts by itself; nothing to release."""

    async def healthy(self) -> bool:
        return await self.http.healthy()

    async def held_version(self, timeout_s: float = PROBE_TIMEOUT_S) -> int | None:
        """`GET /model_info`'s `weight_version` as a Forge version (0: "default" or the
        server's own --weight-version, as after a restart); None where it does not say. With
        Forge's adapter in use (loading one leaves that field as it was): None while
        `GET /v1/models` lists the adapter (which version it is, the driver knows), else 0 (a
        restart drops runtime adapters)."""
        if self.lora_name is not None:
            return None if await lists_model(self.http, self.lora_name, timeout_s) else 0
        body = await self._model_info(timeout_s)
        held = body.get("weight_version") if isinstance(body, dict) else None
        return None if held is None else as_policy_version(held)

    async def _model_info(self, timeout_s: float) -> Any:
        """GET /model_info, or /get_model_info on a server older than that name (it answers
        404, and is asked by the older name from then on)."""
        first, *older = self._model_info_paths
        try:
            return await self.http.send(HttpCall("GET", first), timeout_s=timeout_s)
        except ProtocolError as exc:
            if exc.status != 404 or not older:
                raise
        self._model_info_paths = tuple(older)
        return await self.http.send(HttpCall("GET", older[0]), timeout_s=timeout_s)

    async def load_checkpoint(self, path: str, version: int) -> None:
        check_success(await self.http.send(update_from_disk_call(path, version)), "update_weights_from_disk")
        self.policy_version = version

    def use_adapter(self, version: int) -> None:
        """Another process (the driver) loaded `version` of the adapter on this server: name it
        in requests from now on, and stamp their samples with `version`."""
        self.lora_name = adapter_name(version)
        self.policy_version = version

    async def load_adapter(self, path: str, version: int) -> None:
        """Load `version` of the adapter from folder `path` as forge-v{version}, generation
        paused around it, and name it in this client's requests from now on. The versions
        before stay loaded: other processes' requests may still name them
        (`unload_adapter`, which the driver calls once none can)."""
        name = adapter_name(version)
        await self.http.send(pause_call())
        try:
            check_success(await self.http.send(load_adapter_call(name, path)), "load_lora_adapter")
            self.lora_name = name
        finally:
            await self.http.send(continue_call())
        self.policy_version = version

    async def unload_adapter(self, version: int, timeout_s: float | None = None) -> None:
        """Unload forge-v{version}. SGLang refuses requests naming it at once and answers once
        the ones running on it have ended (its LoRA registry's wait_for_unload)."""
        body = await self.http.send(unload_adapter_call(adapter_name(version)), timeout_s=timeout_s)
        check_success(body, "unload_lora_adapter")

    async def close(self) -> None:
        await self.http.close()
