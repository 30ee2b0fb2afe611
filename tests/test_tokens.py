"""The built-in tiny model sees any text, and `forge env check` says how an env's text
tokenizes for the model it will train, failing when the model would read <unk>."""

from __future__ import annotations

import pytest
from family_tokenizers import word_level_tokenizer
from transformers import PreTrainedTokenizerFast

from forge.env.base import Env, StepResult
from forge.env.check import check_env
from forge.env.tokens import tokenize_env_text
from forge.models.tiny import build_tokenizer

ANY_TEXT = 'Reach 17 with +1 / +3 / x2 moves.\n\tTry:  ünïcode 😀 {"json": [1, 2]}'


class ReachEnv(Env):
    system_prompt = "Reach the target number with moves +1, +3 or x2. Reply with one move."

    @classmethod
    def generate_tasks(cls, num_tasks, seed, **kwargs):
        return [{"task_id": str(i), "target": 10 + i} for i in range(num_tasks)]

    def reset(self, task, seed):
        self.value, self.target = 1, task["target"]
        return f"You are at {self.value}; reach {self.target}."

    def step(self, action):
        self.value += 1
        done = self.value >= self.target
        return StepResult(f"Now at {self.value}.", float(done), done)


def test_the_tiny_tokenizer_represents_any_text_without_unknown_tokens():
    tokenizer = build_tokenizer()
    ids = tokenizer(ANY_TEXT, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == ANY_TEXT


def test_the_tiny_tokenizer_keeps_known_words_as_single_tokens():
    tokenizer = build_tokenizer()
    ids = tokenizer("guess a number from 0 to 3", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["▁guess", "▁a", "▁number", "▁from", "▁0", "▁to", "▁3"]


def test_a_generated_turn_tokenizes_as_the_rendered_history_does():
    from forge.rollout.chat import ChatFormat

    tokenizer = build_tokenizer()
    chat = ChatFormat(tokenizer)
    reply = tokenizer("2", add_special_tokens=False)["input_ids"]
    played = chat.prompt_ids("guess a number") + reply + [chat.eos_token_id]
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "guess a number"}, {"role": "assistant", "content": "2"}], tokenize=False
    )
    assert played == tokenizer(rendered, add_special_tokens=False)["input_ids"]


def test_env_check_reports_how_the_env_text_tokenizes_for_the_tiny_model():
    report = check_env(ReachEnv, tokenizer=("the built-in tiny model", build_tokenizer()))
    tokens = next(c for c in report.checks if c.name == "tokens")
    assert tokens.passed, report.render()
    assert tokens.detail.startswith("for the built-in tiny model: prompt ")
    assert "no unknown tokens" in tokens.detail and "spelled in bytes" in tokens.detail


def test_env_check_fails_text_the_model_would_read_as_unknown(tmp_path):
    report = check_env(ReachEnv, tokenizer=("a word-level model", word_level_tokenizer("you", "are", "at")))
    tokens = next(c for c in report.checks if c.name == "tokens")
    assert not tokens.passed and not report.passed
    assert "unknown tokens: the model cannot see 'Reach'" in tokens.detail
    assert "model.path" in tokens.fix


def test_tokenize_env_text_counts_prompt_and_observation_tokens():
    report = tokenize_env_text(build_tokenizer(), ["guess a number", "higher", "lower"])
    assert report.unknown_tokens == 0 and report.byte_tokens == 0
    assert report.prompt_tokens == 8  # <|im_start|> user guess a number <|im_end|> <|im_start|> assistant
    assert report.observation_tokens == [6, 6]


def test_the_cli_checks_tokens_with_the_configs_model(capsys):
    from forge.cli import main

    main(["env", "check", "examples.custom_env:ReverseEnv", "--config", "configs/smoke.yaml"])
    assert "PASS  tokens           for the built-in tiny model: prompt" in capsys.readouterr().out


def test_the_cli_names_a_model_folder_it_cannot_read(capsys):
    from forge.cli import main

    assert main(["env", "check", "guess_number", "--model", "/no/such/model"]) == 2
    assert "model '/no/such/model' is not a folder" in capsys.readouterr().err


# Known words, numbers, words the tiny vocabulary lacks (byte pieces), non-ASCII, and the chat
# template's special tokens.
TEXTS_FOR_ANY_READER = [
    "guess a number from 0 to 15",
    "what is 3 plus 4",
    "héllo wörld 😀",
    "<|im_start|>user guess a number from 0 to 15 héllo 3<|im_end|>",
    ANY_TEXT,
]


def test_a_default_tiny_checkpoint_reads_the_same_through_autotokenizer(tmp_path):
    """A smoke checkpoint opened with plain transformers (`AutoTokenizer`, as HF pipelines,
    vLLM and SGLang do) tokenizes and decodes as Forge's own loader does. With the qwen2
    architecture it did not: transformers 5 forces Qwen2Tokenizer, which read 'what is 3 plus
    4' as no tokens at all."""
    from transformers import AutoTokenizer

    from forge.config import TinyModelConfig
    from forge.models.loading import load_tokenizer
    from forge.models.tiny import save_tiny_checkpoint

    folder = save_tiny_checkpoint(TinyModelConfig(), tmp_path / "tiny")
    forge_reader, auto = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    for text in TEXTS_FOR_ANY_READER:
        ids = forge_reader(text)["input_ids"]
        assert ids and auto(text)["input_ids"] == ids, text
        for skip in (False, True):
            assert auto.decode(ids, skip_special_tokens=skip) == forge_reader.decode(
                ids, skip_special_tokens=skip
            )
        if "<|" not in text:
            assert auto.decode(ids) == text
    messages = [
        {"role": "system", "content": "guess a number"},
        {"role": "user", "content": "what is 3 plus 4"},
    ]
    assert (
        auto.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
        == (
            forge_reader.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
        )
    )
    assert (auto.eos_token_id, auto.pad_token_id) == (forge_reader.eos_token_id, forge_reader.pad_token_id)


def test_a_qwen2_tiny_checkpoint_reads_back_as_the_readme_says_not_through_autotokenizer(tmp_path):
    """README (the run's files): with `model.tiny.architecture: qwen2`, load the tiny model's
    tokenizer with PreTrainedTokenizerFast (or forge's load_tokenizer). transformers 5's
    AutoTokenizer builds Qwen2Tokenizer for every qwen2 checkpoint, whatever its
    tokenizer_config declares, and that byte-level rebuild reads this metaspace tokenizer's
    text as nothing. Should AutoTokenizer ever read it right, this test fails and the README's
    warning can go."""
    from transformers import AutoTokenizer

    from forge.config import TinyModelConfig
    from forge.models.loading import load_tokenizer
    from forge.models.tiny import save_tiny_checkpoint

    folder = save_tiny_checkpoint(TinyModelConfig(architecture="qwen2"), tmp_path / "tiny")
    expected = build_tokenizer()(ANY_TEXT, add_special_tokens=False)["input_ids"]
    for tokenizer in (PreTrainedTokenizerFast.from_pretrained(folder), load_tokenizer(folder)):
        assert tokenizer(ANY_TEXT, add_special_tokens=False)["input_ids"] == expected
        assert tokenizer.decode(expected) == ANY_TEXT
    auto = AutoTokenizer.from_pretrained(folder)
    assert type(auto).__name__ == "Qwen2Tokenizer"
    assert auto("guess a number", add_special_tokens=False)["input_ids"] == []


def test_a_tiny_checkpoint_cached_under_the_old_qwen2_default_is_rebuilt_as_llama(tmp_path):
    """The folder stamp names the architecture, so a smoke folder that holds a qwen2 build (the
    default before llama) is rebuilt, not reused with the tokenizer AutoTokenizer misreads."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    from forge.config import TinyModelConfig
    from forge.models.loading import load_tokenizer
    from forge.models.tiny import save_tiny_checkpoint

    folder = save_tiny_checkpoint(TinyModelConfig(architecture="qwen2"), tmp_path / "tiny")
    assert save_tiny_checkpoint(TinyModelConfig(), folder) == folder
    assert AutoConfig.from_pretrained(folder).model_type == "llama"
    with safe_open(folder / "model.safetensors", "pt") as weights:
        assert not [name for name in weights.keys() if name.endswith("_proj.bias")]
    assert (
        AutoTokenizer.from_pretrained(folder)("what is 3 plus 4")["input_ids"]
        == (load_tokenizer(folder)("what is 3 plus 4")["input_ids"])
    )


def test_env_check_reads_the_tokenizer_of_a_local_checkpoint_folder(tmp_path):
    from forge.env.tokens import load_check_tokenizer

    build_tokenizer().save_pretrained(tmp_path)
    tokenizer, name = load_check_tokenizer(str(tmp_path))
    assert name == str(tmp_path) and tokenizer.chat_template


def test_the_first_prompt_check_refuses_env_words_the_model_cannot_see(tmp_path):
    from forge.config import ConfigError
    from forge.env.tokens import first_prompt_check

    check = first_prompt_check(word_level_tokenizer("you", "are", "at"), "my-model", "reach", 1024, 16)
    with pytest.raises(ConfigError, match="the model cannot see 'Reach'"):
        check("Reach 9 from 2.", None, None)


def test_a_dry_run_refuses_a_first_prompt_that_leaves_no_room_for_a_reply(capsys):
    from forge.cli import main

    overrides = ["env.name=examples.custom_env:ReverseEnv", "env.kwargs={}", "rollout.max_context_tokens=24"]
    assert main(["train", "configs/smoke.yaml", *overrides, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "first prompt is" in err and "over rollout.max_context_tokens=24" in err and "Traceback" not in err
