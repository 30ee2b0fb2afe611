"""Clients for inference servers, one interface: token ids in, sampled ids with behaviour
logprobs, finish reason and policy version out; weight updates; pause/resume.

`ForgeClient` talks to `forge serve`; `forge.rollout.engines.vllm_client` and
`forge.rollout.engines.sglang_client` to vLLM's and SGLang's servers. Each client builds
its requests and parses its responses in plain functions (tested against recorded
shapes); the transport is shared here. A server that does not answer (connection refused,
timeout, 5xx) raises `EngineLost`: its episodes are lost, never silently retried; only a
server that turns a request away as busy (503, 429: it ran nothing) is asked again, with
backoff, within the call's time. A request
the server ended as aborted raises `RequestAborted`: that episode is lost, the engine stays.

A rollout worker sends many episodes' turns at once: `generate_batch` takes them together
(`forge serve`: one HTTP call and one engine batch; vLLM and SGLang: concurrent calls,
which those servers batch themselves).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Protocol

from forge.rollout.engines.protocol import GenerationRequest, GenerationResult
from forge.rollout.engines.server_keys import NO_KEYS, ServerKeys

# vLLM and SGLang fill every sampling parameter a request leaves unset from the model's
# generation_config.json (vLLM: `--generation-config auto`, CompletionRequest.to_sampling_params
# in vllm/entrypoints/openai/completion/protocol.py; SGLang: `--sampling-defaults model`,
# python/sglang/srt/server_args.py), e.g. Qwen2.5-Instruct's top_k 20 and repetition_penalty
# 1.05. Forge's behaviour logprobs and its trainer assume temperature and top-p only, so both
# clients send every other knob switched off (top_k -1 is the whole vocabulary on both, and
# older vLLMs refuse 0).
NEUTRAL_SAMPLING = {
    "top_k": -1,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
}


class EngineLost(RuntimeError):
    """The engine at `url` died, hung past its timeout, or failed the request."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"engine {url}: {reason}")
        self.url = url
        self.reason = reason

    def __reduce__(self) -> tuple:
        # Rebuilt from (url, reason), not from args (its message): a worker's EngineLost
        # must reach the driver through Ray as itself, not as an UnserializableException.
        return (type(self), (self.url, self.reason))


class NoAnswer(EngineLost):
    """The server gave no answer within the call's time: it may still be working on it (its
    engine stuck, while its GET /health, served apart from the engine, may still answer)."""


class RequestAborted(EngineLost):
    """The server ended one request as aborted (finish reason `abort`: someone paused it with
    mode=abort, or an older server that aborts on every pause): that episode is lost, not
    the engine, which answered and goes on serving (the router keeps it)."""


class ProtocolError(ValueError):
    """A server answered with a body this client cannot read (wrong server kind or version),
    or refused the request (`status`, the HTTP code, when it came as one)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Sampling:
    """What every engine is asked to sample with; behaviour logprobs are of this distribution."""

    temperature: float = 1.0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()


@dataclass
class HttpCall:
    """One request a client makes: method, path under the server's root, JSON body or bytes."""

    method: str
    path: str
    body: Any = None
    content: bytes | None = None
    params: dict[str, Any] | None = None
    admin: bool = False  # an SGLang admin route: sent with the admin key (--admin-api-key) where one is set


class EngineClient(Protocol):
    url: str
    policy_version: int

    async def generate(self, request: GenerationRequest) -> GenerationResult: ...

    async def generate_batch(
        self, requests: list[GenerationRequest], release: list[str] | None = None
    ) -> list[GenerationResult | ProtocolError | EngineLost]:
        """Each request's result or error, in order; `release` names ended episodes (their
        cached KV may go). Raises EngineLost when the whole call fails."""
        ...

    async def release(self, episode_ids: list[str]) -> None: ...

    async def healthy(self) -> bool: ...

    async def held_version(self, timeout_s: float) -> int | None:
        """The Forge policy version the server says it holds (0: its checkpoint, as after a
        restart; None: it cannot say), asked within `timeout_s`."""
        ...

    async def load_checkpoint(self, path: str, version: int) -> None: ...

    async def load_adapter(self, path: str, version: int) -> None: ...

    async def close(self) -> None: ...


async def generate_each(
    client: Any, requests: list[GenerationRequest]
) -> list[GenerationResult | ProtocolError | EngineLost]:
    """`generate_batch` for a server that batches concurrent requests itself: one call per
    request, all in flight at once."""
    import asyncio

    async def one(request: GenerationRequest) -> GenerationResult | ProtocolError | EngineLost:
        try:
            return await client.generate(request)
        except (ProtocolError, EngineLost) as exc:
            return exc

    return list(await asyncio.gather(*(one(request) for request in requests)))


# How long a probe of a server's health or weights may take (a dropped server re-checked
# between rollouts, or before a weight sync): a dead one costs this much at most.
PROBE_TIMEOUT_S = 5.0


def as_policy_version(said: Any) -> int:
    """A version a server reports, as Forge's: what Forge set (`str(version)`), else 0 (None,
    SGLang's "default", a --weight-version of the user's own: the checkpoint it started from)."""
    try:
        return int(said)
    except (TypeError, ValueError):
        return 0


BUSY_STATUSES = (429, 503)  # turned away for now, nothing run: worth sending again


def retry_after(response: Any, default: float) -> float:
    """The wait a busy answer asks for (`Retry-After` in seconds, at most 10), else `default`."""
    try:
        return min(float(response.headers.get("retry-after", default)), 10.0)
    except ValueError:
        return default


class HttpTransport:
    """An httpx client per event loop (Ray actors and tests run several loops)."""

    def __init__(self, url: str, timeout_s: float, transport: Any = None, keys: ServerKeys = NO_KEYS) -> None:
        self.url = url.rstrip("/")
        # Which variables hold the server's API keys, and their values (read here, so a variable
        # named but unset is refused when the client is made, not on its first request).
        self.keys = keys
        self._api_key, self._admin_key = keys.values()
        self.timeout_s = timeout_s
        self.transport = transport  # an httpx transport; tests replay recorded exchanges through one
        # Waits before sending a request turned away as busy again (BUSY_STATUSES); after
        # the last, the busy answer stands (a 503 is then an EngineLost).
        self.busy_retry_delays_s: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
        # What to tell a user whose server lacks a route (FastAPI's 404 {"detail": "Not
        # Found"}): the flag or environment variable that turns it on, by path.
        self.route_hints: dict[str, str] = {}
        self._client: Any = None
        self._loop: Any = None

    def _session(self) -> Any:
        import asyncio

        import httpx

        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            # vLLM and SGLang get one request per live episode's turn and batch them
            # themselves: no cap on connections (httpx pools 100 by default, and the rest
            # waited, that wait counted against the timeout, so a worker with many episodes
            # lost engines that were answering), and no pool wait counted as "no answer".
            self._client = httpx.AsyncClient(
                base_url=self.url,
                timeout=httpx.Timeout(self.timeout_s, pool=None),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=512),
                transport=self.transport,
            )
            self._loop = loop
        return self._client

    async def healthy(self) -> bool:
        """Whether the server answers GET /health within PROBE_TIMEOUT_S (the route all three
        servers have)."""
        try:
            await self.send(HttpCall("GET", "/health"), timeout_s=PROBE_TIMEOUT_S)
            return True
        except (EngineLost, ProtocolError):
            return False

    async def send(self, call: HttpCall, timeout_s: float | None = None) -> Any:
        import asyncio
        import time

        started = time.monotonic()
        budget = timeout_s or self.timeout_s
        for delay in (*self.busy_retry_delays_s, None):
            response = await self._send_once(call, timeout_s)
            if response.status_code not in BUSY_STATUSES or delay is None:
                break
            # A server that is up but turns requests away for now (SGLang's full queue,
            # --max-queued-requests: 503 "The request queue is full."; a proxy's 429) ran
            # nothing: the same request again later, within the call's time.
            wait = min(retry_after(response, delay), budget - (time.monotonic() - started))
            if wait < 0:
                break
            await asyncio.sleep(wait)
        if response.status_code >= 500:
            raise EngineLost(
                self.url,
                f"{call.method} {call.path} answered {response.status_code}: {error_message(response)}",
            )
        if response.status_code >= 400:
            message = error_message(response)
            hint = error_hint(message)
            if response.status_code in (401, 403):  # vLLM's and SGLang's answer to a missing or wrong key
                hint = self.keys.refusal_hint(call.admin, response.status_code)
            if response.status_code == 404 and message == "Not Found" and call.path in self.route_hints:
                hint = f" (the server has no {call.path}: {self.route_hints[call.path]})"
            raise ProtocolError(
                f"{self.url}{call.path} refused the request ({response.status_code}): {message}{hint}",
                status=response.status_code,
            )
        if "json" in response.headers.get("content-type", ""):
            return response.json()
        return response.text

    async def _send_once(self, call: HttpCall, timeout_s: float | None) -> Any:
        import httpx

        try:
            try:
                return await self._request(call, timeout_s)
            except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
                # A kept-alive connection the server had just closed (servers drop idle ones
                # after a few seconds): send once more on a fresh one. A re-sent generate is
                # still a sample of the policy; the server re-prefills that episode.
                return await self._request(call, timeout_s)
        except httpx.TimeoutException:
            raise NoAnswer(
                self.url,
                f"no answer to {call.method} {call.path} within {timeout_s or self.timeout_s:g}s "
                "(rollout.engine_timeout_s)",
            ) from None
        except httpx.TransportError as exc:
            raise EngineLost(self.url, f"{type(exc).__name__} on {call.method} {call.path}: {exc}") from None

    async def _request(self, call: HttpCall, timeout_s: float | None) -> Any:
        return await self._session().request(
            call.method,
            call.path,
            json=call.body if call.content is None else None,
            content=call.content,
            params=call.params,
            headers=self._headers(call),
            timeout=timeout_s or self.timeout_s,
        )

    def _headers(self, call: HttpCall) -> dict[str, str] | None:
        """`Authorization: Bearer <key>`: the admin key on an admin route where one is set (SGLang
        accepts only it there once started with --admin-api-key), else the API key."""
        key = self._admin_key if call.admin and self._admin_key else self._api_key
        return {"Authorization": f"Bearer {key}"} if key else None

    async def close(self) -> None:
        if self._client is not None:
            try:
                await self._client.aclose()
            except RuntimeError:  # its loop is gone; the sockets went with it
                pass
            self._client = None


# How often a call in flight looks whether it was given up (its request's `cancel` set): a
# wake-up per call every 0.1 s, nothing per token. The gateway checks its clients as often.
CANCEL_POLL_S = 0.1


async def send_cancellable(
    http: HttpTransport, call: HttpCall, cancel: threading.Event | None, abort: HttpCall | None = None
) -> Any:
    """`http.send(call)`, ended early once `cancel` is set: the connection is closed (httpx
    drops a connection whose response was not read to the end), and `abort`, when given, is
    sent to the server after it; raises `RequestAborted` (the request's episode is lost, the
    engine stays). vLLM aborts a /v1/completions request whose client disconnects (the route
    is wrapped in `with_cancellation`, vllm/entrypoints/utils.py, which cancels the handler
    on http.disconnect, and AsyncLLM.generate, vllm/v1/engine/async_llm.py, aborts the
    engine request when cancelled); SGLang notices a disconnect only when it next looks (its
    TokenizerManager._wait_one_response, python/sglang/srt/managers/tokenizer_manager.py), so
    its client also sends POST /abort_request."""
    import asyncio

    if cancel is None:
        return await http.send(call)
    sending = asyncio.ensure_future(http.send(call))
    try:
        while not sending.done():
            await asyncio.wait({sending}, timeout=CANCEL_POLL_S)
            if cancel.is_set() and not sending.done():
                sending.cancel()
                if abort is not None:
                    try:
                        await http.send(abort, PROBE_TIMEOUT_S)
                    except (EngineLost, ProtocolError):  # the disconnect stops it all the same
                        pass
                raise RequestAborted(
                    http.url, f"{call.method} {call.path} was given up and ended on the server"
                )
        return sending.result()
    finally:
        sending.cancel()  # done by now, unless this call itself was cancelled


async def lists_model(http: HttpTransport, name: str, timeout_s: float) -> bool:
    """Whether the server's `GET /v1/models` (vLLM's and SGLang's ModelList, runtime LoRA
    adapters among its cards) lists `name`."""
    body = await http.send(HttpCall("GET", "/v1/models"), timeout_s=timeout_s)
    cards = body.get("data") if isinstance(body, dict) else None
    return isinstance(cards, list) and any(
        isinstance(card, dict) and card.get("id") == name for card in cards
    )


def check_prompt_kept(sent: int | None, counted: Any, url: str, fix: str) -> None:
    """Refuse an answer to a prompt the server shortened: its tokens would be trained as a
    continuation of context the model never saw. `counted` is the server's own prompt count."""
    if sent is None or counted is None:
        return
    try:
        kept = int(counted)
    except (TypeError, ValueError):
        return
    if kept != sent:
        raise ProtocolError(
            f"{url} generated from {kept} of the {sent} prompt tokens sent (it cut the prompt); "
            f"those tokens are not a sample of the policy on this context. {fix}"
        )


def error_message(response: Any) -> str:
    """The message of an error body as vLLM, SGLang and FastAPI write it: vLLM's newer
    `{"error": {"message", "type", "param", "code"}}`, its older flat
    `{"object": "error", "message", ...}`, SGLang's `{"error": {"message"}}` or
    `{"error": "..."}`, FastAPI's `{"detail": ...}`; else the text itself."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:1000]
        for value in (error, body.get("message"), body.get("detail")):
            if isinstance(value, str) and value:
                return value[:1000]
        if body.get("detail") is not None:
            return str(body["detail"])[:1000]
    return response.text[:500]


# Phrases of a prompt over the server's context: vLLM's renderer ("However, the model's
# context length is only N tokens", vllm/renderers/params.py), older vLLM ("This model's
# maximum context length is N tokens"), SGLang ("is longer than the model's context length",
# "exceeds the maximum allowed length").
CONTEXT_PHRASES = ("context length", "maximum allowed length", "max_model_len")


def error_hint(message: str) -> str:
    """What to change for an error a server gives on every request of a misconfigured run."""
    lowered = message.lower()
    if any(phrase in lowered for phrase in CONTEXT_PHRASES):
        return (
            " (a turn's prompt plus rollout.max_new_tokens must fit the server's context: set "
            "rollout.max_context_tokens at most the server's --max-model-len (vLLM) / "
            "--context-length (SGLang), or raise those)"
        )
    if "model" in lowered and "does not exist" in lowered:  # vLLM's 404 for an unserved name
        return (
            " (requests name the model as model.path; serve it under that name: vllm serve ... "
            "--served-model-name <model.path>)"
        )
    return ""


# -- Forge's own server -------------------------------------------------------------------
def forge_generate_call(request: GenerationRequest, sampling: Sampling | None = None) -> HttpCall:
    body: dict[str, Any] = {
        "token_ids": list(request.token_ids),
        "max_new_tokens": request.max_new_tokens,
        "episode_id": request.episode_id,
    }
    # The request's own sampling, else the run's, else (neither set) the server's flags.
    temperature, top_p = request_sampling(request, sampling)
    if temperature is not None:
        body["temperature"] = temperature
    if top_p is not None:
        body["top_p"] = top_p
    if request.seed is not None:
        body["seed"] = request.seed
    if request.top_logprobs:
        body["top_logprobs"] = request.top_logprobs
    if request.stop:
        body["stop"] = list(request.stop)
    return HttpCall("POST", "/forge/generate", body)


def request_sampling(
    request: GenerationRequest, sampling: Sampling | None
) -> tuple[float | None, float | None]:
    """Temperature and top-p a request is sampled with: its own where it set them (a gateway
    honouring its client's), else the run's."""
    temperature = (
        request.temperature
        if request.temperature is not None
        else (sampling.temperature if sampling is not None else None)
    )
    top_p = request.top_p if request.top_p is not None else (sampling.top_p if sampling is not None else None)
    return temperature, top_p


def top_logprob_pairs(steps: Any, what: str) -> list[list[tuple[int, float]]]:
    """Per sampled token, its alternatives as (token id, logprob), most likely first."""
    try:
        return [
            sorted(((int(token), float(value)) for token, value in step), key=lambda pair: -pair[1])
            for step in steps
        ]
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"{what}: top logprobs are not [token id, logprob] pairs ({exc!r})") from None


def forge_generate_batch_call(
    requests: list[GenerationRequest], sampling: Sampling | None = None, release: list[str] | None = None
) -> HttpCall:
    body: dict[str, Any] = {"requests": [forge_generate_call(request, sampling).body for request in requests]}
    if release:
        body["release"] = list(release)
    return HttpCall("POST", "/forge/generate/batch", body)


def forge_parse_generate_batch(body: Any, count: int) -> list[GenerationResult | ProtocolError]:
    """Each answer of a batch, or a ProtocolError for a request the server refused."""
    results = body.get("results") if isinstance(body, dict) else None
    if not isinstance(results, list) or len(results) != count:
        raise ProtocolError(
            f"not a forge serve /forge/generate/batch answer for {count} requests: {str(body)[:300]}"
        )
    return [
        ProtocolError(f"forge serve refused the request ({item.get('status', 400)}): {item['error']}")
        if isinstance(item, dict) and "error" in item
        else forge_parse_generate(item)
        for item in results
    ]


def forge_parse_generate(body: Any) -> GenerationResult:
    try:
        reason = body["finish_reason"]
        if reason not in ("stop", "length"):
            raise ProtocolError(f"finish_reason {reason!r} is neither stop nor length")
        ids, logprobs = [int(t) for t in body["token_ids"]], [float(x) for x in body["logprobs"]]
        if len(ids) != len(logprobs):
            raise ProtocolError(f"{len(ids)} token ids but {len(logprobs)} logprobs")
        tops = body.get("top_logprobs")
        if tops is not None:
            tops = top_logprob_pairs(tops, "forge serve")
            if len(tops) != len(ids):
                raise ProtocolError(f"{len(ids)} token ids but top logprobs for {len(tops)}")
        return GenerationResult(
            ids,
            logprobs,
            reason == "stop",
            int(body["policy_version"]),
            int(body["prefill_tokens"]),
            top_logprobs=tops,
        )
    except (KeyError, TypeError) as exc:
        raise ProtocolError(
            f"not a forge serve /forge/generate answer ({exc!r}): {str(body)[:300]}"
        ) from None


class ForgeClient:
    """A `forge serve` server. It keeps each episode's KV between turns (send the same
    `episode_id`; `release` when the episode ends) and stamps the policy version itself."""

    kind = "forge"

    def __init__(
        self, url: str, timeout_s: float = 120.0, sampling: Sampling | None = None, keys: ServerKeys = NO_KEYS
    ) -> None:
        self.http = HttpTransport(url, timeout_s, keys=keys)
        self.url = self.http.url
        self.sampling = sampling  # None: the server's own --temperature / --top-p
        self.policy_version = 0

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        result = forge_parse_generate(await self.http.send(forge_generate_call(request, self.sampling)))
        self.policy_version = result.policy_version
        return result

    async def generate_batch(
        self, requests: list[GenerationRequest], release: list[str] | None = None
    ) -> list[GenerationResult | ProtocolError | EngineLost]:
        """One call for the batch; a request given up meanwhile (its `cancel` set) is cancelled
        on the server, which ends it at its next decode step and answers it cut."""
        import asyncio

        call = asyncio.ensure_future(
            self.http.send(forge_generate_batch_call(requests, self.sampling, release))
        )
        try:
            await self._cancel_given_up(call, [r for r in requests if r.cancel is not None and r.episode_id])
            body = await call
        finally:
            call.cancel()  # done by now, unless this call itself was cancelled
        results = forge_parse_generate_batch(body, len(requests))
        versions = [r.policy_version for r in results if isinstance(r, GenerationResult)]
        if versions:
            self.policy_version = max(versions)
        return results

    async def _cancel_given_up(self, call: Any, watched: list[GenerationRequest]) -> None:
        """Until `call` is answered, send the server the episode ids of the requests whose
        `cancel` was set, once each."""
        import asyncio

        while watched and not call.done():
            await asyncio.wait({call}, timeout=CANCEL_POLL_S)
            given_up = [r.episode_id for r in watched if r.cancel is not None and r.cancel.is_set()]
            if given_up and not call.done():
                watched = [r for r in watched if r.episode_id not in given_up]
                try:
                    await self.http.send(HttpCall("POST", "/forge/cancel", {"episode_ids": given_up}), 10.0)
                except (EngineLost, ProtocolError):  # a server without /forge/cancel runs them on
                    pass

    async def release(self, episode_ids: list[str]) -> None:
        await self.http.send(HttpCall("POST", "/forge/release", {"episode_ids": list(episode_ids)}))

    async def healthy(self) -> bool:
        return await self.http.healthy()

    async def held_version(self, timeout_s: float = PROBE_TIMEOUT_S) -> int | None:
        """`GET /ready`'s policy_version (a paused server, mid-update, answers 503: EngineLost)."""
        body = await self.http.send(HttpCall("GET", "/ready"), timeout_s=timeout_s)
        said = body.get("policy_version") if isinstance(body, dict) else None
        return said if isinstance(said, int) else None

    async def load_checkpoint(self, path: str, version: int) -> None:
        await self.http.send(HttpCall("POST", "/forge/weights", {"checkpoint": path, "version": version}))
        self.policy_version = version

    async def load_adapter(self, path: str, version: int) -> None:
        await self.http.send(HttpCall("POST", "/forge/weights", {"adapter": path, "version": version}))
        self.policy_version = version

    async def push_tensors(self, blob: bytes, version: int) -> None:
        """Tensors as one safetensors blob (`forge.rollout.engines.updates.tensors_to_bytes`)."""
        await self.http.send(
            HttpCall("POST", "/forge/weights/tensors", content=blob, params={"version": version})
        )
        self.policy_version = version

    async def metrics(self) -> dict[str, Any]:
        return await self.http.send(HttpCall("GET", "/forge/metrics"))

    async def close(self) -> None:
        await self.http.close()
