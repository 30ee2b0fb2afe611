"""Tiny byte-level BPE tokenizers carrying each model family's chat template in its
essential shape (Qwen 2.5 / Hermes, Llama 3.1 JSON tools, Mistral v3 tools), saved as a
local tokenizer config and loaded back with `from_pretrained`: no hub. And a word-level
tokenizer that knows only the words it is given (everything else is <unk>)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from forge.gateway.decoding import byte_to_char

QWEN_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n"
    "{%- if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{%- endif %}"
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
    "{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}'
    "\n</tool_call><|im_end|>\n"
    "{%- elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{%- elif message.role == 'assistant' %}<|im_start|>assistant"
    "{%- if message.content %}\n{{ message.content }}{%- endif %}"
    '{%- for tool_call in message.tool_calls or [] %}\n<tool_call>\n{"name": "{{ tool_call.function.name }}", '
    '"arguments": {{ tool_call.function.arguments | tojson }}}\n</tool_call>{%- endfor %}<|im_end|>\n'
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n"
    "</tool_response><|im_end|>\n{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)

LLAMA3_TEMPLATE = (
    # As Llama 3.1's: each header is a string expression, so its "\n\n" survives the {%- trims.
    "{{- bos_token }}"
    "{%- if messages[0].role == 'system' %}{%- set system = messages[0].content %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{%- if tools %}{{- 'Environment: ipython\\n' }}{%- endif %}{{- system }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' and tools and loop.first %}"
    "{{- '<|start_header_id|>user<|end_header_id|>\\n\\n' }}"
    "{{- 'Given the following functions, please respond with a JSON for a function call with its proper arguments "
    "that best answers the given prompt.\\n\\n' }}"
    '{{- \'Respond in the format {\\"name\\": function name, \\"parameters\\": '
    "dictionary of argument name and its value}. Do not use variables.\\n\\n' }}"
    "{%- for t in tools %}{{- t | tojson }}{{- '\\n\\n' }}{%- endfor %}{{- message.content }}{{- '<|eot_id|>' }}"
    "{%- elif message.role == 'assistant' and message.tool_calls %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- for tool_call in message.tool_calls %}"
    '{{- \'{\\"name\\": \\"\' + tool_call.function.name + \'\\", \\"parameters\\": \' }}'
    "{{- tool_call.function.arguments | tojson }}{{- '}' }}{%- endfor %}{{- '<|eot_id|>' }}"
    "{%- elif message.role == 'tool' or message.role == 'ipython' %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' }}{{- message.content }}{{- '<|eot_id|>' }}"
    "{%- else %}{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' }}"
    "{{- message.content }}{{- '<|eot_id|>' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

MISTRAL_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' %}"
    "{%- if tools and loop.last or (tools and loop.index0 == (messages | selectattr('role', 'equalto', 'user') "
    "| list | length) - 1) %}[AVAILABLE_TOOLS] {{ tools | tojson }}[/AVAILABLE_TOOLS]{%- endif %}"
    "[INST] {{ message.content }}[/INST]"
    "{%- elif message.role == 'system' %}[INST] {{ message.content }}[/INST]"
    "{%- elif message.role == 'assistant' and message.tool_calls %}[TOOL_CALLS] ["
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.id is not defined or tool_call.id | length != 9 %}"
    "{{- raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}{%- endif %}"
    '{"name": "{{ tool_call.function.name }}", "arguments": {{ tool_call.function.arguments | tojson }}, '
    '"id": "{{ tool_call.id }}"}{%- if not loop.last %}, {%- endif %}{%- endfor %}]{{ eos_token }}'
    "{%- elif message.role == 'assistant' %}{{ message.content }}{{ eos_token }}"
    "{%- elif message.role == 'tool' %}[TOOL_RESULTS] {\"content\": {{ message.content | tojson }}, "
    '"call_id": "{{ message.tool_call_id }}"}[/TOOL_RESULTS]'
    "{%- endif %}{%- endfor %}"
)

FAMILIES = {
    # family: (chat template, special tokens, end-of-turn token, bos token or None)
    "qwen": (QWEN_TEMPLATE, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_end|>", None),
    "llama3": (
        LLAMA3_TEMPLATE,
        [
            "<|begin_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|eom_id|>",
            "<|python_tag|>",
        ],
        "<|eot_id|>",
        "<|begin_of_text|>",
    ),
    "mistral": (
        MISTRAL_TEMPLATE,
        [
            "<unk>",
            "<s>",
            "</s>",
            "[INST]",
            "[/INST]",
            "[TOOL_CALLS]",
            "[AVAILABLE_TOOLS]",
            "[/AVAILABLE_TOOLS]",
            "[TOOL_RESULTS]",
            "[/TOOL_RESULTS]",
        ],
        "</s>",
        "<s>",
    ),
}


def byte_level_tokenizer(
    family: str, directory: Path, more_specials: Sequence[str] = ()
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (one token per byte, a few merges) with `family`'s special
    tokens and chat template, saved to `directory` and loaded back from there. `more_specials`
    (e.g. the base model's <|end_of_text|> beside Llama 3's <|eot_id|>) take the last ids."""
    template, family_specials, eos, bos = FAMILIES[family]
    specials = [*family_specials, *more_specials]
    alphabet = list(byte_to_char().values())
    vocab = {token: i for i, token in enumerate(family_specials)}
    for char in alphabet:
        vocab[char] = len(vocab)
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("a", "r")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    for token in more_specials:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=eos,
        bos_token=bos,
        pad_token=specials[0],
        additional_special_tokens=[s for s in specials if s not in (eos, bos, specials[0])],
    )
    tokenizer.chat_template = template
    tokenizer.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


def word_level_tokenizer(*known: str) -> PreTrainedTokenizerFast:
    """A ChatML-templated tokenizer that reads any word but the template's and `known` as <unk>."""
    words = ["<|im_start|>", "<|im_end|>", "<unk>", "user", "assistant", "system", *known]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>",
                                        additional_special_tokens=["<|im_start|>"])  # fmt: skip
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }} {{ m.content }}<|im_end|>{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
    )
    return tokenizer
