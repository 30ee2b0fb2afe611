"""Full fine-tuning of a pretrained-size checkpoint at the tiny model's learning rate is said
at the start: Forge's default and the CPU configs' 1e-3 would wreck a real model in a few
steps, where RL on one runs at 1e-6 to 1e-5."""

from transformers import LlamaConfig

from forge.config import load_config
from forge.train.trainer import learning_rate_note

PRETRAINED = LlamaConfig(hidden_size=1024, num_hidden_layers=16, vocab_size=32000)  # ~0.2B
TINY = LlamaConfig(hidden_size=64, num_hidden_layers=2, vocab_size=512)


def note(overrides, model_config):
    cfg = load_config(None, ["model.path=/ckpt", *overrides])
    return learning_rate_note(cfg.train, cfg.model, model_config)


def test_the_default_rate_on_a_pretrained_size_checkpoint_is_said_with_what_to_set():
    said = note([], PRETRAINED)
    assert said is not None
    assert "train.learning_rate=0.001 trains every weight of a ~0.2B-parameter checkpoint" in said
    assert said.endswith("set train.learning_rate")
    assert note(["train.learning_rate=3e-4"], PRETRAINED) is not None  # set, but still the tiny scale


def test_rl_rates_lora_and_tiny_checkpoints_are_not_said():
    assert note(["train.learning_rate=1e-6"], PRETRAINED) is None
    assert note(["train.learning_rate=1e-4"], PRETRAINED) is None
    assert note(["model.lora.enabled=true"], PRETRAINED) is None  # adapters take larger rates
    assert note([], TINY) is None  # a saved tiny random model learns at 1e-3
    assert note([], object()) is None  # a config without the sizes: nothing to judge by
