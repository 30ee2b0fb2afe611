"""vLLM's OpenAI-compatible server as an engine: `/v1/completions` with a token-id prompt,
`return_tokens_as_token_ids` and `logprobs`; runtime LoRA loading; the weight-transfer
control plane (`/pause`, `/init_weight_transfer_engine`, `/update_weights`, `/resume`).

Written against vLLM's documented shapes (its OpenAI protocol, `entrypoints/serve/dev/rlhf`
router and examples), checked against recorded fixtures, not a running vLLM. Launch flags
the requests need are in the README ("Inference servers").
"""

from __future__ import annotations

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

TOKEN_PREFIX = "token_id:"  # how return_tokens_as_token_ids spells each sampled token

# Routes a plain `vllm serve` lacks, and what turns them on.
ROUTE_HINTS = {
    "/pause": "start vllm serve with VLLM_SERVER_DEV_MODE=1 (releases before its /pause have none: upgrade)",
    "/resume": "start vllm serve with VLLM_SERVER_DEV_MODE=1 (releases before its /pause have none: upgrade)",
    "/get_world_size": "start vllm serve with VLLM_SERVER_DEV_MODE=1 and --weight-transfer-config "
    '\'{"backend": "nccl"}\'',
    "/init_weight_transfer_engine": "start vllm serve with VLLM_SERVER_DEV_MODE=1 and "
    '--weight-transfer-config \'{"backend": "nccl"}\'',
    "/update_weights": "start vllm serve with VLLM_SERVER_DEV_MODE=1",
    "/v1/load_lora_adapter": "start vllm serve with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora",
    "/v1/unload_lora_adapter": "start vllm serve with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora",
}


def completion_call(request: GenerationRequest, model: str, sampling: Sampling) -> HttpCall:
    temperature, top_p = request_sampling(request, sampling)
    body: dict[str, Any] = {
        "model": model,
        "prompt": list(request.token_ids),  # a list of ints is a token prompt: nothing is re-tokenized
        "max_tokens": request.max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        **NEUTRAL_SAMPLING,
        "n": 1,
        "stream": False,
        # The sampled token's own logprob, and with k > 0 the k most likely beside it
        # (choices[0].logprobs.top_logprobs, one {"token_id:N": logprob} per token).
        "logprobs": request.top_logprobs,
        "return_tokens_as_token_ids": True,
        "return_token_ids": True,  # newer vLLM also lists choices[0].token_ids; checked when present
        "skip_special_tokens": False,
    }
    if sampling.stop_token_ids:
        body["stop_token_ids"] = list(sampling.stop_token_ids)
    if request.stop:  # vLLM ends at the token completing one; its token ids keep that token
        body["stop"] = list(request.stop)
    if request.seed is not None:
        body["seed"] = request.seed
    if request.episode_id:
        body["user"] = request.episode_id
    return HttpCall("POST", "/v1/completions", body)


def _token_id(token: Any) -> int:
    if not isinstance(token, str) or not token.startswith(TOKEN_PREFIX):
        raise ProtocolError(
            f"vLLM returned token {token!r}, not 'token_id:N': the request must set return_tokens_as_token_ids"
        )
    return int(token[len(TOKEN_PREFIX) :])


def parse_completion(
    body: Any, stop_token_ids: tuple[int, ...], policy_version: int, top_logprobs: int = 0, url: str = "vllm"
) -> GenerationResult:
    """Sampled ids and logprobs from `choices[0].logprobs` (`tokens` as "token_id:N"), and
    with `top_logprobs` = k the k most likely tokens at each step."""
    try:
        choice = body["choices"][0]
        logprobs = choice["logprobs"]
        tokens, values = logprobs["tokens"], logprobs["token_logprobs"]
        reason = choice["finish_reason"]
    except (KeyError, IndexError, TypeError) as exc:
        raise ProtocolError(f"not a vLLM completion with logprobs ({exc!r}): {str(body)[:300]}") from None
    ids = [_token_id(token) for token in tokens]
    listed = choice.get("token_ids")
    if listed is not None and [int(t) for t in listed] != ids:
        raise ProtocolError(f"vLLM's token_ids {listed[:8]}... disagree with its logprob tokens {ids[:8]}...")
    if len(values) != len(ids) or any(v is None for v in values):
        raise ProtocolError(f"vLLM returned {len(values)} logprobs for {len(ids)} tokens")
    if reason not in ("stop", "length", "abort"):
        raise ProtocolError(f"vLLM finish_reason {reason!r} is not stop, length or abort")
    if reason == "abort":  # the server goes on; this episode is lost
        raise RequestAborted(url, "vLLM aborted the request (a /pause with mode=abort, or an abort call)")
    # Ended on a stop token only if the server says so and shows the token; otherwise the
    # agent loop closes the turn itself, untrained.
    finished = reason == "stop" and bool(ids) and ids[-1] in stop_token_ids
    tops = None
    if top_logprobs:
        # Each step's dict holds the sampled token and the k most likely (k + 1 entries when
        # the sampled one is not among them): the k best by logprob are the top k.
        steps = logprobs.get("top_logprobs")
        if (
            not isinstance(steps, list)
            or len(steps) != len(ids)
            or not all(isinstance(s, dict) for s in steps)
        ):
            raise ProtocolError(
                f"vLLM returned no top_logprobs per token for logprobs={top_logprobs}: {str(steps)[:200]}"
            )
        pairs = top_logprob_pairs(
            [[(_token_id(token), value) for token, value in step.items()] for step in steps], "vLLM"
        )
        tops = [step[:top_logprobs] for step in pairs]
    return GenerationResult(
        ids, [float(v) for v in values], finished, policy_version, prefill_tokens=0, top_logprobs=tops
    )


def load_adapter_call(name: str, path: str) -> HttpCall:
    # load_inplace replaces an adapter of the same name (vLLM >= 0.11); older servers need
    # /v1/unload_lora_adapter first, which `VLLMClient.load_adapter` falls back to.
    return HttpCall(
        "POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path, "load_inplace": True}
    )


def unload_adapter_call(name: str) -> HttpCall:
    return HttpCall("POST", "/v1/unload_lora_adapter", {"lora_name": name})


def pause_call() -> HttpCall:
    # Requests running finish first, then the server pauses. Newer vLLM reads `mode`
    # (default "abort"); vLLM before it reads only `wait_for_inflight_requests` (default
    # false: abort), and ignores `mode`, so both are sent: each version waits
    # (vllm/entrypoints/serve/dev/rlhf/api_router.py, AsyncLLM.pause_generation, which maps
    # the deprecated flag to mode="wait").
    return HttpCall("POST", "/pause", params={"mode": "wait", "wait_for_inflight_requests": True})


def resume_call() -> HttpCall:
    return HttpCall("POST", "/resume")


def init_weight_transfer_call(
    master_address: str, master_port: int, rank_offset: int, world_size: int
) -> HttpCall:
    return HttpCall(
        "POST",
        "/init_weight_transfer_engine",
        {
            "init_info": {
                "master_address": master_address,
                "master_port": master_port,
                "rank_offset": rank_offset,
                "world_size": world_size,
            }
        },
    )


def update_weights_call(
    names: list[str], dtype_names: list[str], shapes: list[list[int]], packed: bool = True
) -> HttpCall:
    return HttpCall(
        "POST",
        "/update_weights",
        {
            "update_info": {
                "names": names,
                "dtype_names": dtype_names,
                "shapes": shapes,
                "packed": packed,
            }
        },
    )


def world_size_call() -> HttpCall:
    return HttpCall("GET", "/get_world_size")


def start_weight_update_call() -> HttpCall:
    # Checkpoint format: the trainer sends Hugging Face names and shapes; vLLM maps them
    # onto its own (fused, sharded) layout as when it loads a checkpoint.
    return HttpCall("POST", "/start_weight_update", {"is_checkpoint_format": True})


def finish_weight_update_call(version: int) -> HttpCall:
    return HttpCall("POST", "/finish_weight_update", {"weight_version": str(version)})


def weight_info_call() -> HttpCall:
    # The weight_version the last /finish_weight_update set (None on a server that has not
    # had one since it started), in vLLM's dev RLHF router.
    return HttpCall("GET", "/weight_info")


class VLLMClient:
    """A `vllm serve` server. vLLM does not know Forge's policy versions: the client stamps
    the version it last loaded, and pauses the server (`mode=wait`) around every update so
    that no request straddles one. Prefix caching is vLLM's own (`--enable-prefix-caching`)."""

    kind = "vllm"

    def __init__(
        self, url: str, model: str, sampling: Sampling, timeout_s: float = 120.0, keys: ServerKeys = NO_KEYS
    ) -> None:
        # vLLM's --api-key guards every route but /health, /ping, /load, /version, /metrics and the docs
        # (newer vLLM; older guarded /v1 only): the key goes on every request.
        self.http = HttpTransport(url, timeout_s, keys=keys)
        self.http.route_hints = ROUTE_HINTS
        self.url = self.http.url
        self.base_model = model
        self.model = model  # the adapter's name once one is loaded
        self.sampling = sampling
        self.policy_version = 0
        self.reports_version = False  # its /finish_weight_update took the version (it has /weight_info)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        try:
            # A call given up (the gateway sets `cancel`) is ended by closing its connection,
            # which vLLM's /v1/completions takes as an abort (`with_cancellation`).
            body = await send_cancellable(
                self.http, completion_call(request, self.model, self.sampling), request.cancel
            )
        except ProtocolError as exc:
            if exc.status == 404 and self.model != self.base_model:
                # The server had Forge's adapter and now serves no such model: it restarted
                # (runtime LoRA adapters do not survive one). Its samples would be of another
                # policy, so the engine is lost; the next sync loads the adapter again.
                raise EngineLost(
                    self.url,
                    f"serves no LoRA adapter {self.model!r} any more (restarted?): {exc}",
                ) from None
            raise
        result = parse_completion(
            body, self.sampling.stop_token_ids, self.policy_version, request.top_logprobs, self.url
        )
        usage = body.get("usage") or {}
        check_prompt_kept(
            len(request.token_ids),
            usage.get("prompt_tokens"),
            self.url,
            "Forge sends no truncate_prompt_tokens: check that nothing between Forge and vLLM rewrites "
            "requests, and that rollout.max_context_tokens is within the server's --max-model-len.",
        )
        cached = ((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0
        result.prefill_tokens = len(request.token_ids) - int(cached)
        return result

    async def generate_batch(
        self, requests: list[GenerationRequest], release: list[str] | None = None
    ) -> list[GenerationResult | ProtocolError | EngineLost]:
        return await generate_each(self, requests)

    async def release(self, episode_ids: list[str]) -> None:
        """vLLM's prefix cache evicts by itself; nothing to release."""

    async def healthy(self) -> bool:
        return await self.http.healthy()

    @property
    def adapter_name(self) -> str:
        """The name Forge's adapter is loaded under (each version in place of the last);
        requests name it as their `model` once it is loaded."""
        return f"{self.base_model}-forge-lora"

    def use_adapter(self, version: int) -> None:
        """Another process loaded `version` of the adapter on this server: name it from now on."""
        self.model = self.adapter_name
        self.policy_version = version

    async def load_adapter(self, path: str, version: int) -> None:
        """Load a peft adapter folder the server can read (the trainer wrote it under
        rollout.weight_dir), generation paused meanwhile; later requests name it."""
        name = self.adapter_name
        await self.http.send(pause_call())
        try:
            try:
                await self.http.send(load_adapter_call(name, path))
            except ProtocolError as exc:
                # A vLLM without load_inplace ignores it and refuses a name already loaded
                # (400 "The lora adapter '...' has already been loaded."): unload, then load.
                # Any other refusal (a folder the server cannot read, a rank over its
                # --max-lora-rank) is the one to report, not the unload's.
                if "already been loaded" not in str(exc):
                    raise ProtocolError(
                        f"{exc} -- the adapter folder {path} (under rollout.weight_dir) must be readable "
                        "by the vLLM server at that path, and its rank at most the server's --max-lora-rank",
                        status=exc.status,
                    ) from None
                await self.http.send(unload_adapter_call(name))
                await self.http.send(load_adapter_call(name, path))
        finally:
            await self.http.send(resume_call())
        self.model = name
        self.policy_version = version

    # -- full weights by vLLM's NCCL weight transfer (forge.rollout.engines.vllm_transfer) ----
    async def world_size(self) -> int:
        """The server's inference ranks (TP x PP x DP): each is one member of the group."""
        body = await self.http.send(world_size_call())
        try:
            return int(body["world_size"])
        except (KeyError, TypeError, ValueError):
            raise ProtocolError(
                f'{self.url}/get_world_size answered {str(body)[:200]}, not {{"world_size": n}}'
            ) from None

    async def init_weight_transfer(
        self, master_address: str, master_port: int, rank_offset: int, world_size: int, grace_s: float = 0.0
    ) -> None:
        """Join the trainer's NCCL group; returns once every member has joined (waiting
        `grace_s` past the client's timeout)."""
        await self.http.send(
            init_weight_transfer_call(master_address, master_port, rank_offset, world_size),
            timeout_s=self.http.timeout_s + grace_s,
        )

    async def begin_weight_update(self) -> None:
        """Pause once running requests end, then open the update (servers older than
        /start_weight_update need no opening)."""
        await self.http.send(pause_call())
        await self._optional(start_weight_update_call())

    async def receive_weights(
        self, names: list[str], dtype_names: list[str], shapes: list[list[int]], grace_s: float = 0.0
    ) -> None:
        """Take the tensors the trainer broadcasts (returns when all have arrived; waits
        `grace_s` past the client's timeout)."""
        await self.http.send(
            update_weights_call(names, dtype_names, shapes), timeout_s=self.http.timeout_s + grace_s
        )

    async def end_weight_update(self, version: int) -> None:
        """Close the update with its version and resume generation; outputs from now on
        carry `version`."""
        try:
            self.reports_version = await self._optional(finish_weight_update_call(version))
        finally:
            await self.http.send(resume_call())
        self.policy_version = version

    async def served_version(self, timeout_s: float = PROBE_TIMEOUT_S) -> tuple[bool, str | None]:
        """(whether the server says, the weight_version it says it holds): a server that
        restarted holds its checkpoint again and says None."""
        try:
            body = await self.http.send(weight_info_call(), timeout_s=timeout_s)
        except ProtocolError as exc:
            if exc.status == 404:  # a vLLM before /weight_info
                return False, None
            raise
        if not isinstance(body, dict) or "weight_version" not in body:
            return False, None
        version = body["weight_version"]
        return True, None if version is None else str(version)

    async def held_version(self, timeout_s: float = PROBE_TIMEOUT_S) -> int | None:
        """With Forge's adapter in use: 0 once the server no longer lists it (a restart drops
        runtime adapters), else None (which version it is, the driver knows); with full
        weights, `/weight_info`'s (0 after a restart, where it says None); None where the
        server cannot say (a vLLM before /weight_info)."""
        if self.model != self.base_model:
            return None if await lists_model(self.http, self.model, timeout_s) else 0
        known, held = await self.served_version(timeout_s)
        return as_policy_version(held) if known else None

    async def resume(self) -> None:
        await self.http.send(resume_call())

    async def _optional(self, call: HttpCall) -> bool:
        """A call newer vLLM servers need and older ones lack (they answer 404); whether it
        was made."""
        try:
            await self.http.send(call)
            return True
        except ProtocolError as exc:
            if exc.status != 404:
                raise
            return False

    async def load_checkpoint(self, path: str, version: int) -> None:
        raise ProtocolError(
            "vLLM takes full weights through its weight-transfer engine (an NCCL broadcast from the trainer, "
            "which training runs drive through forge.rollout.engines.vllm_transfer: vllm serve "
            '--weight-transfer-config \'{"backend": "nccl"}\'), not from a folder over HTTP'
        )

    async def close(self) -> None:
        await self.http.close()
