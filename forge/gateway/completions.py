"""`/v1/completions`: raw prompts (a string, a list of strings, token ids, or lists of
them), each sampled n times, as a legacy text completion or its stream."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from forge.gateway.calls import CallRun, CallSpec, Choice
from forge.gateway.decoding import token_bytes
from forge.gateway.episodes import EpisodeError
from forge.gateway.protocol import CompletionRequest, completion_id, finish_reason, now


def prompt_token_lists(gateway: Any, prompt: Any, special: bool = True) -> list[list[int]]:
    """The prompts' token ids. Text is encoded with the tokenizer's special tokens (a BOS)
    when `special` (the request's add_special_tokens, true unless set: vLLM's default, so a
    policy trained here sees what it is served); token ids are taken as they are."""
    if isinstance(prompt, str):
        return [gateway.encode(prompt, special)]
    if not prompt:
        raise EpisodeError(400, "prompt is empty: give a string, a list of strings or token ids")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if all(isinstance(p, str) for p in prompt):
        return [gateway.encode(p, special) for p in prompt]
    if all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in prompt):
        return [list(p) for p in prompt]
    raise EpisodeError(
        400, "prompt must be a string, a list of strings, a list of token ids or a list of those"
    )


def completion_specs(gateway: Any, body: CompletionRequest) -> list[CallSpec]:
    if body.suffix:
        raise EpisodeError(400, "suffix is not supported by the Forge gateway; leave it unset")
    if body.echo and body.logprobs is not None:
        raise EpisodeError(
            400, "echo with logprobs is not supported (prompt tokens have no behaviour logprobs)"
        )
    vocab = len(gateway.tokenizer)
    specs = []
    for number, ids in enumerate(prompt_token_lists(gateway, body.prompt, body.add_special_tokens)):
        if not ids:  # the engine has nothing to go on from (a model without a BOS token adds none)
            where = "prompt" if isinstance(body.prompt, str) else f"prompt[{number}]"
            raise EpisodeError(400, f"{where} is empty (0 tokens): give at least one token of prompt")
        if any(not 0 <= t < vocab for t in ids):
            raise EpisodeError(400, f"prompt token ids must be in [0, {vocab})")
        specs.append(
            CallSpec(
                ids,
                gateway.token_limit(len(ids), body.max_tokens),
                n=body.n,
                seed=body.seed,
                top_logprobs=body.logprobs or 0,
                stop=body.stop or [],
            )
        )
    return specs


def _legacy_logprobs(gateway: Any, choice: Choice) -> dict[str, Any]:
    tokenizer = gateway.tokenizer
    tokens = [
        token_bytes(tokenizer, t).decode("utf-8", errors="replace") for t in choice.record.completion_ids
    ]
    offsets, at = [], 0
    for token in tokens:
        offsets.append(at)
        at += len(token)
    tops = None
    if choice.top_logprobs is not None:
        tops = [
            {token_bytes(tokenizer, t).decode("utf-8", errors="replace"): v for t, v in step}
            for step in choice.top_logprobs
        ]
    return {
        "tokens": tokens,
        "token_logprobs": list(choice.record.logprobs),
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def echoed(gateway: Any, body: CompletionRequest, number: int, prompt_ids: list[int]) -> str:
    """What `echo` puts before prompt `number`'s completions: its text as sent (without the
    special tokens encoding added), or its token ids decoded."""
    if not body.echo:
        return ""
    if isinstance(body.prompt, str):
        return body.prompt
    if isinstance(body.prompt[number], str):
        return body.prompt[number]
    return gateway.tokenizer.decode(prompt_ids, skip_special_tokens=False)


def completions_response(
    gateway: Any, body: CompletionRequest, specs: list[CallSpec], runs: list[list[Choice]], episode_id: str
) -> dict[str, Any]:
    out, prompt_tokens, completion_tokens = [], 0, 0
    for number, (spec, choices) in enumerate(zip(specs, runs, strict=True)):
        prompt_tokens += len(spec.prompt_ids)
        for choice in choices:
            completion_tokens += len(choice.record.completion_ids)
            out.append(
                {
                    "index": number * body.n + choice.index,
                    "text": echoed(gateway, body, number, spec.prompt_ids) + choice.text,
                    "finish_reason": finish_reason(choice.record.finished, []),
                    "logprobs": _legacy_logprobs(gateway, choice) if body.logprobs is not None else None,
                }
            )
    return {
        "id": completion_id("cmpl"),
        "object": "text_completion",
        "created": now(),
        "model": body.model or gateway.model_name,
        "choices": out,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
        "forge": {"episode_id": episode_id, "policy_version": runs[0][0].record.policy_version},
    }


async def completions_stream(
    gateway: Any, body: CompletionRequest, runs: list[CallRun]
) -> AsyncIterator[str]:
    """Text chunks as tokens are sampled, prompt after prompt; then each choice's finish, and
    the usage when `stream_options.include_usage` asks."""
    ident, created, model = completion_id("cmpl"), now(), body.model or gateway.model_name
    prompt_tokens = completion_tokens = 0

    def chunk(index: int, text: str, reason: str | None = None) -> str:
        data = {
            "id": ident,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"index": index, "text": text, "finish_reason": reason, "logprobs": None}],
        }
        return f"data: {json.dumps(data)}\n\n"

    for number, run in enumerate(runs):
        if body.echo:  # each choice's text starts with its prompt, as without stream
            prompt = echoed(gateway, body, number, run.spec.prompt_ids)
            for index in range(body.n):
                yield chunk(number * body.n + index, prompt)
        streamed = gateway.stream_events(
            run,
            lambda event, number=number: (
                chunk(number * body.n + event.index, event.text) if event.text else None
            ),
        )
        async for piece in streamed:
            yield piece
        for choice in streamed.result:
            rest = choice.text[run.texts[choice.index].sent :]
            index = number * body.n + choice.index
            if rest:
                yield chunk(index, rest)
            yield chunk(index, "", finish_reason(choice.record.finished, []))
        prompt_tokens += len(run.spec.prompt_ids)
        completion_tokens += sum(len(choice.record.completion_ids) for choice in streamed.result)
    if (body.stream_options or {}).get("include_usage"):
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        data = {
            "id": ident,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [],
            "usage": usage,
        }
        yield f"data: {json.dumps(data)}\n\n"
    yield "data: [DONE]\n\n"
