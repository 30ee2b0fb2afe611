"""`forge sft CONFIG`: supervised warm start on chat transcripts through the RL trainer:
each transcript is one sample whose assistant tokens carry the loss (advantage 1 under
the `pg` loss is their negative log-likelihood); tree packing, LoRA, metrics as in RL."""

from __future__ import annotations

import inspect
import json
import random
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from forge.config import Config, ConfigError
from forge.types import NO_VERSION, Sample


def _encode(
    tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool, tools: list[dict] | None = None
) -> list[int]:
    text = tokenizer.apply_chat_template(
        messages, tools=tools, add_generation_prompt=generation_prompt, tokenize=False
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


_PROBE_CALL = "forge_probe_call_5c1e"


def template_renders_tool_calls(tokenizer: Any) -> bool:
    """Whether `tokenizer`'s chat template writes an assistant message's `tool_calls` (one
    that does not, or refuses them, renders such a message as its text alone)."""
    call = {"id": "forgeprob", "type": "function", "function": {"name": _PROBE_CALL, "arguments": {}}}
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    try:
        return _PROBE_CALL in tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that refuses tool_calls does not render them
        return False


def _call_arguments(call: dict[str, Any]) -> dict[str, Any]:
    """A tool call's arguments as a dict: OpenAI's messages give them as JSON text, which
    templates (and the env's parser) take as an object."""
    function = call["function"]
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"tool call {function.get('name')!r} has arguments that are not JSON ({exc.msg}): {arguments[:200]}"
            ) from None
    if not isinstance(arguments, dict):
        raise ValueError(f"tool call {function.get('name')!r} has arguments that are not a JSON object")
    return arguments


def as_rollout_renders(messages: list[dict[str, Any]], renders_tool_calls: bool) -> list[dict[str, Any]]:
    """`messages` with their tool calls in the form a rollout shows the model. Arguments
    given as JSON text become objects. For a template that does not write `tool_calls`, each
    call becomes Hermes text in its assistant message (`<tool_call>{"name", "arguments"}
    </tool_call>`, what a `ToolEnv` parses from a reply) and each run of tool results one user
    message of `<tool_response>` blocks (what `ToolEnv.format_responses` answers), as a
    rollout renders every observation: else such a template renders a call as an empty turn,
    and the warm start teaches the model to reply with nothing."""
    out: list[dict[str, Any]] = []
    responses: list[str] = []  # the tool results since the last other message
    for message in messages:
        if message.get("role") == "tool" and not renders_tool_calls:
            responses.append(f"<tool_response>\n{message.get('content') or ''}\n</tool_response>")
            continue
        if responses:
            out.append({"role": "user", "content": "\n".join(responses)})
            responses = []
        calls = message.get("tool_calls") or []
        if message.get("role") != "assistant" or not calls:
            out.append(message)
            continue
        functions = [{**call["function"], "arguments": _call_arguments(call)} for call in calls]
        if renders_tool_calls:
            out.append(
                {
                    **message,
                    "tool_calls": [{**c, "function": f} for c, f in zip(calls, functions, strict=True)],
                }
            )
            continue
        text = [message.get("content") or ""]
        text += [
            f"<tool_call>{json.dumps({'name': f['name'], 'arguments': f['arguments']})}</tool_call>"
            for f in functions
        ]
        out.append({"role": "assistant", "content": "\n".join(part for part in text if part)})
    if responses:
        out.append({"role": "user", "content": "\n".join(responses)})
    return out


def transcript_sample(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    system_in_user: bool | None = None,
    renders_tool_calls: bool | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> Sample:
    """One transcript as a training sample: the tokens of each assistant message (its
    text and end of turn) have loss mask 1, every other token 0. The transcript is
    rendered through the model's chat template one message at a time, so the assistant
    spans are exactly the tokens the template adds for them. A template that takes no system
    message (`system_in_user`, found from the tokenizer when None) gets a leading one in the
    first user message, as a rollout renders an env's system prompt; one that does not write
    tool calls (`renders_tool_calls`, found when None) gets them as a rollout shows them
    (`as_rollout_renders`). `tools` (the function schemas a row of OpenAI's fine-tuning
    format lists) are shown as a rollout shows an env's: through the template's `tools=`, or
    for a template that drops them as Hermes text after the system message."""
    from forge.env.tools import hermes_tools_prompt, template_renders_tools
    from forge.rollout.chat import ChatFormat, system_in_first_user

    if system_in_user is None:
        system_in_user = ChatFormat(tokenizer).system_in_user
    if renders_tool_calls is None:
        renders_tool_calls = template_renders_tool_calls(tokenizer)
    messages = as_rollout_renders(messages, renders_tool_calls)
    if tools and not template_renders_tools(tokenizer):  # as ChatFormat.prompt_ids shows an env's tools
        listing = hermes_tools_prompt(tools)
        if messages and messages[0].get("role") == "system":
            messages = [{**messages[0], "content": f"{messages[0]['content']}\n\n{listing}"}, *messages[1:]]
        else:
            messages = [{"role": "system", "content": listing}, *messages]
        tools = None
    if system_in_user:
        messages = system_in_first_user(messages)
    ids: list[int] = []
    mask: list[int] = []
    for index, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = _encode(tokenizer, messages[:index], generation_prompt=True, tools=tools)
        after = _encode(tokenizer, messages[: index + 1], generation_prompt=False, tools=tools)
        if after[: len(before)] != before or before[: len(ids)] != ids:
            raise ValueError(
                "the chat template does not render a conversation as a prefix of its continuation; "
                "forge sft cannot tell the assistant's tokens apart"
            )
        mask += [0] * (len(before) - len(ids)) + [1] * (len(after) - len(before))
        ids = after
    if not any(mask):
        raise ValueError("a transcript has no assistant message to learn from")
    return Sample(ids, mask, [0.0] * len(ids), [NO_VERSION] * len(ids), advantage=1.0)


ROLES = {"system", "developer", "user", "assistant", "tool"}  # OpenAI's chat roles
# The loss's comparisons of the trained policy with the one that sampled the tokens. A transcript
# was sampled by none (its behaviour logprobs are placeholders, 0), so these would read as a
# policy far off its samples (mismatch_kl ~10 at the first step): not written.
BEHAVIOUR_METRICS = ("mismatch_kl", "importance_ratio_mean")


def transcript_problem(messages: Any) -> str | None:
    """What keeps `messages` from being a transcript to learn from, or None: a list of
    {role, content} dicts with OpenAI's roles and text content (an assistant's may be empty
    only when it carries tool_calls), at least one of them the assistant's."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return f"needs a 'messages' list of {{role, content}} dicts, not {type(messages).__name__}"
    for index, message in enumerate(messages):
        role = message.get("role")
        if not isinstance(role, str):
            return f"message {index} has no 'role' string"
        if role not in ROLES:
            return (
                f"message {index} has role {role!r}; roles are {', '.join(sorted(ROLES))} "
                "(ShareGPT's human and gpt are user and assistant)"
            )
        content = message.get("content")
        if not isinstance(content, str) and not (content is None and message.get("tool_calls")):
            return f"message {index} ({role}) has 'content' {type(content).__name__}, not text"
        problem = _tool_calls_problem(message.get("tool_calls") or [])
        if role == "assistant" and problem:
            return f"message {index} (assistant) {problem}"
        if role == "assistant" and not message.get("tool_calls") and not content.strip():
            return f"message {index} (assistant) is empty: nothing to learn but the end of a turn"
    if not any(m["role"] == "assistant" for m in messages):
        return "has no assistant message to learn from (the loss is on assistant tokens only)"
    return None


def _tool_calls_problem(calls: Any) -> str | None:
    """What is wrong with an assistant message's OpenAI-style `tool_calls`, or None."""
    if not isinstance(calls, list):
        return f"has 'tool_calls' {type(calls).__name__}, not a list"
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            return 'has a tool call that is not {"type": "function", "function": {"name": ..., "arguments": ...}}'
        try:
            _call_arguments(call)
        except ValueError as exc:
            return f"has a {exc}"
    return None


Transcript = tuple[list[dict[str, Any]], "list[dict[str, Any]] | None"]  # messages, tools


def _tools_problem(tools: Any) -> str | None:
    """What keeps a row's `tools` from being a list of OpenAI function schemas, or None."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        return f"has 'tools' {type(tools).__name__}, not a list of function schemas"
    for schema in tools:
        function = schema.get("function") if isinstance(schema, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            return 'has a tool that is not {"type": "function", "function": {"name": ..., "parameters": ...}}'
    return None


def read_transcripts(path: str | Path) -> list[Transcript]:
    """The transcripts of a jsonl file, one a line: its `messages`, and the function schemas
    its `tools` lists (OpenAI's fine-tuning format), or None."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(
            f"sft.data {path}: cannot read it ({exc.strerror or exc}); --data names a jsonl file"
        ) from None
    transcripts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"sft.data {path}: line {number} is not JSON ({exc})") from None
        messages = row.get("messages") if isinstance(row, dict) else None
        tools = row.get("tools") if isinstance(row, dict) else None
        problem = transcript_problem(messages) or _tools_problem(tools)
        if problem:
            raise ConfigError(f"sft.data {path}: line {number} {problem}")
        transcripts.append((messages, tools or None))
    if not transcripts:
        raise ConfigError(f"sft.data {path} holds no transcripts")
    return transcripts


def env_demonstrations(cfg: Config) -> list[list[dict[str, Any]]]:
    """Transcripts from the configured env's `demonstrations(tasks, **env.kwargs)`
    classmethod; with swarm.enabled, `spawn=True` too when it takes that argument."""
    from forge.env.errors import describe_env_error, error_headline
    from forge.env.registry import resolve_env
    from forge.run.tasks import load_task_rows

    try:
        env_class = resolve_env(cfg.env.name)
    except ValueError as exc:
        raise ConfigError(f"env.name: {exc}") from None
    demonstrate = getattr(env_class, "demonstrations", None)
    if demonstrate is None:
        raise ConfigError(
            f"{env_class.__name__} has no demonstrations(tasks) classmethod; give a jsonl of 'messages' (--data)"
        )
    kwargs = dict(cfg.env.kwargs)
    # A team's demonstrations (spawn calls and sub-agent turns) for an env that has them.
    if cfg.swarm.enabled and "spawn" in inspect.signature(demonstrate).parameters:
        kwargs["spawn"] = True
    tasks = load_task_rows(cfg)
    source = f"{env_class.__name__}.demonstrations"
    try:
        given = demonstrate(tasks, **kwargs)
        listed = isinstance(given, Iterable) and not isinstance(given, (str, bytes, dict))
        transcripts = list(given) if listed else None
    except Exception as exc:  # the user's code: its message and its own file:line, no traceback
        raise ConfigError(f"{source} raised {error_headline(describe_env_error(exc))}") from None
    if transcripts is None:
        raise ConfigError(
            f"{source} returned {type(given).__name__}; return a list of transcripts, each a list of "
            "{role, content} messages"
        )
    for index, messages in enumerate(transcripts):
        problem = transcript_problem(messages)
        if problem:
            raise ConfigError(f"{source}: transcript {index} {problem}")
    if not transcripts:
        raise ConfigError(f"{source} gave no transcripts for {len(tasks)} tasks")
    return transcripts


def sft(
    cfg: Config,
    data: str | None,
    output_dir: str | Path,
    epochs: int = 1,
    batch_size: int = 16,
    overwrite: bool = False,
) -> Path:
    """Train on the transcripts (`data`, or the env's demonstrations) for `epochs`, in
    steps of `batch_size` transcripts; write metrics.jsonl and final/. Returns final/.
    An output folder holding an earlier run is refused unless `overwrite`."""
    from tqdm import tqdm
    from transformers import AutoConfig

    from forge.metrics import MetricsLogger, claim_output_dir
    from forge.models.loading import load_tokenizer, refuse_tokenizer_past_embeddings, resolve_model_path
    from forge.train.trainer import Trainer, check_trainable_dtype

    check_trainable_dtype(cfg.model)  # before the transcripts, which may take a while to make
    if epochs < 1 or batch_size < 1:
        raise ConfigError(
            f"forge sft needs --epochs and --batch-size of at least 1 (got {epochs}, {batch_size})"
        )
    output = Path(output_dir)
    try:
        claim_output_dir(output, overwrite)
    except FileExistsError:  # its message offers --resume, which forge sft has not
        raise FileExistsError(
            f"{output} already holds a run (metrics.jsonl): write this one elsewhere with --output-dir DIR, "
            "or replace it with --overwrite"
        ) from None
    output.mkdir(parents=True, exist_ok=True)
    transcripts = (
        read_transcripts(data) if data else [(messages, None) for messages in env_demonstrations(cfg)]
    )
    model_path = resolve_model_path(cfg.model, output / "initial_model", seed=cfg.seed)
    steps = epochs * -(-len(transcripts) // batch_size)
    # Plain negative log-likelihood of the assistant tokens: pg at advantage 1, one
    # optimizer step per batch, no importance weights (there is no behaviour policy).
    train_cfg = cfg.train.model_copy(update={
        "loss": "pg", "tis_cap": None, "kl_coef": 0.0, "entropy_coef": 0.0, "minibatches_per_step": 1,
        "epochs_per_step": 1, "max_steps": steps,
    })  # fmt: skip
    # Before the model loads: a tokenizer past the model's embeddings fails in its forward.
    refuse_tokenizer_past_embeddings(
        load_tokenizer(model_path), AutoConfig.from_pretrained(str(model_path)), model_path
    )
    trainer = Trainer(model_path, cfg.model, train_cfg, cfg.trainer, cfg.seed)
    from forge.rollout.chat import ChatFormat

    system_in_user = ChatFormat(trainer.tokenizer).system_in_user
    renders_tool_calls = template_renders_tool_calls(trainer.tokenizer)
    samples = []
    for index, (messages, tools) in enumerate(transcripts):
        try:
            samples.append(
                transcript_sample(trainer.tokenizer, messages, system_in_user, renders_tool_calls, tools)
            )
        except ValueError as exc:  # the model's chat template cannot separate the assistant's tokens
            raise ConfigError(f"forge sft on {model_path}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - the template's own raise_exception (a jinja2 TemplateError)
            raise ConfigError(
                f"forge sft on {model_path}: its chat template raised {type(exc).__name__}: {exc}, rendering "
                f"transcript {index}; give transcripts whose roles the template takes"
            ) from None
    logger = MetricsLogger(output, cfg.logging.tensorboard, None, cfg.to_dict())
    # The console's view of a warm start that can take minutes: steps done and the loss.
    bar = tqdm(total=steps, desc="sft", unit="step", disable=not cfg.logging.progress_bar)
    order = random.Random(cfg.seed)
    started = time.perf_counter()
    step = 0
    try:
        for _ in range(epochs):
            order.shuffle(samples)
            for first in range(0, len(samples), batch_size):
                step += 1
                step_started = time.perf_counter()
                metrics = trainer.train_step(samples[first : first + batch_size])
                for key in BEHAVIOUR_METRICS:  # against behaviour logprobs a transcript has not
                    metrics.pop(key, None)
                metrics["step_seconds"] = time.perf_counter() - step_started
                metrics["wall_seconds"] = time.perf_counter() - started
                logger.log(step, metrics)
                bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.3f}", refresh=False)
                bar.update()
    finally:
        bar.close()
        logger.close()
    return Path(trainer.save(output / "final"))
