"""A text prompt is encoded as vLLM serves it, so a policy trained through the gateway sees
the tokens it will be served with: `/v1/completions` adds the tokenizer's special tokens (the
BOS of a Llama 3 tokenizer) unless `add_special_tokens` is false, and chat adds none beyond
what the template writes unless it is true; `echo` gives the prompt as sent, streamed or not."""

from __future__ import annotations

import pytest
from family_tokenizers import byte_level_tokenizer
from gateway_helpers import ScriptedEngine, calls_of, client, serve, start
from tokenizers import processors
from transformers import AutoTokenizer

WIDE = {"max_new_tokens": 50, "max_context_tokens": 4096}  # one token per byte: long prompts


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    """A byte-level tokenizer with Llama 3's template and, as Llama 3's tokenizer.json has, a
    post-processor that starts every encoding with <|begin_of_text|>."""
    folder = tmp_path_factory.mktemp("llama3")
    tokenizer = byte_level_tokenizer("llama3", folder)
    bos = tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A $B",
        special_tokens=[("<|begin_of_text|>", bos)],
    )
    tokenizer.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer("hi")["input_ids"][0] == bos  # what vLLM's default encoding gives
    return tokenizer


@pytest.fixture(scope="module")
def served(llama3):
    reply = llama3(" 3", add_special_tokens=False)["input_ids"] + [llama3.convert_tokens_to_ids("<|eot_id|>")]
    with serve(ScriptedEngine(reply), llama3, **WIDE) as server:
        yield server


def test_a_text_completion_prompt_starts_with_the_bos_as_vllm_encodes_it(served, llama3):
    episode = start(served)
    agent = client(served, episode["episode_id"])
    agent.completions.create(model="p", prompt="The number is", max_tokens=4)
    agent.completions.create(model="p", prompt=["The number is"], max_tokens=4)
    agent.completions.create(
        model="p", prompt="The number is", max_tokens=4, extra_body={"add_special_tokens": False}
    )
    ids = llama3("The number is", add_special_tokens=False)["input_ids"]
    agent.completions.create(model="p", prompt=ids, max_tokens=4)  # token ids: taken as sent
    bos = llama3.convert_tokens_to_ids("<|begin_of_text|>")
    assert [call.prompt_ids for call in calls_of(served, episode)] == [[bos, *ids], [bos, *ids], ids, ids]


def test_a_chat_prompt_has_the_templates_bos_once_unless_add_special_tokens_asks_for_another(served, llama3):
    episode = start(served)
    agent = client(served, episode["episode_id"])
    messages = [{"role": "user", "content": "guess"}]
    agent.chat.completions.create(model="p", messages=messages)
    agent.chat.completions.create(model="p", messages=messages, extra_body={"add_special_tokens": True})
    rendered = llama3.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    once = llama3(rendered, add_special_tokens=False)["input_ids"]
    bos = llama3.convert_tokens_to_ids("<|begin_of_text|>")
    assert once[0] == bos and once[1] != bos
    assert [call.prompt_ids for call in calls_of(served, episode)] == [once, [bos, *once]]


@pytest.mark.parametrize("stream", [False, True])
def test_echo_gives_the_prompt_as_sent_before_each_completion(served, stream):
    agent = client(served, start(served)["episode_id"])
    made = agent.completions.create(
        model="p", prompt=["Guess:", "Again:"], max_tokens=4, n=2, echo=True, stream=stream
    )
    texts = {}
    for chunk in made if stream else [made]:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert texts == {0: "Guess: 3", 1: "Guess: 3", 2: "Again: 3", 3: "Again: 3"}
