"""The HTTP server: OpenAI-compatible `/v1` endpoints served by the rollout engine, and
the `/forge/episodes` API that starts and finishes episodes.

A request belongs to an episode named by, in this order, the `X-Forge-Episode` header,
the API key (`Authorization: Bearer <episode id>`, i.e. `OpenAI(api_key=episode_id)`),
or the body's `user` field; the first that names a known episode wins.

    GET  /v1/models, /v1/models/{id}      the policy's model
    POST /v1/chat/completions            messages (+ tools; stream) -> reply, tool_calls parsed
    POST /v1/completions                 raw prompt(s) -> text
    POST /v1/responses                   the Responses API (text and function tools)
    POST /forge/episodes                 {"task"?, "group_id"?} -> id, task, first observation, tools
    GET  /forge/episodes/{id}            the same view, plus status, outcome and call count
    POST /forge/episodes/{id}/step       {"action"} -> the env's observation, reward, done
    POST /forge/episodes/{id}/finish     {"reward"?} or {"answer"?} (the env verifies) or {}

Every call is recorded once generation ends and before the last of its reply is sent, so
a client that goes away after that loses nothing; a reply whose client disconnected
before it was finished is dropped (the agent never saw it whole), stopped in the engine
at its next decode step, and counted in the episode's `calls_dropped`. A call still generating when its episode finishes is waited for
(up to the step limit, then stopped and dropped) before the episode is recorded or taken
for training (`EpisodeStore._drain`). Any error, on any route, is OpenAI's error object.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from forge.env.tools import template_renders_tools
from forge.gateway.calls import CallRun, CallSpec, Choice, TokenEvent
from forge.gateway.chat import chat_response, chat_spec, chat_stream, check_tool_results
from forge.gateway.completions import completion_specs, completions_response, completions_stream
from forge.gateway.decoding import hidden_token_ids
from forge.gateway.episodes import EPISODE_ID, SHUTDOWN_GRACE_S, EpisodeError, EpisodeStore
from forge.gateway.legacy import translate_functions
from forge.gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    FinishRequest,
    SamplingFields,
    StartEpisodeRequest,
    StepRequest,
    error_body,
    template_messages,
)
from forge.gateway.responses import mount_responses
from forge.gateway.tool_parsers import HermesParser, ToolParser, choose_tool_parser
from forge.rollout.chat import system_in_first_user, template_takes_system
from forge.rollout.engines.batching import BatchingEngine
from forge.rollout.engines.protocol import InferenceEngine

SAMPLING_RULES = ("honour", "override")
LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # a str holds a valid pair as one code point


class Gateway:
    """What the endpoints need: an engine, the tokenizer whose chat template renders
    prompts, the episode store, the token limits and the sampling rule.

    `sampling="honour"` samples each request with its own temperature and top_p (the
    behaviour logprobs recorded are those of that distribution); `"override"` samples
    with the engine's (the run's) settings and says so in an `X-Forge-Sampling` header
    whenever a request asked for others. `seed` is honoured either way."""

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
        tool_parser: str = "auto",
        sampling: str = "honour",
        batch_wait_s: float = 0.01,
        router: Any | None = None,
    ) -> None:
        if sampling not in SAMPLING_RULES:
            raise ValueError(f"gateway.sampling={sampling!r}: use honour or override")
        self.engine = engine
        # A batch waits `batch_wait_s` for the other live episodes' calls to join it, and runs
        # off the server's event loop, which must keep answering HTTP (and streaming) meanwhile.
        # With engine servers (`router`, a `forge.rollout.engines.router.Router` whose clients
        # sample with the run's settings, `engine` then giving those settings), the router
        # batches the calls and sends them over HTTP from this loop.
        self.batching = (
            router if router is not None else BatchingEngine(engine, max_wait_s=batch_wait_s, offload=True)
        )
        self.tokenizer = tokenizer
        self.store = store
        self.max_new_tokens = max_new_tokens
        self.max_context_tokens = max_context_tokens
        self.model_name = model_name
        self.next_task = next_task  # () -> task row, for POST /forge/episodes without a task
        self.tools = tools
        self.system_prompt = system_prompt
        self.sampling = sampling
        self.tool_aware = template_renders_tools(tokenizer)
        self.takes_system = template_takes_system(tokenizer)
        self.tool_parser = choose_tool_parser(tokenizer, tool_parser)
        self.hidden_ids = hidden_token_ids(tokenizer, self.tool_parser.markers)
        self.engine_names: dict[str, set[str]] = {}  # episode -> the names its calls' KV is kept under
        # episode -> response id -> its conversation items, for previous_response_id (until it ends)
        self.kept_responses: dict[str, dict[str, list[dict[str, Any]]]] = {}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        # A lone surrogate (JSON may escape one: text read with surrogateescape, half a UTF-16
        # pair) has no UTF-8 form for the tokenizer; it stands for bytes that were not text,
        # which Forge reads as U+FFFD everywhere.
        text = LONE_SURROGATE.sub("\ufffd", text)
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def parser_for_tools(self) -> ToolParser:
        """A template that ignores `tools=` is given them, and reads its calls, in Hermes text."""
        return self.tool_parser if self.tool_aware else HermesParser()

    def chat_prompt_text(
        self, messages: list[dict], tools: list[dict] | None, template_kwargs: dict[str, Any] | None = None
    ) -> str:
        """The prompt as the chat template renders it; `template_kwargs` are the request's
        `chat_template_kwargs` (e.g. Qwen3's enable_thinking), handed to the template."""
        try:
            rendered = template_messages(messages, tools, self.tool_aware)
            if not self.takes_system:  # as a rollout renders an env's system prompt
                rendered = system_in_first_user(rendered)
            return self.tokenizer.apply_chat_template(
                rendered,
                tools=tools if self.tool_aware else None,
                add_generation_prompt=True,
                tokenize=False,
                **(template_kwargs or {}),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise EpisodeError(400, f"messages could not be rendered: {exc}") from None
        except Exception as exc:  # jinja2 errors raised by the template itself
            raise EpisodeError(400, f"the chat template rejected these messages: {exc}") from None

    def token_limit(self, prompt_tokens: int, asked: int | None, field: str = "max_tokens") -> int:
        """Tokens a call may generate: what it asked for, up to the context limit (beyond is an
        error); unasked, `max_new_tokens` or what room is left."""
        room = self.max_context_tokens - prompt_tokens
        if room < 1 or (asked is not None and asked > room):
            # OpenAI's (and vLLM's) wording: LiteLLM and LangChain tell a context overflow from
            # other bad requests by these phrases, not by the error's code.
            wanted = f" with {asked} more asked for" if asked is not None else ""
            raise EpisodeError(
                400,
                f"This model's maximum context length is {self.max_context_tokens} tokens "
                f"(rollout.max_context_tokens): the prompt is too long at {prompt_tokens} tokens{wanted}; "
                "shorten the conversation" + (f" or ask for at most {field}={room}" if room >= 1 else ""),
                code="context_length_exceeded",
            )
        return asked if asked is not None else min(self.max_new_tokens, room)

    def apply_sampling(self, body: SamplingFields, spec: CallSpec) -> dict[str, str]:
        """Put the request's sampling into `spec` by the gateway's rule; the headers that say
        what was overridden."""
        problem = body.unsupported()
        if problem:
            raise EpisodeError(400, problem)
        if self.sampling == "honour":
            spec.temperature, spec.top_p = body.temperature, body.top_p
            return {}
        run = {name: _engine_setting(self.engine, name) for name in ("temperature", "top_p")}
        changed = [
            f"{name}={getattr(body, name)}->{value}"
            for name, value in run.items()
            if getattr(body, name) is not None and getattr(body, name) != value
        ]
        return (
            {"X-Forge-Sampling": "overridden " + ", ".join(changed) + " (gateway.sampling=override)"}
            if changed
            else {}
        )

    def resolve_episode(self, request: Request, user: str | None) -> str:
        header = request.headers.get("x-forge-episode")
        if header:
            return self.store.get(header).episode_id
        auth = request.headers.get("authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        for candidate in (key, user):
            if candidate and candidate in self.store.episodes:
                return candidate
        # An API key that is no episode id may be a real secret the agent holds: only its start is said.
        said = (
            []
            if not key
            else [f"api key={key!r}" if EPISODE_ID.fullmatch(key) else f"api key {key[:4]!r}..."]
        )
        said += [f"user={user!r}"] if user else []
        tried = ", ".join(said)
        raise EpisodeError(
            404,
            f"unknown episode ({tried or 'none given'}): start one with POST /forge/episodes and send "
            "its episode_id as the API key, the X-Forge-Episode header or the `user` field",
        )

    def start_call(self, episode_id: str, spec: CallSpec, stream: bool) -> CallRun:
        return CallRun(self, episode_id, spec, stream)

    async def finish_call(self, request: Request | None, run: CallRun) -> list[Choice]:
        """Wait for the call's choices and record them, unless its client went away or the
        gateway stopped it (its episode finished meanwhile and it ran past the step limit).
        A client that leaves while it generates (an agent killed mid-call) stops it."""
        watcher = asyncio.ensure_future(_stop_when_gone(request, run)) if request is not None else None
        try:
            choices = await run.task
            gone = run.aborted or (request is not None and await request.is_disconnected())
        except asyncio.CancelledError:  # the server is stopping: the reply is never sent
            self.store.end_call(run.episode, run.pending, [], dropped=True)
            raise
        except BaseException:
            if not run.aborted:  # generation failed: no sample, and not a dropped reply
                self.store.end_call(run.episode, run.pending, [])
                raise
            # Given up, and the engine server ended it without a reply (a vLLM or SGLang
            # call is stopped by closing its connection): dropped, as a reply cut would be.
            choices, gone = [], True
        finally:
            if watcher is not None:
                watcher.cancel()
        if gone:
            # The agent never saw this reply, so it did not shape the episode: not a sample.
            self.store.end_call(run.episode, run.pending, [], dropped=True)
            if run.abort_reason is not None:
                raise EpisodeError(409, run.abort_reason)
            raise EpisodeError(499, "the client disconnected before the reply was sent")
        self.store.end_call(run.episode, run.pending, [choice.record for choice in choices])
        return choices

    async def _drop(self, run: CallRun) -> None:
        try:
            await run.task
        except Exception:
            pass
        self.store.end_call(run.episode, run.pending, [], dropped=True)

    def stream_events(self, run: CallRun, render: Callable[[TokenEvent], str | None]) -> StreamedCall:
        return StreamedCall(self, run, render)

    async def start_episode(self, task: dict[str, Any], group_id: str | None = None) -> str:
        for episode_id in self.store.over_capacity():
            await self.abandon_episode(
                episode_id,
                "truncated",
                f"ended to make room: more than "
                f"{self.store.max_live} live episodes, this one used least recently",
            )
        try:
            episode = await self.store.start(task, group_id)
        except EpisodeError:  # the env could not be built or reset: the store says so itself
            raise
        except Exception as exc:
            raise EpisodeError(
                400, f"the env could not start this task: {type(exc).__name__}: {exc}"
            ) from None
        self.batching.register()  # batches wait briefly for the other live episodes' calls
        return episode.episode_id

    def _ended(self, episode_id: str) -> None:
        """An episode is over: its batch slot, its cached KV and its kept responses go."""
        self.batching.unregister()
        self.kept_responses.pop(episode_id, None)
        for name in self.engine_names.pop(episode_id, ()):
            self.batching.release(name)

    async def finish_episode(
        self, episode_id: str, reward: float | None = None, answer: str | None = None
    ) -> None:
        episode = self.store.live(episode_id)
        try:
            await self.store.finish(episode_id, reward, answer)
        finally:
            if episode.finished:  # also when the env's verifier raised and ended it as an error
                self._ended(episode_id)

    async def abandon_episode(self, episode_id: str, status: str, error: str) -> None:
        if not self.store.get(episode_id).finished:
            self.store.abandon(episode_id, status, error)  # type: ignore[arg-type]
            self._ended(episode_id)

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


# How often a non-streamed call's connection is looked at while it generates.
DISCONNECT_POLL_S = 0.1


async def _stop_when_gone(request: Request, run: CallRun) -> None:
    """Abort `run` (its rows leave the engine's batch at the next decode step) once its client
    has disconnected: no one is left to read the reply."""
    while not run.task.done():
        if await request.is_disconnected():
            run.abort()
            return
        await asyncio.sleep(DISCONNECT_POLL_S)


def _engine_setting(engine: Any, name: str) -> Any:
    """An engine's sampling setting, looked up through wrappers (a served engine's `.engine`)."""
    while engine is not None and not hasattr(engine, name):
        engine = getattr(engine, "engine", None)
    return getattr(engine, name, None)


class StreamedCall:
    """A call's token events rendered as they come; once they end, the call is recorded
    and `result` holds its choices. A client that leaves early aborts the call."""

    def __init__(self, gateway: Gateway, run: CallRun, render: Callable[[TokenEvent], str | None]) -> None:
        self.gateway, self.run, self.render = gateway, run, render
        self.result: list[Choice] = []

    async def __aiter__(self) -> AsyncIterator[str]:
        run, outcome = self.run, "left"  # until the call is recorded or fails, the client may leave
        try:
            while True:
                getter = asyncio.ensure_future(run.events.get())
                await asyncio.wait({getter, run.task}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    break
                piece = self.render(getter.result())
                if piece:
                    yield piece
            while not run.events.empty():  # tokens that came in with the end of generation
                piece = self.render(run.events.get_nowait())
                if piece:
                    yield piece
            try:
                self.result = await self.gateway.finish_call(None, run)
            except EpisodeError:
                outcome = "failed"
                raise
            outcome = "recorded"
        finally:
            if outcome == "left" and not run.aborted:
                run.abort()  # generation stops at its next token; the call is not a sample
                asyncio.ensure_future(self.gateway._drop(run))


def _sse_errors(stream: AsyncIterator[str]) -> AsyncIterator[str]:
    """A stream whose call fails after the headers went out ends with an OpenAI error event."""

    async def guarded() -> AsyncIterator[str]:
        try:
            async for piece in stream:
                yield piece
        except EpisodeError as exc:
            kind = "invalid_request_error" if exc.status < 500 else "server_error"
            yield f"data: {json.dumps(error_body(exc.message, kind, exc.code, exc.param))}\n\n"

    return guarded()


def _error_kind(status: int) -> tuple[str, str | None]:
    kinds = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "invalid_request_error",
        405: "invalid_request_error",
        409: "invalid_request_error",
        422: "invalid_request_error",
        429: "rate_limit_error",
    }
    codes = {404: "not_found", 405: "method_not_allowed"}
    return kinds.get(status, "server_error" if status >= 500 else "invalid_request_error"), codes.get(status)


def build_app(gateway: Gateway) -> FastAPI:
    """The gateway's FastAPI app: the OpenAI routes and the episode API over `gateway`
    (mount it, or serve it with `GatewayServer`)."""
    app = FastAPI(title="Forge gateway", docs_url=None, redoc_url=None, openapi_url=None)
    store = gateway.store

    @app.exception_handler(EpisodeError)
    async def episode_error(_: Request, exc: EpisodeError) -> JSONResponse:
        kind, _code = _error_kind(exc.status)
        # OpenAI's SDKs retry a 409 (as a lock timeout) unless told not to; the gateway's 409s
        # (a finished episode, a call given up on) cannot succeed on a retry.
        headers = {"x-should-retry": "false"} if exc.status == 409 else None
        return JSONResponse(
            error_body(exc.message, kind, exc.code, exc.param), status_code=exc.status, headers=headers
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind, code = _error_kind(exc.status_code)
        message = str(exc.detail)
        if exc.status_code == 404:
            message = (
                f"unknown route {request.method} {request.url.path}: see /v1/models, /v1/chat/completions, "
                "/v1/completions, /v1/responses and /forge/episodes"
            )
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return JSONResponse(
            error_body(message, kind, code),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def server_error(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(
            error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"), status_code=500
        )

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for error in exc.errors():
            if error["type"] == "json_invalid":
                return JSONResponse(
                    error_body(
                        f"the request body is not valid JSON ({error.get('msg', '')})",
                        "invalid_request_error",
                    ),
                    status_code=400,
                )
            where = ".".join(str(part) for part in error["loc"] if part != "body") or "body"
            problems.append(f"{where}: {error['msg']}")
        return JSONResponse(
            error_body("invalid request: " + "; ".join(problems), "invalid_request_error"), status_code=400
        )

    def model_card() -> dict[str, Any]:
        return {"id": gateway.model_name, "object": "model", "created": 0, "owned_by": "forge"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        if model_id != gateway.model_name:
            raise EpisodeError(
                404, f"model {model_id!r} does not exist here; this gateway serves {gateway.model_name!r}"
            )
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        episode_id = gateway.resolve_episode(request, body.user)
        # Before the legacy history becomes tool turns: the deprecated form pairs a function_call
        # with its result by position, and translate_functions checks those.
        check_tool_results(body.messages)
        legacy = translate_functions(body)  # the deprecated functions / function_call, as tools
        spec, parser = chat_spec(gateway, body)
        headers = gateway.apply_sampling(body, spec)
        run = gateway.start_call(episode_id, spec, body.stream)
        if body.stream:
            return StreamingResponse(
                _sse_errors(chat_stream(gateway, body, run, parser, legacy)),
                media_type="text/event-stream",
                headers=headers,
            )
        choices = await gateway.finish_call(request, run)
        return JSONResponse(
            chat_response(gateway, body, spec, parser, choices, episode_id, legacy), headers=headers
        )

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        episode_id = gateway.resolve_episode(request, body.user)
        specs = completion_specs(gateway, body)
        headers = {}
        for spec in specs:
            headers = gateway.apply_sampling(body, spec)
        if body.stream and body.logprobs is not None:  # refused before any generation starts
            raise EpisodeError(400, "a streamed completion does not take logprobs; ask without stream")
        runs = [gateway.start_call(episode_id, spec, body.stream) for spec in specs]
        if body.stream:
            return StreamingResponse(
                _sse_errors(completions_stream(gateway, body, runs)),
                media_type="text/event-stream",
                headers=headers,
            )
        results = [await gateway.finish_call(request, run) for run in runs]
        return JSONResponse(completions_response(gateway, body, specs, results, episode_id), headers=headers)

    mount_responses(app, gateway)

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
        return {
            "observation": result.observation,
            "reward": result.reward,
            "done": result.done,
            "info": json.loads(json.dumps(result.info, default=str)),
        }

    @app.post("/forge/episodes/{episode_id}/finish")
    async def finish_episode(episode_id: str, body: FinishRequest) -> dict:
        await gateway.finish_episode(episode_id, body.reward, body.answer)
        return gateway.episode_view(episode_id)

    return app


class ThreadedServer:
    """Runs an ASGI app with uvicorn on its own thread and event loop, so a training loop (or a
    test) can go on in the calling thread. `port=0` picks a free port. `what` names the server
    in errors and `fix` says what to change when the port is taken. `store`: the episode store
    whose `shutdown` runs on the server's loop once it stops serving (live episodes ended, the
    envs' closes waited for, each ended episode recorded once)."""

    def __init__(
        self,
        app: Any,
        host: str,
        port: int,
        what: str,
        fix: str,
        store: EpisodeStore | None = None,
        **uvicorn_options: Any,
    ) -> None:
        import uvicorn

        self.what = what
        self.store = store
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))
        except OSError as exc:
            self.socket.close()
            raise RuntimeError(f"{what} cannot listen on {host}:{port} ({exc}); {fix}") from None
        self.host, self.port = self.socket.getsockname()[:2]
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
            **uvicorn_options,
        )
        self.server = uvicorn.Server(config)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._serve, name=what.replace(" ", "-"), daemon=True)

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.serve(sockets=[self.socket]))
        finally:
            if self.store is not None:  # bounded: each close gives up at the step limit
                self.loop.run_until_complete(self.store.shutdown())

    def drain_limit_s(self) -> float:
        """How long stopping may take past uvicorn's own graceful shutdown: the store's."""
        return self.store.step_timeout_s + SHUTDOWN_GRACE_S if self.store is not None else 0.0

    def start(self, timeout_s: float = 30.0) -> Any:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{self.what} did not start on {self.host}:{self.port}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout=10 + self.drain_limit_s())
        self.socket.close()

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class GatewayServer(ThreadedServer):
    """The gateway's app served on its own thread (see `ThreadedServer`)."""

    def __init__(self, gateway: Gateway, host: str = "127.0.0.1", port: int = 0) -> None:
        self.gateway = gateway
        super().__init__(
            build_app(gateway),
            host,
            port,
            "the gateway",
            "set gateway.port=0 for a free port",
            store=gateway.store,
        )

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def call(self, coroutine: Any, timeout_s: float | None = None) -> Any:
        """Run `coroutine` (e.g. an `EpisodeStore` method) on the server's loop and wait."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)
