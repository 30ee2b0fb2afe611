"""Incremental decoding of a reply: the text built token by token equals decoding it whole,
stop strings are found across token boundaries and never handed out, and the JSON end
finder scans a growing text once."""

from __future__ import annotations

import codecs

import pytest
from family_tokenizers import byte_level_tokenizer
from gateway_helpers import with_byte_runs_made_valid
from hypothesis import given, settings
from hypothesis import strategies as st

from forge.gateway.decoding import JsonObjectEnd, TextStream, token_bytes


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return byte_level_tokenizer("qwen", tmp_path_factory.mktemp("qwen"))


def stream_all(tokenizer, text: str, stop: list[str]) -> tuple[TextStream, str]:
    stream = TextStream(tokenizer, stop, {tokenizer.eos_token_id})
    handed_out = ""
    for token in tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]:
        stopped = stream.push(token)
        handed_out += stream.ready()
        if stopped:
            break
    stream.settle()
    return stream, handed_out + stream.ready(final=True)


@settings(max_examples=25, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list('ab the\n{}"é✓日')), max_size=40))
def test_text_built_token_by_token_is_the_whole_decode(qwen, text):
    stream, handed_out = stream_all(qwen, text, [])
    assert stream.final_text == handed_out == text


@settings(max_examples=25, deadline=None)
@given(
    before=st.text(alphabet=st.sampled_from(list("ab e\né")), max_size=20),
    after=st.text(alphabet=st.sampled_from(list("ab e\né")), max_size=10),
)
def test_a_stop_string_is_cut_wherever_the_tokens_split_it(qwen, before, after):
    stop = "\nObs:"
    stream, handed_out = stream_all(qwen, before + stop + after, [stop])
    expected = (before + stop).split(stop)[0]
    assert stream.final_text == handed_out == expected
    assert stop not in handed_out


def test_the_json_end_finder_matches_a_whole_scan():
    text = '{"a": "}{\\"", "b": [1, {"c": 2}]} trailing'
    finder = JsonObjectEnd()
    ends = [finder(text[:size]) for size in range(1, len(text) + 1)]
    closed = text.index("]}") + 2
    assert ends[closed - 1] == closed and all(end is None for end in ends[: closed - 1])


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    from forge.models.loading import load_tokenizer

    return load_tokenizer(tiny_checkpoint)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_any_token_ids_of_a_byte_fallback_tokenizer_stream_as_their_whole_decode(tiny, data):
    # Random ids are what a random model samples: words, byte pieces in invalid runs, specials.
    # A valid run decodes as the tokenizer decodes it; in an invalid run only the bytes that
    # cannot be part of a character become U+FFFD (byte fallback makes them all U+FFFD), so
    # the text sent so far stays the start of the text.
    ids = data.draw(st.lists(st.integers(0, len(tiny) - 1), max_size=30))
    hidden = set(tiny.all_special_ids)
    stream, handed_out = TextStream(tiny, [], hidden), ""
    for token in ids:
        stream.push(token)
        handed_out += stream.ready()
    stream.settle()
    handed_out += stream.ready(final=True)
    whole = TextStream(tiny, [], hidden)
    whole.take_all(ids)
    visible = [t for t in ids if t not in hidden]
    assert (
        handed_out
        == stream.final_text
        == whole.final_text
        == tiny.decode(with_byte_runs_made_valid(tiny, visible))
    )


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_a_byte_level_reply_streams_all_but_a_character_still_arriving(qwen, data):
    # A byte-level token may end inside a character, and a random policy samples bytes that
    # spell none (a lone continuation byte, 0xFF). After each token the text sent is the
    # UTF-8 decode of the bytes so far, less only the U+FFFD of a character whose bytes may
    # still come: a byte that can never be part of one is sent at once, not held for later.
    ids = data.draw(st.lists(st.integers(0, len(qwen) - 1), max_size=30))
    hidden = set(qwen.all_special_ids)
    stream, handed_out = TextStream(qwen, [], hidden), ""
    utf8, sampled = codecs.getincrementaldecoder("utf-8")("replace"), b""
    for token in ids:
        stream.push(token)
        handed_out += stream.ready()
        if token not in hidden:
            sampled += token_bytes(qwen, token)
            utf8.decode(token_bytes(qwen, token))
        text = sampled.decode("utf-8", errors="replace")
        assert handed_out == (text[:-1] if utf8.getstate()[0] else text)
    stream.settle()
    whole = TextStream(qwen, [], hidden)
    whole.take_all(ids)
    assert (
        handed_out + stream.ready(final=True) == whole.final_text == sampled.decode("utf-8", errors="replace")
    )
