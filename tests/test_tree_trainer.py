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


def one_step(
    model_dir, packing: str, samples: list[Sample], warm_steps: int = 0, tokens: int = 128, **train
) -> tuple[dict, torch.Tensor]:
    """The metrics and weight update of a trainer's step on `samples`, after `warm_steps`
    steps on them (after one the policy has moved from the reference: the KL term has a
    gradient); `train` sets TrainConfig's fields."""
    from forge.train.trainer import Trainer

    trainer = Trainer(
        model_dir,
        ModelConfig(path=str(model_dir)),
        TrainConfig(**train),
        TrainerConfig(packing=packing, max_tokens_per_microbatch=tokens),
    )
    for _ in range(warm_steps):
        trainer.train_step(samples)
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


def multi_turn_samples(vocab: int) -> list[Sample]:
    """A group whose first three replies sampled the same first six tokens (the tree shares
    trained tokens between samples of different advantages), then an observation and a
    second reply (trained spans with a gap), with behaviour logprobs off the policy's."""
    generator = torch.Generator().manual_seed(0)

    def tokens(n: int) -> list[int]:
        return torch.randint(8, vocab, (n,), generator=generator).tolist()

    prompt, shared_reply, observation = tokens(20), tokens(6), tokens(5)
    samples = []
    for i in range(6):
        reply = shared_reply + tokens(2 + i) if i < 3 else tokens(4 + i)
        second = tokens(3 + i)
        sequence = prompt + reply + observation + second
        mask = [0] * len(prompt) + [1] * len(reply) + [0] * len(observation) + [1] * len(second)
        behaviour = [-3.0 - 0.3 * torch.rand(1, generator=generator).item() if m else 0.0 for m in mask]
        samples.append(Sample(sequence, mask, behaviour, [0] * len(sequence), advantage=float(i - 2.5)))
    return samples


@pytest.mark.slow  # 12 cases of two trainers' two steps: ~2 min
@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
@pytest.mark.parametrize("loss", ["pg", "ppo_clip", "cispo", "gspo"])
def test_every_loss_and_aggregation_trains_the_same_step_on_the_tree_as_padded(tmp_path, loss, aggregation):
    from forge.models.tiny import save_tiny_checkpoint

    model_dir = save_tiny_checkpoint(TinyModelConfig(), tmp_path / "model")
    samples = multi_turn_samples(json.loads((model_dir / "config.json").read_text())["vocab_size"])
    train = {
        "loss": loss,
        "loss_aggregation": aggregation,
        "kl_coef": 0.1,
        "entropy_coef": 0.01,
        "learning_rate": 1e-3,
    }
    tree_metrics, tree_update = one_step(model_dir, "tree", samples, warm_steps=1, tokens=64, **train)
    padded_metrics, padded_update = one_step(model_dir, "padded", samples, warm_steps=1, tokens=64, **train)
    assert tree_metrics["tree_token_ratio"] > 1.0  # the shared replies' tokens computed once
    for key in ("loss", "policy_loss", "grad_norm", "ref_kl", "entropy"):
        assert tree_metrics[key] == pytest.approx(padded_metrics[key], rel=1e-4, abs=1e-7), key
    assert padded_metrics["ref_kl"] > 0
    assert ((tree_update - padded_update).norm() / padded_update.norm()).item() <= 1e-2
