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
]
NUMBERS = [str(i) for i in range(16)]

# ChatML-shaped, with a space after the role so a word-level tokenizer splits it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }} {{ message['content'] }}<|im_end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + ROLE_WORDS + WORDS + NUMBERS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
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


def save_tiny_checkpoint(cfg: TinyModelConfig, directory: str | Path, seed: int = 0) -> Path:
    """Build a random-init model + tokenizer and save both as a Hugging Face checkpoint.

    Reuses `directory` when it already holds a checkpoint built from the same settings.
    """
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    stamp = json.dumps({"tiny": cfg.model_dump(), "seed": seed}, sort_keys=True)
    stamp_file = directory / "forge_tiny.json"
    if stamp_file.is_file() and stamp_file.read_text() == stamp:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    from forge.models.loading import quiet_transformers

    quiet_transformers()
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(build_model_config(cfg, tokenizer))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    stamp_file.write_text(stamp)
    return directory
