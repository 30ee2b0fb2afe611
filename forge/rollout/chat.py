"""Turning messages into token ids through the model's own chat template.

Only text that the model did not generate is ever tokenized here: the first prompt and
each observation. Generated ids are appended as they came out of the engine.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

# Rendered prompts and observation suffixes are cached per ChatFormat: the same text always
# renders to the same ids, and envs repeat themselves (a group shares one prompt; feedback
# such as "higher" recurs every turn), so template rendering stops dominating rollout CPU.
CACHE_ENTRIES = 4096
CACHE_MAX_CHARS = 4096  # longer texts (file contents, tool output) are rendered each time


TOOL_CALL_MARKERS = ("<tool_call>", "</tool_call>")  # what forge.env.tools.parse_tool_calls reads calls by


class ChatFormat:
    def __init__(self, tokenizer: Any, end_token_ids: Sequence[int] = ()) -> None:
        """`end_token_ids`: more ids generation stops at, beside the turn end and eos (those a
        checkpoint's generation_config.json lists: forge.models.loading.generation_end_ids)."""
        self.tokenizer = tokenizer
        if tokenizer.eos_token is None:
            raise ValueError("tokenizer has no eos_token; Forge needs it to end the model's turns")
        self.eos_token_id: int = tokenizer.eos_token_id
        # What the template ends an assistant turn with: the eos token, or another special token
        # (Gemma's <end_of_turn> beside its <eos>, the first Llama 3 tokenizers' <|eot_id|>
        # beside <|end_of_text|>). Generation stops at either, and at every end id the checkpoint's
        # generation config lists. A stop token is the reply's last, sampled and trained on with its
        # logprob; a reply that ended at another stop token or was cut at max_new_tokens is closed
        # with the turn end (forge.rollout.agent), as the template closes an assistant message.
        self.turn_end = self._turn_end()
        self.turn_end_id: int = tokenizer.convert_tokens_to_ids(self.turn_end)
        self.stop_token_ids = list(dict.fromkeys([self.turn_end_id, self.eos_token_id, *end_token_ids]))
        from forge.env.tools import template_renders_tools

        self.renders_tools = template_renders_tools(tokenizer)
        self.system_in_user = not template_takes_system(tokenizer)
        self._cached_prompt = functools.lru_cache(CACHE_ENTRIES)(self._prompt_ids)
        self._cached_observation = functools.lru_cache(CACHE_ENTRIES)(self._observation_ids)
        self._assistant_end: str | None = None
        # Hermes tool-call markers a tokenizer registers as special tokens (a user's added_tokens, some
        # fine-tunes' tokenizers) stay in a reply's text: skipped, a ToolEnv got the call without them
        # and read it as a malformed final answer.
        special = set(tokenizer.all_special_ids)
        vocabulary = tokenizer.get_vocab()
        markers = {vocabulary[token] for token in TOOL_CALL_MARKERS if token in vocabulary}
        self._kept_special_ids = markers & special
        self._skipped_special_ids = special - markers

    # An assistant reply no template renders specially, to find what follows it.
    _MARKER = "forge-reply-marker"

    def _turn_end(self) -> str:
        """The eos token when the template's assistant turn ends with it, else the first special
        token the template writes after an assistant reply; the eos token too where the
        template cannot render a conversation (its turns are checked where they are appended)."""
        try:
            base = self._render(
                [{"role": "user", "content": "x"}, {"role": "assistant", "content": self._MARKER}],
                None,
                generation_prompt=False,
            )
        except Exception:  # noqa: BLE001 - a template that refuses this conversation is judged later
            return self.tokenizer.eos_token
        after = base[base.rfind(self._MARKER) + len(self._MARKER) :] if self._MARKER in base else ""
        if self.tokenizer.eos_token in after:
            return self.tokenizer.eos_token
        special = {str(token) for token in self.tokenizer.all_special_tokens}
        special |= {str(added) for added in getattr(self.tokenizer, "added_tokens_decoder", {}).values()}
        found = [(after.find(token), token) for token in special if token and token in after]
        return min(found)[1] if found else self.tokenizer.eos_token

    def _render(
        self, messages: list[dict[str, Any]], tools: list[dict] | None, generation_prompt: bool
    ) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=generation_prompt, tokenize=False
        )

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(
        self, observation: str, system_prompt: str | None = None, tools: list[dict] | None = None
    ) -> list[int]:
        """Ids of the first prompt: optional system text and tools, the observation as the
        user's message, and the opening of the assistant's turn."""
        if len(observation) + len(system_prompt or "") > CACHE_MAX_CHARS:
            return self._prompt_ids(observation, system_prompt, json.dumps(tools) if tools else None)
        return list(self._cached_prompt(observation, system_prompt, json.dumps(tools) if tools else None))

    def _prompt_ids(self, observation: str, system_prompt: str | None, tools_json: str | None) -> list[int]:
        tools = json.loads(tools_json) if tools_json else None
        if tools and not self.renders_tools:
            # The template drops `tools=`; show the schemas as Hermes-style system text.
            from forge.env.tools import hermes_tools_prompt

            system_prompt = "\n\n".join(p for p in (system_prompt, hermes_tools_prompt(tools)) if p)
            tools = None
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": observation})
        if self.system_in_user:
            messages = system_in_first_user(messages)
        return self._encode(self._render(messages, tools, generation_prompt=True))

    def observation_ids(self, observation: str, role: str = "user") -> list[int]:
        """Tokens that follow a finished assistant turn (ending in `turn_end`) to add `observation`
        and open the next assistant turn, exactly as the template renders them."""
        if len(observation) > CACHE_MAX_CHARS:
            return self._observation_ids(observation, role)
        return list(self._cached_observation(observation, role))

    _HISTORY = ({"role": "user", "content": "x"}, {"role": "assistant", "content": "y"})

    def _observation_ids(self, observation: str, role: str) -> list[int]:
        history = [dict(message) for message in self._HISTORY]
        if self._assistant_end is None:  # the rendered history up to and including the turn's end
            base = self._render(history, None, generation_prompt=False)
            cut = base.rfind(self.turn_end)
            if cut < 0:
                ends = base[base.rfind("y") + 1 :].strip() or "nothing"
                raise ValueError(
                    f"the chat template ends an assistant turn with {ends!r}, neither the tokenizer's eos_token "
                    f"{self.tokenizer.eos_token!r} nor a special token, so Forge cannot tell where a turn ends: "
                    "set tokenizer.eos_token to the token that ends a turn and save_pretrained it into the "
                    "checkpoint folder"
                )
            self._assistant_end = base[: cut + len(self.turn_end)]
        full = self._render(history + [{"role": role, "content": observation}], None, generation_prompt=True)
        if not full.startswith(self._assistant_end):
            raise ValueError(
                "the chat template does not render a conversation as a prefix of its continuation; "
                "Forge cannot append observation tokens without re-tokenizing the history"
            )
        return self._encode(full[len(self._assistant_end) :])

    def decode(self, token_ids: list[int]) -> str:
        """A reply's text as the env reads it: special tokens left out, but for tool-call markers."""
        if not self._kept_special_ids.intersection(token_ids):
            return self.tokenizer.decode(token_ids, skip_special_tokens=True)
        kept = [token for token in token_ids if token not in self._skipped_special_ids]
        return self.tokenizer.decode(kept, skip_special_tokens=False)


def template_takes_system(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders a system message. Some refuse one (Gemma 1
    and 2: 'System role not supported'; Mistral's first instruct models: 'Conversation roles must
    alternate') or drop it unsaid; their models' own guidance puts instructions in the first user
    message, where `system_in_first_user` puts a system message for them."""
    marker = ChatFormat._MARKER

    def render(messages: list[dict[str, Any]]) -> str:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    user = [{"role": "user", "content": "x"}]
    try:
        if marker in render([{"role": "system", "content": marker}, *user]):
            return True
    except Exception:  # noqa: BLE001 - a template error of any kind: it refused the system message
        pass
    try:
        render(user)
    except Exception:  # noqa: BLE001 - it refuses a lone user message too: judged where it is used
        return True
    return False


def system_in_first_user(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`messages` with a leading system message put at the head of the user message after it,
    for a template that takes no system message (`ChatFormat.system_in_user`); else as given."""
    if len(messages) < 2 or messages[0].get("role") != "system" or messages[1].get("role") != "user":
        return messages
    first = {**messages[1], "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"}
    return [first, *messages[2:]]


def check_chat_format(tokenizer: Any, folder: Any) -> None:
    """Refuse, before a run starts, a tokenizer whose chat template Forge cannot append turns
    through (each multi-turn episode would error on it): one message naming `folder`."""
    from forge.config import ConfigError

    try:
        ChatFormat(tokenizer).observation_ids("x")
    except ValueError as exc:
        raise ConfigError(f"the tokenizer at {folder}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the template's own raise_exception (a jinja2 TemplateError)
        raise ConfigError(
            f"the chat template of the tokenizer at {folder} raised {type(exc).__name__}: {exc}, rendering "
            "a user message, the model's reply and the next user message, as every multi-turn episode "
            "renders them: fix tokenizer.chat_template and save_pretrained it into that folder"
        ) from None
