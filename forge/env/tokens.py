"""How an env's text reaches a model: its prompt and observations rendered through the
model's chat template and tokenized, with the words the tokenizer cannot represent."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

_BYTE_TOKEN = re.compile(r"^<0x[0-9A-F]{2}>$")


@dataclass
class TokenReport:
    prompt_tokens: int = 0
    observation_tokens: list[int] = field(default_factory=list)
    byte_tokens: int = 0  # pieces spelled in bytes (a byte-fallback tokenizer's rare words)
    unknown_tokens: int = 0
    unknown_words: list[str] = field(default_factory=list)

    def summary(self) -> str:
        counts = f"prompt {self.prompt_tokens} tokens"
        if self.observation_tokens:
            counts += (
                f", {len(self.observation_tokens)} observations {min(self.observation_tokens)}-"
                f"{max(self.observation_tokens)} tokens"
            )
        if self.unknown_tokens:
            words = ", ".join(repr(w) for w in self.unknown_words[:8])
            more = f" and {len(self.unknown_words) - 8} more" if len(self.unknown_words) > 8 else ""
            return f"{counts}; {self.unknown_tokens} unknown tokens: the model cannot see {words}{more}"
        return f"{counts}; no unknown tokens ({self.byte_tokens} spelled in bytes)"


def _unknown_words(tokenizer: Any, text: str) -> list[str]:
    unk = tokenizer.unk_token_id
    words = []
    for word in dict.fromkeys(text.split()):
        if unk in tokenizer(word, add_special_tokens=False)["input_ids"]:
            words.append(word)
    return words


def tokenize_env_text(
    tokenizer: Any, observations: list[str], system_prompt: str | None = None, tools: list[dict] | None = None
) -> TokenReport:
    """The first observation as the prompt (with the system prompt and tools), the rest as
    observations appended after a model turn, exactly as the agent loop renders them."""
    from forge.rollout.chat import ChatFormat

    chat = ChatFormat(tokenizer)
    report = TokenReport()
    pieces = [chat.prompt_ids(observations[0], system_prompt, tools)] if observations else []
    report.prompt_tokens = len(pieces[0]) if pieces else 0
    for observation in observations[1:]:
        ids = chat.observation_ids(observation)
        report.observation_tokens.append(len(ids))
        pieces.append(ids)
    unk = tokenizer.unk_token_id
    for ids in pieces:
        report.unknown_tokens += sum(token == unk for token in ids) if unk is not None else 0
        report.byte_tokens += sum(
            bool(_BYTE_TOKEN.match(t or "")) for t in tokenizer.convert_ids_to_tokens(ids)
        )
    if report.unknown_tokens:
        texts = [system_prompt or "", *observations]
        report.unknown_words = list(
            dict.fromkeys(w for text in texts for w in _unknown_words(tokenizer, text))
        )
    return report


def load_check_tokenizer(
    model_path: str | None, extra_words: list[str] | tuple[str, ...] = ()
) -> tuple[Any, str]:
    """The tokenizer of `model_path` (a checkpoint folder), or when None the built-in tiny
    model's with `extra_words` (model.tiny.extra_words: what a config without model.path
    trains, built as `save_tiny_checkpoint` builds it); and a name for the report."""
    if model_path is None:
        from forge.models.tiny import build_tokenizer

        words = f" with model.tiny.extra_words {list(extra_words)}" if extra_words else ""
        return build_tokenizer(extra_words), f"the built-in tiny model{words}"
    from forge.models.loading import load_tokenizer

    return load_tokenizer(check_model_folder(model_path)), model_path


def check_model_folder(model_path: str | None) -> str | None:
    """The folder of `model_path`: itself, or for a hub id (org/name) its snapshot in this
    machine's Hugging Face cache (downloaded when missing, as model.path's); a clear error
    when it is set and is neither."""
    import os

    from forge.models.hub import hub_snapshot, names_hub_model

    if names_hub_model(model_path):
        return str(hub_snapshot(model_path, "main", ("--model", "revision")))
    if model_path is not None and not os.path.isdir(model_path):
        raise FileNotFoundError(
            f"model {model_path!r} is not a folder: give a checkpoint folder or a hub id, org/name (--model, model.path)"
        )
    return model_path


def first_prompt_check(
    tokenizer: Any, model_path: str, env_name: str, max_context_tokens: int, max_new_tokens: int
) -> Any:
    """A check of an env's first prompt as the run's model reads it, for `preflight_env`: text
    the tokenizer reads as unknown tokens, or a prompt that leaves no room for a reply, stops
    the run before it starts (else every episode trains on unknown tokens, or errors)."""
    from forge.config import ConfigError

    def check(observation: str, system_prompt: str | None, tools: list[dict] | None) -> None:
        report = tokenize_env_text(tokenizer, [observation], system_prompt, tools)
        if report.unknown_words:  # the env's own words (a template's quirks are the model's)
            raise ConfigError(
                f"env {env_name}'s first prompt, as the tokenizer of {model_path} reads it: {report.summary()}; "
                f"use a model whose tokenizer covers the env's text (`forge env check {env_name} --model {model_path}` "
                "shows how this one tokenizes it)"
            )
        if report.prompt_tokens + max_new_tokens > max_context_tokens:
            raise ConfigError(
                f"env {env_name}'s first prompt is {report.prompt_tokens} tokens: with rollout.max_new_tokens="
                f"{max_new_tokens} it is over rollout.max_context_tokens={max_context_tokens}; raise "
                "rollout.max_context_tokens (within the model's context), lower rollout.max_new_tokens, or "
                "shorten the env's prompt"
            )

    return check
