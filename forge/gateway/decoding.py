"""Token ids to the text an OpenAI client sees: incremental decoding with stop strings
and a hold-back for text that may still turn out to be a stop or a tool call, and each
token's string and bytes for `logprobs`."""

from __future__ import annotations

import codecs
from collections.abc import Callable
from functools import lru_cache
from typing import Any


class TextStream:
    """One choice's text as its tokens arrive. `push` says when a stop string completed;
    `ready` hands out the text that can no longer change (never part of a stop string,
    nor text `hold` keeps back, e.g. a tool call being written)."""

    def __init__(
        self,
        tokenizer: Any,
        stop: list[str],
        hidden_ids: set[int],
        prefix: str = "",
        hold: Callable[[str], int] | None = None,
        end: Callable[[str], int | None] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.hidden_ids = hidden_ids  # special tokens left out of the text (end of turn, pads)
        self.prefix = prefix  # text forced into the prompt that the reply goes on from
        self.hold = hold
        self.end = end  # where the text is complete (a closed JSON object), or None
        self.ids: list[int] = []
        self.text = prefix
        self.stop_at: int | None = None  # where the stop string begins in `text`
        self.sent = 0
        # Incremental decoding: only the tokens from `_window` on are decoded again for each
        # new one (the token before gives the spacing context), so a reply costs O(length).
        self._visible: list[int] = []
        self._window = self._read = 0
        # Byte-fallback pieces (<0xNN>) go through a UTF-8 decoder of our own before the
        # tokenizer sees them: its `ByteFallback` turns a whole run of byte pieces into U+FFFD
        # once any byte in it is invalid, so no text of the run could be sent before it ended.
        # `_visible` holds the run as valid UTF-8 (a byte that can no longer be part of a
        # character as U+FFFD's bytes); only a possibly-incomplete character waits here.
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        # A byte-level BPE token (GPT-2, Qwen, Llama 3) is bytes that may end inside a character.
        # Its decode ends in U+FFFD both while a character is still arriving and for bytes that
        # can never be one (a lone continuation byte, 0xFF): the reply's own UTF-8 state tells
        # them apart, so only the first is held back, as the one U+FFFD ending `text`.
        self._byte_level = _byte_level(tokenizer)
        self._arriving = False  # `text` ends with the U+FFFD of a character still arriving
        self._added_ids = set(getattr(tokenizer, "added_tokens_decoder", {}))
        self._token_utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def _decode(self) -> None:
        self.text = self.prefix + self.tokenizer.decode(self._visible, skip_special_tokens=False)
        self._window = self._read = len(self._visible)

    def _visible_ids(self, token_id: int) -> tuple[list[int], list[int]]:
        """What `token_id` adds to `_visible`: the byte pieces of whole characters it settles
        (none while a character may still be arriving), then the token itself unless it is
        hidden or a byte piece."""
        if token_id in self.hidden_ids:
            return [], []
        byte = _fallback_byte(self.tokenizer.convert_ids_to_tokens(token_id))
        if byte is not None:
            return self._byte_ids(self._utf8.decode(bytes([byte]))), []
        if self._byte_level:
            if token_id in self._added_ids:  # decoded on its own: bytes before it end there
                self._token_utf8.reset()
            else:
                self._token_utf8.decode(token_bytes(self.tokenizer, token_id))
        return self._flush_bytes(), [token_id]

    def _flush_bytes(self) -> list[int]:
        """A byte run ended: bytes of a character left incomplete become U+FFFD."""
        ids = self._byte_ids(self._utf8.decode(b"", final=True))
        self._utf8.reset()
        return ids

    def _byte_ids(self, text: str) -> list[int]:
        return self.tokenizer.convert_tokens_to_ids([f"<0x{byte:02X}>" for byte in text.encode("utf-8")])

    def _append(self, ids: list[int], settled: bool) -> None:
        """Decode `ids` onto `text`; `settled`: they are whole characters from byte pieces."""
        if not ids:
            return
        self._visible.extend(ids)
        decode = self.tokenizer.decode
        before = decode(self._visible[self._window : self._read], skip_special_tokens=False)
        after = decode(self._visible[self._window :], skip_special_tokens=False)
        if self._arriving:  # its U+FFFD is decoded again, with the bytes that came since
            before, self.text = before[:-1], self.text[:-1]
        if self._byte_level:
            arriving = bool(self._token_utf8.getstate()[0])
        elif not settled and after.endswith("\ufffd"):  # a character whose bytes are not all sampled yet
            return
        else:
            arriving = False
        window = self._window
        if after.startswith(before):
            self.text += after[len(before) :]
            self._window, self._read = self._read, len(self._visible)
        else:  # decoding is not local here: decode it all
            self._decode()
        if arriving:  # the next decode starts no later than the character does
            self._window = window
        self._arriving = arriving

    def push(self, token_id: int) -> bool:
        """Add a sampled token; True when the text now holds a stop string (or is complete)."""
        self.ids.append(token_id)
        before = len(self.text)
        characters, token = self._visible_ids(token_id)
        self._append(characters, settled=True)
        self._append(token, settled=False)
        if self.stop_at is None and self.stop:
            longest = max(len(s) for s in self.stop)
            start = max(len(self.prefix), min(before, len(self.text)) - longest + 1)
            found = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if found:
                self.stop_at = min(found)
                return True
        if self.stop_at is None and self.end is not None:
            self.stop_at = self.end(self.text)
            return self.stop_at is not None
        return False

    def settle(self) -> None:
        """Generation ended: decode tokens still waiting on the rest of a character."""
        self._arriving = False  # the rest of its bytes will not come: its U+FFFD is final
        if self.stop_at is None:
            self._visible.extend(self._flush_bytes())
            if self._read < len(self._visible):
                self._decode()

    def take_all(self, token_ids: list[int]) -> None:
        """The whole reply at once, from an engine that did not report its tokens one by one."""
        self.ids = list(token_ids)
        self._visible = []
        for token_id in self.ids:
            for ids in self._visible_ids(token_id):
                self._visible.extend(ids)
        self._visible.extend(self._flush_bytes())
        self._decode()
        found = [i for i in (self.text.find(s, len(self.prefix)) for s in self.stop) if i >= 0]
        ends = [self.end(self.text)] if self.end is not None else []
        cuts = found + [i for i in ends if i is not None]
        self.stop_at = min(cuts) if cuts else None

    @property
    def final_text(self) -> str:
        return self.text if self.stop_at is None else self.text[: self.stop_at]

    def ready(self, final: bool = False) -> str:
        """The next piece of text that is settled (all of the rest when `final`)."""
        text = self.final_text
        end = len(text)
        if not final:
            if self._arriving and text.endswith("\ufffd"):
                end -= 1
            end -= _stop_prefix_at_end(text[:end], self.stop)
        if self.hold is not None:
            end = min(end, self.hold(text))
            if not final:  # whitespace before a tool call is not content: wait to see what follows
                end = len(text[:end].rstrip())
        if end <= self.sent:
            return ""
        piece, self.sent = text[self.sent : end], end
        return piece


def _stop_prefix_at_end(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that begins some stop string."""
    best = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:size]):
                best = size
                break
    return best


def hidden_token_ids(tokenizer: Any, keep: tuple[str, ...] = ()) -> set[int]:
    """Special tokens that are not text (end of turn, pads), except those in `keep`
    (tool-call markers some families make special)."""
    kept = {tokenizer.convert_tokens_to_ids(token) for token in keep}
    return set(tokenizer.all_special_ids) - kept


def byte_to_char() -> dict[int, str]:
    """GPT-2's byte-level table: printable bytes stand for themselves, the others are
    shifted to code points from 256 on, in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\xa1"), ord("\xac") + 1),
        *range(ord("\xae"), ord("\xff") + 1),
    ]
    table, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    return {char: byte for byte, char in byte_to_char().items()}


def token_bytes(tokenizer: Any, token_id: int) -> bytes:
    """The raw bytes a token stands for: byte-level BPE pieces mapped back to bytes,
    sentencepiece byte-fallback pieces (<0xNN>) as their byte, else the decoded text."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if piece is None:
        return b""
    if token_id not in tokenizer.all_special_ids:
        if _byte_piece(piece):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        if _byte_level(tokenizer):
            decoder = _byte_decoder()
            if all(char in decoder for char in piece):
                return bytes(decoder[char] for char in piece)
        elif "\u2581" in piece:  # sentencepiece's word-start mark is a space
            return piece.replace("\u2581", " ").encode("utf-8")
    return tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")


def _fallback_byte(piece: str | None) -> int | None:
    """The byte a sentencepiece byte-fallback token (`<0xNN>`) stands for, else None."""
    if not _byte_piece(piece):
        return None
    try:
        return int(piece[3:5], 16)
    except ValueError:
        return None


def _byte_piece(piece: str | None) -> bool:
    """A sentencepiece byte-fallback token, `<0xNN>`."""
    return piece is not None and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")


def _byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and type(backend.decoder).__name__ == "ByteLevel"


def token_entry(
    tokenizer: Any, token_id: int, logprob: float, top: list[tuple[int, float]] | None
) -> dict[str, Any]:
    """One token of an OpenAI chat `logprobs.content` list."""
    raw = token_bytes(tokenizer, token_id)
    entry: dict[str, Any] = {
        "token": raw.decode("utf-8", errors="replace"),
        "logprob": logprob,
        "bytes": list(raw),
    }
    entry["top_logprobs"] = [
        {
            "token": (b := token_bytes(tokenizer, other)).decode("utf-8", errors="replace"),
            "logprob": value,
            "bytes": list(b),
        }
        for other, value in (top or [])
    ]
    return entry


class JsonObjectEnd:
    """Where the JSON object a growing text opens is closed: called with the text so far,
    it returns one past the closing `}` or None while the object is open. It scans only
    what was added since the last call."""

    def __init__(self) -> None:
        self.scanned, self.depth, self.in_string, self.escaped = 0, 0, False, False

    def __call__(self, text: str) -> int | None:
        for index in range(self.scanned, len(text)):
            char = text[index]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif char == "\\":
                    self.escaped = True
                elif char == '"':
                    self.in_string = False
            elif char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.scanned = index + 1
                    return index + 1
        self.scanned = len(text)
        return None


class LeadingObjectEnd:
    """`JsonObjectEnd` for a reply that may be something else (a tool call): it ends the
    reply where its object closes only when the reply begins with `{`."""

    def __init__(self) -> None:
        self.inner = JsonObjectEnd()
        self.opens_object: bool | None = None  # undecided while the reply is only whitespace

    def __call__(self, text: str) -> int | None:
        if self.opens_object is None:
            start = text.lstrip()
            if not start:
                return None
            self.opens_object = start.startswith("{")
        return self.inner(text) if self.opens_object else None
