"""`forge serve`: Forge's engine as a standalone HTTP inference server.

The OpenAI-compatible endpoints and the episode API are the training gateway's own app
(`forge.gateway.server.build_app`), served unchanged; this module adds to that app:

    GET  /health                  the process answers
    GET  /ready                   200 once the model is loaded and generation is not paused, else 503
    GET  /forge/info              model name, policy version, token limits, stop ids, attention
    GET  /forge/metrics           requests, tokens, prefix-cache hits and evictions, weight updates
    POST /forge/generate          {"token_ids", "max_new_tokens"?, "episode_id"?, "temperature"?, "top_p"?,
                                  "seed"?, "top_logprobs"?, "stop"? (strings)} -> sampled "token_ids",
                                  "logprobs", "finish_reason" (stop|length), "policy_version",
                                  "prefill_tokens", "cached_tokens", and "top_logprobs" when asked
                                  (per token, [[id, logprob], ...]). A stop string ends generation at
                                  the token that completes it (that token is the last returned).
    POST /forge/generate/batch    {"requests": [generate bodies], "release"?: [episode ids]}
                                  -> {"results": [generate answers, or {"error", "status"}]}:
                                  one call, one engine batch (a rollout worker's many episodes)
    POST /forge/release           {"episode_id"} | {"episode_ids": [...]}: the episodes ended (their KV
                                  stays for later episodes to start from, until the cache needs its room)
    POST /forge/cancel            {"episode_ids": [...]}: their requests still generating end at the
                                  next decode step (answered cut, finish_reason length); -> "cancelled"
    POST /forge/pause             hold new batches until /forge/resume (returns when none runs)
    POST /forge/resume
    POST /forge/weights           {"checkpoint": folder} | {"adapter": folder}, "version": n
    POST /forge/weights/tensors   body: safetensors bytes; ?version=n

A weight update pauses generation, loads, and resumes: every token sampled after it
carries the new version, every token before it the old one.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from forge.config import ModelConfig
from forge.gateway.decoding import TextStream
from forge.gateway.episodes import EpisodeError
from forge.gateway.server import Gateway, ThreadedServer, build_app
from forge.rollout.engines.protocol import GenerationRequest, GenerationResult
from forge.rollout.engines.served import ServedEngine
from forge.rollout.engines.server_keys import key_in_env
from forge.rollout.engines.shared_prefix import loaded_attention
from forge.rollout.engines.updates import (
    WeightUpdateError,
    apply_adapter,
    checkpoint_state,
    tensors_from_bytes,
)


class GenerateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token_ids: list[int] = Field(min_length=1, description="the whole context so far, as token ids")
    max_new_tokens: int | None = Field(None, gt=0, description="cap on sampled tokens (at most the server's)")
    episode_id: str = Field("", description="keeps the episode's KV cached for its next turn")
    temperature: float | None = Field(
        None, ge=0, description="unset: the server's --temperature; 0 is greedy"
    )
    top_p: float | None = Field(None, gt=0, le=1, description="unset: the server's --top-p")
    seed: int | None = Field(None, ge=0, description="the request samples from its own generator, seeded so")
    top_logprobs: int = Field(0, ge=0, le=20, description="also return the k most likely tokens at each step")
    stop: list[str] = Field(
        default_factory=list,
        max_length=16,
        description="stop strings: generation ends at the token whose text completes one",
    )


class GenerateBatchBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    requests: list[GenerateBody] = Field(min_length=1, description="generated together, in one engine batch")
    release: list[str] = Field(
        default_factory=list, description="episodes that ended: their KV is dropped first"
    )


class ReleaseBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    episode_id: str | None = None
    episode_ids: list[str] = Field(default_factory=list)


class CancelBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    episode_ids: list[str] = Field(min_length=1, description="the episode ids their requests were sent with")


class WeightsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checkpoint: str | None = Field(None, description="a Hugging Face checkpoint folder on the server's disk")
    adapter: str | None = Field(None, description="a peft LoRA adapter folder on the server's disk")
    version: int = Field(ge=0, description="the policy version outputs carry from now on")


class EngineService:
    """What the extra endpoints act on: the served engine, the gateway (its tokenizer,
    its batcher, which the token endpoint shares) and the limits."""

    def __init__(self, served: ServedEngine, gateway: Gateway, model_name: str) -> None:
        self.served = served
        self.gateway = gateway
        self.model_name = model_name
        self.vocab_size = len(gateway.tokenizer)
        self._update_lock = asyncio.Lock()
        # episode id -> the cancel flags of its requests still generating (POST /forge/cancel)
        self.running: dict[str, list[threading.Event]] = {}

    async def generate(self, body: GenerateBody) -> dict[str, Any]:
        request = self._request(body)
        with self._cancellable([request]):
            return _answer(request, await self.gateway.batching.generate(request))

    @contextlib.contextmanager
    def _cancellable(self, requests: list[GenerationRequest]) -> Iterator[None]:
        """While these requests generate, `cancel` can end those of an episode id."""
        named = [r for r in requests if r.episode_id and r.cancel is not None]
        for request in named:
            self.running.setdefault(request.episode_id, []).append(request.cancel)
        try:
            yield
        finally:
            for request in named:
                flags = self.running.get(request.episode_id, [])
                if request.cancel in flags:
                    flags.remove(request.cancel)
                if not flags:
                    self.running.pop(request.episode_id, None)

    def cancel(self, episode_ids: list[str]) -> int:
        """End the requests of these episode ids still generating at the engine's next decode
        step (their client gave them up); how many there were."""
        flags = [flag for episode_id in episode_ids for flag in self.running.get(episode_id, [])]
        for flag in flags:
            flag.set()
        return len(flags)

    async def generate_batch(self, body: GenerateBatchBody) -> dict[str, Any]:
        """Every request of the batch in one engine batch; a request this server refuses gets
        its own error entry, the others are answered."""
        for episode_id in body.release:
            self.served.release(episode_id)
        requests: list[GenerationRequest | EpisodeError] = []
        for item in body.requests:
            try:
                requests.append(self._request(item))
            except EpisodeError as exc:
                requests.append(exc)
        valid = [r for r in requests if isinstance(r, GenerationRequest)]
        with self._cancellable(valid):
            results = iter(await self.gateway.batching.generate_many(valid) if valid else [])
        return {
            "results": [
                _answer(r, next(results))
                if isinstance(r, GenerationRequest)
                else {"error": r.message, "status": r.status}
                for r in requests
            ]
        }

    def _request(self, body: GenerateBody) -> GenerationRequest:
        """The engine request for a body, or EpisodeError(400) naming what is over a limit."""
        limit = self.gateway.max_new_tokens
        if body.max_new_tokens is not None and body.max_new_tokens > limit:
            raise EpisodeError(
                400,
                f"max_new_tokens={body.max_new_tokens} is over this server's limit of {limit} "
                "(forge serve --max-new-tokens)",
            )
        wanted = body.max_new_tokens or limit
        context = self.gateway.max_context_tokens
        if len(body.token_ids) + wanted > context:
            raise EpisodeError(
                400,
                f"the prompt is {len(body.token_ids)} tokens and {wanted} more were asked for, "
                f"over the context limit of {context} tokens (forge serve --max-context-tokens)",
            )
        bad = [t for t in body.token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise EpisodeError(
                400, f"token ids {bad[:5]} are outside the vocabulary (0..{self.vocab_size - 1})"
            )
        stop = [text for text in body.stop if text]
        return GenerationRequest(
            list(body.token_ids),
            wanted,
            body.episode_id,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            top_logprobs=body.top_logprobs,
            stop=stop,
            on_token=self._stop_watcher(stop) if stop else None,
            cancel=threading.Event(),
        )

    def _stop_watcher(self, stop: list[str]) -> Any:
        """Ends the row at the token whose text completes a stop string, decoded as the
        gateway decodes a reply (`TextStream`), so a gateway client cuts at the same token."""
        text = TextStream(self.gateway.tokenizer, stop, self.gateway.hidden_ids)
        return lambda token_id, _logprob, _top: text.push(token_id)

    async def update(self, load: Any, version: int) -> dict[str, Any]:
        """Run `load()` (which returns a state dict, or None when it changed the model
        itself) with generation paused, then stamp `version`."""
        async with self._update_lock:
            started = time.perf_counter()
            await asyncio.to_thread(self.served.update, load, version)
            return {"policy_version": self.served.policy_version, "seconds": time.perf_counter() - started}

    def load_adapter(self, path: str) -> None:
        engine = self.served.engine
        engine.model = apply_adapter(engine.model, path)


def _answer(request: GenerationRequest, result: GenerationResult) -> dict[str, Any]:
    answer = {
        "token_ids": result.token_ids,
        "logprobs": result.logprobs,
        "finish_reason": "stop" if result.finished else "length",
        "policy_version": result.policy_version,
        "prefill_tokens": result.prefill_tokens,
        "cached_tokens": len(request.token_ids) - result.prefill_tokens,
    }
    if request.top_logprobs:  # per sampled token, its k most likely alternatives as [id, logprob]
        answer["top_logprobs"] = [
            [[token, value] for token, value in top] for top in result.top_logprobs or []
        ]
    return answer


def build_server_app(service: EngineService) -> FastAPI:
    """The gateway's app with the engine endpoints added."""
    app = build_app(service.gateway)
    router = APIRouter()

    @router.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @router.get("/ready")
    async def ready() -> JSONResponse:
        paused = service.served.paused
        body = {"ready": not paused, "paused": paused, "policy_version": service.served.policy_version}
        return JSONResponse(body, status_code=503 if paused else 200)

    @router.get("/forge/info")
    async def info() -> dict:
        gateway = service.gateway
        return {
            "model": service.model_name,
            "policy_version": service.served.policy_version,
            "max_new_tokens": gateway.max_new_tokens,
            "max_context_tokens": gateway.max_context_tokens,
            "stop_token_ids": service.served.engine.stop_token_ids.tolist(),
            "temperature": service.served.engine.temperature,
            "top_p": service.served.engine.top_p,
            "vocab_size": service.vocab_size,
            "attn_implementation": loaded_attention(service.served.engine.model.config),
        }

    @router.get("/forge/metrics")
    async def metrics() -> dict:
        return service.served.metrics()

    @router.post("/forge/generate")
    async def generate(body: GenerateBody) -> dict:
        return await service.generate(body)

    @router.post("/forge/generate/batch")
    async def generate_batch(body: GenerateBatchBody) -> dict:
        return await service.generate_batch(body)

    @router.post("/forge/release")
    async def release(body: ReleaseBody) -> dict:
        episodes = ([body.episode_id] if body.episode_id is not None else []) + body.episode_ids
        if not episodes:
            raise EpisodeError(400, "name the episodes to release: episode_id or episode_ids")
        for episode_id in episodes:
            service.served.release(episode_id)
        return {"released": episodes}

    @router.post("/forge/cancel")
    async def cancel(body: CancelBody) -> dict:
        return {"cancelled": service.cancel(body.episode_ids)}

    @router.post("/forge/pause")
    async def pause() -> dict:
        await asyncio.to_thread(service.served.pause)
        return {"paused": True}

    @router.post("/forge/resume")
    async def resume() -> dict:
        service.served.resume()
        return {"paused": False}

    @router.post("/forge/weights")
    async def weights(body: WeightsBody) -> dict:
        if (body.checkpoint is None) == (body.adapter is None):
            raise EpisodeError(
                400, "send exactly one of checkpoint (a model folder) or adapter (a LoRA folder)"
            )
        try:
            if body.checkpoint is not None:
                return await service.update(lambda: checkpoint_state(body.checkpoint), body.version)
            return await service.update(lambda: service.load_adapter(body.adapter), body.version)
        except WeightUpdateError as exc:
            raise EpisodeError(400, str(exc)) from None
        except ValueError as exc:  # the engine refused tensors it does not have
            raise EpisodeError(400, f"weight update refused: {exc}") from None

    @router.post("/forge/weights/tensors")
    async def weight_tensors(request: Request, version: int) -> dict:
        data = await request.body()
        try:
            state = tensors_from_bytes(data)
            return await service.update(lambda: state, version)
        except WeightUpdateError as exc:
            raise EpisodeError(400, str(exc)) from None
        except ValueError as exc:
            raise EpisodeError(400, f"weight update refused: {exc}") from None

    app.include_router(router)
    return app


def make_service(
    checkpoint: str | Path,
    max_new_tokens: int = 256,
    max_context_tokens: int = 4096,
    prefill_chunk_tokens: int | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    cache_tokens: int = 65536,
    seed: int = 0,
    dtype: str = "float32",
    device: str = "auto",
    model_name: str | None = None,
    model_cfg: ModelConfig | None = None,
    attn_implementation: str = "auto",
    attn_setting: str = "rollout.attn_implementation",
    record_dir: str | Path | None = None,
    max_live_episodes: int = 1024,
    revision: str = "main",
) -> EngineService:
    """Load a checkpoint into an engine and wrap it for serving. `model_cfg` (a run's
    `model` section) gives dtype, device and LoRA layout; else `dtype` and `device`.
    Episodes played through the OpenAI endpoints are recorded to `record_dir`, if given.
    `attn_setting` is what errors about `attn_implementation` name (the config key or the flag).
    `checkpoint` is a folder or a hub id (at `revision`, or a run's model.revision), as model.path."""
    from forge.gateway.recording import standalone_store
    from forge.models.hub import names_hub_model
    from forge.models.loading import (
        checkpoint_folder,
        generation_end_ids,
        load_model,
        load_tokenizer,
        resolve_device,
    )
    from forge.rollout.chat import ChatFormat
    from forge.rollout.engines.hf import HFEngine

    if model_cfg is not None:  # a run's engine: its model section
        path = checkpoint_folder(checkpoint, model_cfg.revision)
    else:
        path = checkpoint_folder(checkpoint, revision, ("forge serve CHECKPOINT", "--revision"))
    tokenizer = load_tokenizer(path)
    if model_cfg is None:
        model_cfg = ModelConfig(path=str(path), dtype=dtype, device=device)  # type: ignore[arg-type]
    model = load_model(
        path,
        model_cfg,
        trainable=False,
        device=resolve_device(model_cfg.device),
        attn_implementation=attn_implementation,
        setting_key=attn_setting,
    )
    chat = ChatFormat(tokenizer, generation_end_ids(path))
    engine = HFEngine(
        model,
        chat.stop_token_ids,
        tokenizer.pad_token_id,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        max_context_tokens=max_context_tokens,
        prefill_chunk_tokens=prefill_chunk_tokens,
    )
    served = ServedEngine(engine, cache_tokens=cache_tokens)
    name = model_name or (str(checkpoint) if names_hub_model(str(checkpoint)) else path.resolve().name)
    store = standalone_store(record_dir, max_live_episodes=max_live_episodes)
    gateway = Gateway(served, tokenizer, store, max_new_tokens, max_context_tokens, model_name=name)
    return EngineService(served, gateway, name)


class RequireKey:
    """ASGI middleware: every request but `GET /health` must carry `Authorization: Bearer <key>`,
    else 401 {"error": "Unauthorized"} (vLLM's and SGLang's answer, which Forge's clients explain)."""

    OPEN = ("/health",)

    def __init__(self, app: Any, key: str) -> None:
        self.app = app
        self.expected = f"Bearer {key}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        import hmac

        if scope["type"] == "http" and scope["path"] not in self.OPEN:
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                await JSONResponse({"error": "Unauthorized"}, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def api_key_from_env(name: str | None) -> str | None:
    """`forge serve --api-key-env NAME`: the key in variable NAME (never on the command line,
    which `ps` shows to every user of the machine)."""
    return key_in_env(
        name, f"forge serve --api-key-env {name}: {name} is not set (or empty); export the key in it"
    )


class EngineServer(ThreadedServer):
    """Serves a service's app with uvicorn on its own thread (for tests, benchmarks and the
    Ray actor behind `rollout.engine: server`). `port=0` picks a free port. With `api_key`,
    every route but /health wants it (`Authorization: Bearer`)."""

    def __init__(
        self, service: EngineService, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None
    ) -> None:
        self.service = service
        app = build_server_app(service)
        super().__init__(
            RequireKey(app, api_key) if api_key else app,
            host,
            port,
            "forge serve",
            "pick another --port",
            store=service.gateway.store,
            timeout_keep_alive=300,
        )

    @property
    def url(self) -> str:
        host = socket.gethostbyname(socket.gethostname()) if self.host == "0.0.0.0" else self.host
        return f"http://{host}:{self.port}"


def serve(
    checkpoint: str, host: str = "127.0.0.1", port: int = 8000, api_key_env: str | None = None, **options: Any
) -> None:
    """Run `forge serve` in the foreground until interrupted (Ctrl-C or SIGTERM); stopping
    ends live episodes and records every ended one, its env's close waited for (bounded). With
    `api_key_env`, requests must carry the key that variable holds."""
    api_key = api_key_from_env(api_key_env)
    service = make_service(checkpoint, **options)
    server = EngineServer(service, host, port, api_key).start()
    print(
        f"forge serve: {service.model_name} at {server.url} (OpenAI API at {server.url}/v1, "
        f"token API at {server.url}/forge/generate)",
        flush=True,
    )
    # Ctrl-C and a plain kill both stop it, even where SIGINT came ignored (a shell's background
    # job: Python then leaves it ignored, and Ctrl-C or `kill -INT` would do nothing).
    previous = {stop: signal.signal(stop, _interrupt) for stop in (signal.SIGINT, signal.SIGTERM)}
    try:
        while server.thread.is_alive():
            # Not `join`: one that Ctrl-C interrupts leaves the thread looking ended (Python
            # 3.11), so `stop` would not wait for its shutdown and the episodes it records.
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        if service.gateway.store.env_factory is not None:
            print(
                f"forge serve: stopping; envs still closing get up to {server.drain_limit_s():g}s", flush=True
            )
        server.stop()
        for stop, handler in previous.items():
            signal.signal(stop, handler)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
