"""A tiny random-init causal LM and a locally built tokenizer, for offline smoke runs.

Both are saved to a folder and loaded back with `from_pretrained`, the same path a
user's checkpoint takes, so smoke runs exercise the real loading code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

from forge.config import TinyModelConfig

SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|unk|>"]
ROLE_WORDS = ["system", "user", "assistant", "tool"]
# Small on purpose: a random-init model samples near-uniformly over the vocabulary, so
# the smoke task (guessing a number) is solvable by chance often enough to learn from.
WORDS = [
    "guess", "a", "number", "from", "to", "higher", "lower", "correct", "invalid",
    "the", "is", "answer", "try", "again", "turns", "left",
]  # fmt: skip
NUMBERS = [str(i) for i in range(16)]
SPACE = "\u2581"  # stands for the space before a word (SentencePiece's metaspace)
# Any other text is spelled in UTF-8 bytes, one token each, so every text is represented
# (none becomes <|unk|>) and decodes back to itself.
BYTE_TOKENS = [f"<0x{value:02X}>" for value in range(256)]
TOKENIZER_VERSION = (
    4  # part of a saved tiny checkpoint's stamp: a change (here: the embedding start) rebuilds it
)

# ChatML-shaped, with a space after the role so it is a word of its own. The generation
# prompt ends at the role: the reply's first token carries its own leading space, so a
# generated turn tokenizes as the rendered history would.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }} {{ message['content'] }}<|im_end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}"
)


def build_tokenizer(extra_words: list[str] | tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """Whole known words (each with its leading space) as single tokens, bytes for the rest;
    `extra_words` (model.tiny.extra_words) are known words too.

    A BPE model with no merges and `ignore_merges`: a word in the vocabulary is one token;
    any other word falls back to its UTF-8 bytes (`byte_fallback`), the space before it to
    the metaspace token."""
    known = ROLE_WORDS + WORDS + NUMBERS
    words = [SPACE + word for word in known + [w for w in dict.fromkeys(extra_words) if w not in known]]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + words + [SPACE] + BYTE_TOKENS)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, ignore_merges=True,
                                   unk_token="<|unk|>"))  # fmt: skip
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always")
    backend.decoder = decoders.Sequence([
        decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])  # fmt: skip
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        unk_token="<|unk|>",
        bos_token=None,
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model_config(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerFast):
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    if cfg.architecture == "qwen2":
        return Qwen2Config(**common)
    return LlamaConfig(**common)


# Where word and byte pieces start along one shared direction of the (tied) embeddings: words
# a little along it, bytes far against it. With tied embeddings a token's logit is its
# embedding against the final hidden state, which at init points mostly along the current
# token's embedding: after a word, words score higher than bytes. Measured on the smoke model
# (a Qwen2 then; seeds 0-2, two prompts): 0.0-4.1% of the next-token mass on byte pieces (86% with no
# offset) and 0.06-0.11 on the numbers 0-3 (uniform over the 41 words: 0.098), so its replies
# are words and the smoke task is as learnable from chance as with a word-level tokenizer.
# The word shift is small on purpose: every word carries it, so it makes words alike. At
# 0.6 (both sides, before) words started at cosine similarity 0.88 with each other, and 2 of
# 10 smoke seeds stalled below 0.9 (seed 0 at 0.85, repeating its last guess); at 0.2 they
# start at 0.44 and 9 of 10 pass (bench/results/smoke_seeds_negw1.json, before the smoke
# config scaled negative advantages by 0.25).
WORD_OFFSET = 0.2
BYTE_OFFSET = 3.0


def _start_with_words(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast) -> None:
    """Shift word tokens' embeddings along a random direction by WORD_OFFSET and byte pieces'
    against it by BYTE_OFFSET. Training can move both; only the starting point changes."""
    embeddings = model.get_input_embeddings().weight
    direction = torch.randn(embeddings.shape[1])
    direction /= direction.norm()
    pieces = set(tokenizer.convert_tokens_to_ids([SPACE, *BYTE_TOKENS]))
    shift = torch.tensor([-BYTE_OFFSET if i in pieces else WORD_OFFSET for i in range(embeddings.shape[0])])
    with torch.no_grad():
        embeddings += shift[:, None] * direction


def save_tiny_checkpoint(cfg: TinyModelConfig, directory: str | Path, seed: int = 0) -> Path:
    """Build a random-init model + tokenizer and save both as a Hugging Face checkpoint.

    Reuses `directory` when it already holds a checkpoint built from the same settings.
    """
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    stamp = json.dumps(
        # Without extra words the stamp is what it was before they existed: saved checkpoints stay valid.
        {
            "tiny": cfg.model_dump(exclude=set() if cfg.extra_words else {"extra_words"}),
            "seed": seed,
            "tokenizer": TOKENIZER_VERSION,
        },
        sort_keys=True,
    )
    stamp_file = directory / "forge_tiny.json"
    if stamp_file.is_file() and stamp_file.read_text() == stamp:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # as loading.quiet_transformers, which imports this module
    tokenizer = build_tokenizer(cfg.extra_words)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(build_model_config(cfg, tokenizer))
    _start_with_words(model, tokenizer)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    stamp_file.write_text(stamp)
    return directory
