"""A chat format over raw bytes for agent-loop tests: no tokenizer, and every prompt decodes
back to the exact text the loop built (token id = byte + 1, 0 = end of turn)."""

from __future__ import annotations

import json

EOS = 0


class ByteChat:
    """A chat format over raw bytes (token id = byte + 1, 0 = end of turn)."""

    eos_token_id = turn_end_id = EOS
    stop_token_ids = [EOS]

    def encode(self, text: str) -> list[int]:
        return [b + 1 for b in text.encode()]

    def prompt_ids(self, observation, system_prompt=None, tools=None):
        return self.encode(f"{system_prompt}\n{json.dumps(tools)}\nuser: {observation}\nassistant: ")

    def observation_ids(self, observation, role="user"):
        return self.encode(f"\n{role}: {observation}\nassistant: ")

    def decode(self, token_ids):
        return bytes(t - 1 for t in token_ids if t != EOS).decode()
