"""The trainer's packing switch changes speed and memory, not results."""

import json

import pytest
import torch

from forge.config import ModelConfig, TinyModelConfig, TrainConfig, TrainerConfig
from forge.types import Sample


def group_samples(vocab: int) -> list[Sample]:
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(8, vocab, (30,), generator=generator).tolist()
    samples = []
    for i in range(6):
        response = torch.randint(8, vocab, (5 + 3 * i,), generator=generator).tolist()
        tokens = prompt + response
        mask = [0] * len(prompt) + [1] * len(response)
        behaviour = [-2.0 * m for m in mask]
        samples.append(Sample(tokens, mask, behaviour, [0] * len(tokens), advantage=float(i - 2.5)))
    return samples


def one_step(model_dir, packing: str, samples: list[Sample]) -> tuple[dict, torch.Tensor]:
    """The step's metrics and its weight update, flattened."""
    from forge.train.trainer import Trainer

    trainer = Trainer(
        model_dir,
        ModelConfig(path=str(model_dir)),
        TrainConfig(),
        TrainerConfig(packing=packing, max_tokens_per_microbatch=128),
    )
    before = torch.cat([p.detach().flatten().clone() for p in trainer.model.parameters()])
    metrics = trainer.train_step(samples)
    after = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    return metrics, after - before


def test_tree_and_padded_packing_train_the_same_step(tmp_path):
    from forge.models.tiny import save_tiny_checkpoint

    model_dir = save_tiny_checkpoint(TinyModelConfig(), tmp_path / "model")
    samples = group_samples(json.loads((model_dir / "config.json").read_text())["vocab_size"])
    tree_metrics, tree_update = one_step(model_dir, "tree", samples)
    padded_metrics, padded_update = one_step(model_dir, "padded", samples)
    assert tree_metrics["tree_token_ratio"] > 1.0 > padded_metrics["tree_token_ratio"]
    assert tree_metrics["loss"] == pytest.approx(padded_metrics["loss"], rel=1e-5, abs=1e-7)
    assert tree_metrics["grad_norm"] == pytest.approx(padded_metrics["grad_norm"], rel=1e-5)
    # AdamW divides by sqrt(v), which turns float noise on near-zero gradients into visible
    # moves of single weights; the update as a whole still agrees closely.
    assert ((tree_update - padded_update).norm() / padded_update.norm()).item() <= 1e-3
