"""The HTTP server: OpenAI-compatible `/v1` endpoints served by the rollout engine, and
the `/forge/episodes` API that starts and finishes episodes.

A request belongs to an episode named by, in this order, the `X-Forge-Episode` header,
the API key (`Authorization: Bearer <episode id>`, i.e. `OpenAI(api_key=episode_id)`),
or the body's `user` field; the first that names a known episode wins.

    GET  /v1/models                      the policy's model name
    POST /v1/chat/completions            messages (+ tools; stream) -> reply, tool_calls parsed
    POST /v1/completions                 raw prompt -> text
    POST /forge/episodes                 {"task"?, "group_id"?} -> id, task, first observation, tools
    GET  /forge/episodes/{id}            the same view, plus status, outcome and call count
    POST /forge/episodes/{id}/step       {"action"} -> the env's observation, reward, done
    POST /forge/episodes/{id}/finish     {"reward"?} or {"answer"?} (the env verifies) or {}

Every call is recorded before its reply is sent, so a client that goes away while the
reply streams loses nothing; a reply finished after its client disconnected is dropped
(the agent never saw it) and counted in the episode's `calls_dropped`.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from forge.env.tools import template_renders_tools
from forge.gateway.episodes import CallRecord, EpisodeError, EpisodeStore
from forge.gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    FinishRequest,
    StartEpisodeRequest,
    StepRequest,
    completion_id,
    error_body,
    finish_reason,
    now,
    split_tool_calls,
    template_messages,
)
from forge.rollout.engines.batching import BatchingEngine
from forge.rollout.engines.protocol import GenerationRequest, InferenceEngine


class Gateway:
    """What the endpoints need: an engine, the tokenizer whose chat template renders
    prompts, the episode store and the token limits."""

    def __init__(
        self,
        engine: InferenceEngine,
        tokenizer: Any,
        store: EpisodeStore,
        max_new_tokens: int,
        max_context_tokens: int,
        model_name: str = "forge-policy",
        next_task: Any | None = None,
        tools: list[dict] | None = None,
        system_prompt: str | None = None,
    ) -> None:
        self.engine = engine
        self.batching = BatchingEngine(engine, max_wait_s=0.01)
        self.tokenizer = tokenizer
        self.store = store
        self.max_new_tokens = max_new_tokens
        self.max_context_tokens = max_context_tokens
        self.model_name = model_name
        self.next_task = next_task  # () -> task row, for POST /forge/episodes without a task
        self.tools = tools
        self.system_prompt = system_prompt
        self.tool_aware = template_renders_tools(tokenizer)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def chat_prompt_ids(self, messages: list[dict], tools: list[dict] | None) -> list[int]:
        try:
            rendered = template_messages(messages, tools, self.tool_aware)
            text = self.tokenizer.apply_chat_template(
                rendered, tools=tools if self.tool_aware else None, add_generation_prompt=True, tokenize=False
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise EpisodeError(400, f"messages could not be rendered: {exc}") from None
        except Exception as exc:  # jinja2 errors raised by the template itself
            raise EpisodeError(400, f"the chat template rejected these messages: {exc}") from None
        return self.encode(text)

    def resolve_episode(self, request: Request, user: str | None) -> str:
        header = request.headers.get("x-forge-episode")
        if header:
            return self.store.get(header).episode_id
        auth = request.headers.get("authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        for candidate in (key, user):
            if candidate and candidate in self.store.episodes:
                return candidate
        tried = ", ".join(f"{name}={value!r}" for name, value in (("api key", key), ("user", user)) if value)
        raise EpisodeError(
            404, f"unknown episode ({tried or 'none given'}): start one with POST /forge/episodes and send "
            "its episode_id as the API key, the X-Forge-Episode header or the `user` field"
        )

    async def generate(self, request: Request, episode_id: str, prompt_ids: list[int], max_tokens: int | None):
        self.store.live(episode_id)
        room = self.max_context_tokens - len(prompt_ids)
        limit = min(max_tokens or self.max_new_tokens, self.max_new_tokens)
        if room < 1 or (max_tokens is not None and limit > room):
            raise EpisodeError(
                400, f"the prompt is {len(prompt_ids)} tokens and {limit} more were asked for, over the "
                f"context limit of {self.max_context_tokens} tokens (rollout.max_context_tokens): shorten "
                "the conversation or ask for fewer max_tokens",
            )
        limit = min(limit, room)
        started = time.monotonic()
        try:
            result = await self.batching.generate(GenerationRequest(list(prompt_ids), limit, episode_id))
        except Exception as exc:
            raise EpisodeError(500, f"generation failed: {type(exc).__name__}: {exc}") from None
        call = CallRecord(
            list(prompt_ids), list(result.token_ids), list(result.logprobs), result.policy_version,
            result.finished, time.monotonic() - started,
        )
        if await request.is_disconnected():
            # The agent never saw this reply, so it did not shape the episode: not a sample.
            episode = self.store.get(episode_id)
            episode.info["calls_dropped"] = episode.info.get("calls_dropped", 0) + 1
            raise EpisodeError(499, "the client disconnected before the reply was sent")
        self.store.record(episode_id, call)
        return call

    async def start_episode(self, task: dict[str, Any], group_id: str | None = None) -> str:
        try:
            episode = await self.store.start(task, group_id)
        except Exception as exc:
            raise EpisodeError(400, f"the env could not start this task: {type(exc).__name__}: {exc}") from None
        self.batching.register()  # batches wait briefly for the other live episodes' calls
        return episode.episode_id

    async def finish_episode(self, episode_id: str, reward: float | None = None, answer: str | None = None) -> None:
        episode = self.store.live(episode_id)
        try:
            await self.store.finish(episode_id, reward, answer)
        finally:
            if episode.finished:  # also when the env's verifier raised and ended it as an error
                self.batching.unregister()

    async def abandon_episode(self, episode_id: str, status: str, error: str) -> None:
        if not self.store.get(episode_id).finished:
            self.store.abandon(episode_id, status, error)  # type: ignore[arg-type]
            self.batching.unregister()

    def episode_view(self, episode_id: str) -> dict[str, Any]:
        episode = self.store.get(episode_id)
        env = episode.env
        return {
            "episode_id": episode.episode_id,
            "group_id": episode.group_id,
            "task": episode.task,
            "observation": episode.observation,
            "tools": env.tools if env is not None else self.tools,
            "system_prompt": env.system_prompt if env is not None else self.system_prompt,
            "finished": episode.finished,
            "status": episode.status,
            "outcome": episode.outcome,
            "calls": len(episode.calls),
            "env_done": episode.env_done,
        }


def _token_logprobs(tokenizer: Any, call: CallRecord) -> dict[str, Any]:
    tokens = tokenizer.convert_ids_to_tokens(call.completion_ids)
    return {"content": [{"token": token, "logprob": logprob, "bytes": None, "top_logprobs": []}
                        for token, logprob in zip(tokens, call.logprobs, strict=True)]}


def _chat_response(call: CallRecord, text: str, tools_given: bool, model: str, episode_id: str,
                   logprobs: dict | None) -> dict:
    content, tool_calls = split_tool_calls(text) if tools_given else (text, [])
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "id": completion_id("chatcmpl"),
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(call.finished, tool_calls),
                     "logprobs": logprobs}],
        "usage": _usage(call),
        "forge": {"episode_id": episode_id, "policy_version": call.policy_version},
    }


def _usage(call: CallRecord) -> dict[str, int]:
    prompt, completion = len(call.prompt_ids), len(call.completion_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _chat_stream(gateway: Gateway, call: CallRecord, tools_given: bool, model: str, include_usage: bool):
    """SSE chunks of an already recorded call: text token by token, tool calls whole."""
    ident, created = completion_id("chatcmpl"), now()

    def chunk(delta: dict[str, Any], reason: str | None = None, usage: dict | None = None) -> str:
        body = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}]}
        if usage is not None:
            body["choices"], body["usage"] = [], usage
        return f"data: {json.dumps(body)}\n\n"

    text = gateway.tokenizer.decode(call.completion_ids, skip_special_tokens=True)
    content, tool_calls = split_tool_calls(text) if tools_given else (text, [])
    yield chunk({"role": "assistant", "content": ""})
    if tool_calls:
        if content:
            yield chunk({"content": content})
        for index, tool_call in enumerate(tool_calls):
            yield chunk({"tool_calls": [{"index": index, **tool_call}]})
    else:
        sent = ""
        for end in range(1, len(call.completion_ids) + 1):
            so_far = gateway.tokenizer.decode(call.completion_ids[:end], skip_special_tokens=True)
            if so_far.startswith(sent) and len(so_far) > len(sent):
                yield chunk({"content": so_far[len(sent):]})
                sent = so_far
        if sent != text:  # decoding was not prefix-stable; send the rest as is
            yield chunk({"content": text[len(sent):] if text.startswith(sent) else text})
    yield chunk({}, finish_reason(call.finished, tool_calls))
    if include_usage:
        yield chunk({}, usage=_usage(call))
    yield "data: [DONE]\n\n"


def build_app(gateway: Gateway) -> FastAPI:
    app = FastAPI(title="Forge gateway", docs_url=None, redoc_url=None)
    store = gateway.store

    @app.exception_handler(EpisodeError)
    async def episode_error(_: Request, exc: EpisodeError) -> JSONResponse:
        kind = "invalid_request_error" if exc.status < 500 else "server_error"
        code = "context_length_exceeded" if "context limit" in exc.message else None
        return JSONResponse(error_body(exc.message, kind, code), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for error in exc.errors():
            if error["type"] == "json_invalid":
                return JSONResponse(
                    error_body(f"the request body is not valid JSON ({error.get('msg', '')})", "invalid_request_error"),
                    status_code=400,
                )
            where = ".".join(str(part) for part in error["loc"] if part != "body") or "body"
            problems.append(f"{where}: {error['msg']}")
        return JSONResponse(error_body("invalid request: " + "; ".join(problems), "invalid_request_error"),
                            status_code=400)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": gateway.model_name, "object": "model", "created": 0,
                                            "owned_by": "forge"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        episode_id = gateway.resolve_episode(request, body.user)
        prompt_ids = gateway.chat_prompt_ids(body.messages, body.tools)
        call = await gateway.generate(request, episode_id, prompt_ids, body.max_completion_tokens or body.max_tokens)
        model = body.model or gateway.model_name
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_chat_stream(gateway, call, bool(body.tools), model, include_usage),
                                     media_type="text/event-stream")
        text = gateway.tokenizer.decode(call.completion_ids, skip_special_tokens=True)
        logprobs = _token_logprobs(gateway.tokenizer, call) if body.logprobs else None
        return _chat_response(call, text, bool(body.tools), model, episode_id, logprobs)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        if body.stream:
            raise EpisodeError(400, "streaming is supported on /v1/chat/completions only; set stream=false")
        episode_id = gateway.resolve_episode(request, body.user)
        call = await gateway.generate(request, episode_id, gateway.encode(body.prompt), body.max_tokens)
        text = gateway.tokenizer.decode(call.completion_ids, skip_special_tokens=True)
        return {
            "id": completion_id("cmpl"), "object": "text_completion", "created": now(),
            "model": body.model or gateway.model_name,
            "choices": [{"index": 0, "text": text, "finish_reason": finish_reason(call.finished, []),
                         "logprobs": None}],
            "usage": _usage(call),
            "forge": {"episode_id": episode_id, "policy_version": call.policy_version},
        }

    @app.post("/forge/episodes")
    async def start_episode(body: StartEpisodeRequest) -> dict:
        task = body.task
        if task is None:
            if gateway.next_task is None:
                raise EpisodeError(400, "this gateway has no task source; send the task in the body")
            task = gateway.next_task()
        return gateway.episode_view(await gateway.start_episode(task, body.group_id))

    @app.get("/forge/episodes/{episode_id}")
    async def get_episode(episode_id: str) -> dict:
        return gateway.episode_view(episode_id)

    @app.post("/forge/episodes/{episode_id}/step")
    async def step_episode(episode_id: str, body: StepRequest) -> dict:
        result = await store.step(episode_id, body.action)
        return {"observation": result.observation, "reward": result.reward, "done": result.done,
                "info": json.loads(json.dumps(result.info, default=str))}

    @app.post("/forge/episodes/{episode_id}/finish")
    async def finish_episode(episode_id: str, body: FinishRequest) -> dict:
        await gateway.finish_episode(episode_id, body.reward, body.answer)
        return gateway.episode_view(episode_id)

    return app


class GatewayServer:
    """Runs the app with uvicorn on its own thread and event loop, so a training loop (or a
    test) can go on in the calling thread. `port=0` picks a free port."""

    def __init__(self, gateway: Gateway, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.gateway = gateway
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))
        except OSError as exc:
            self.socket.close()
            raise RuntimeError(f"gateway cannot listen on {host}:{port} ({exc}); set gateway.port=0 for a free port") from None
        self.host, self.port = self.socket.getsockname()[:2]
        config = uvicorn.Config(build_app(gateway), log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._serve, name="forge-gateway", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.serve(sockets=[self.socket]))

    def start(self, timeout_s: float = 30.0) -> GatewayServer:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not start on {self.host}:{self.port}")
            time.sleep(0.01)
        return self

    def call(self, coroutine: Any, timeout_s: float | None = None) -> Any:
        """Run `coroutine` (e.g. an `EpisodeStore` method) on the server's loop and wait."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout=10)
        self.socket.close()

    def __enter__(self) -> GatewayServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
