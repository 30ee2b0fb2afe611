"""Turning messages into token ids through the model's own chat template.

Only text that the model did not generate is ever tokenized here: the first prompt and
each observation. Generated ids are appended as they came out of the engine.
"""

from __future__ import annotations

from typing import Any


class ChatFormat:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        if tokenizer.eos_token is None:
            raise ValueError("tokenizer has no eos_token; Forge needs it to end the model's turns")
        self.eos_token_id: int = tokenizer.eos_token_id
        self.stop_token_ids = [self.eos_token_id]
        from forge.env.tools import template_renders_tools

        self.renders_tools = template_renders_tools(tokenizer)

    def _render(self, messages: list[dict[str, Any]], tools: list[dict] | None, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=generation_prompt, tokenize=False
        )

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(
        self, observation: str, system_prompt: str | None = None, tools: list[dict] | None = None
    ) -> list[int]:
        if tools and not self.renders_tools:
            # The template drops `tools=`; show the schemas as Hermes-style system text.
            from forge.env.tools import hermes_tools_prompt

            system_prompt = "\n\n".join(p for p in (system_prompt, hermes_tools_prompt(tools)) if p)
            tools = None
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": observation})
        return self._encode(self._render(messages, tools, generation_prompt=True))

    def observation_ids(self, observation: str, role: str = "user") -> list[int]:
        """Tokens that follow a finished assistant turn (ending in eos) to add `observation`
        and open the next assistant turn, exactly as the template renders them."""
        history = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        base = self._render(history, None, generation_prompt=False)
        full = self._render(history + [{"role": role, "content": observation}], None, generation_prompt=True)
        cut = base.rfind(self.tokenizer.eos_token)
        if cut < 0 or not full.startswith(base[: cut + len(self.tokenizer.eos_token)]):
            raise ValueError(
                "the chat template does not render a conversation as a prefix of its continuation; "
                "Forge cannot append observation tokens without re-tokenizing the history"
            )
        return self._encode(full[cut + len(self.tokenizer.eos_token) :])

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)
