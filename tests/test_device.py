"""Where models run: `model.device` and the GPU reservations decide it, the same way in the
trainer, the rollout workers and the gateway. The CUDA tests run where torch sees a GPU
(the prepared device check, bench/gpu_check.sh); on CPU they are skipped."""

from __future__ import annotations

import pytest
import torch
from step_gradient import step_gradient

from forge.config import Config, ConfigError, load_config
from forge.models.loading import resolve_device
from forge.train.trainer import Trainer
from forge.types import Sample

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def test_cpu_is_cpu_and_auto_follows_the_reservation():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("cpu", reserved_gpus=1).type == "cpu"
    assert resolve_device("auto", reserved_gpus=0).type == "cpu"  # even on a machine with a GPU
    assert resolve_device("auto").type == ("cuda" if CUDA else "cpu")


@pytest.mark.skipif(CUDA, reason="checks the error where torch sees no GPU")
@pytest.mark.parametrize(("setting", "reserved"), [("cuda", None), ("cuda", 0), ("auto", 1), ("auto", 0.5)])
def test_asking_for_a_gpu_torch_cannot_see_is_a_clear_error(setting, reserved):
    with pytest.raises(RuntimeError, match="needs a GPU in this process.*model.device: cpu"):
        resolve_device(setting, reserved_gpus=reserved)


def test_an_unknown_device_is_refused_by_the_config_and_by_the_resolver():
    with pytest.raises(ConfigError, match="model.device"):
        load_config(overrides=["model.device=gpu"])
    with pytest.raises(ValueError, match="'auto', 'cpu' or 'cuda'"):
        resolve_device("gpu")


@pytest.mark.skipif(CUDA, reason="checks the error where torch sees no GPU")
def test_a_trainer_or_rollout_worker_that_reserves_a_gpu_asks_torch_for_it(tiny_checkpoint):
    # The reservation reaches resolve_device from each place that loads a model.
    from forge.rollout.worker import RolloutWorker

    cfg = Config()
    cfg.train.num_gpus = 1
    with pytest.raises(
        RuntimeError, match=r"model.device='auto' needs a GPU in this process \(it reserved 1\)"
    ):
        Trainer(tiny_checkpoint, cfg.model, cfg.train, cfg.trainer, seed=0)
    cfg.rollout.num_gpus_per_worker = 0.5
    with pytest.raises(RuntimeError, match=r"\(it reserved 0.5\)"):
        RolloutWorker(str(tiny_checkpoint), cfg.model, cfg.env, cfg.rollout, 0.5, seed=0)


@pytest.mark.skipif(CUDA, reason="checks the error where torch sees no GPU")
def test_model_device_cuda_without_a_gpu_is_one_line_before_anything_starts(
    tiny_checkpoint, monkeypatch, capsys
):
    # Each actor of a local run failed its start with its own traceback (~40 lines), and
    # forge eval ended in a traceback.
    from forge.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["train", "smoke", "model.device=cuda", "--dry-run"]) == 2
    eval_args = ["eval", "smoke", "--checkpoint", str(tiny_checkpoint), "model.device=cuda", "--tasks", "1"]
    assert main([*eval_args, "--episodes", "1", "--no-progress"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "needs a GPU" in line]
    assert len(errors) == 2 and all(
        line.startswith("forge: model.device='cuda' needs a GPU") for line in errors
    )


def test_the_default_trainer_reserves_no_gpu_and_runs_on_cpu(tiny_checkpoint):
    cfg = Config()
    trainer = Trainer(tiny_checkpoint, cfg.model, cfg.train, cfg.trainer, seed=0)
    assert trainer.device.type == "cpu"
    assert {p.device.type for p in trainer.model.parameters()} == {"cpu"}


def batch(seed: int = 0) -> list[Sample]:
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(5, 30, (12,), generator=generator).tolist()
    samples = []
    for i in range(6):
        tokens = prompt + torch.randint(5, 30, (4 + i,), generator=generator).tolist()
        mask = [0] * len(prompt) + [1] * (len(tokens) - len(prompt))
        samples.append(Sample(tokens, mask, [-3.0] * len(tokens), [0] * len(tokens), advantage=(-1.0) ** i))
    return samples


def step_on(device: str, tiny_checkpoint, packing: str, kl_coef: float) -> tuple[dict, torch.Tensor]:
    """One train step's metrics and gradient (`step_gradient`) on `device`."""
    cfg = Config()
    cfg.model.device = device
    cfg.trainer.packing = packing
    cfg.train.kl_coef = kl_coef
    trainer = Trainer(tiny_checkpoint, cfg.model, cfg.train, cfg.trainer, seed=0)
    assert {p.device.type for p in trainer.model.parameters()} == {device}
    metrics, grad = step_gradient(trainer, batch())
    assert all(w.device.type == "cpu" for w in trainer.weights().values())  # what workers receive
    return metrics, grad


@needs_cuda
@pytest.mark.parametrize("packing", ["tree", "padded"])
@pytest.mark.parametrize("kl_coef", [0.0, 0.1])  # 0.1: the frozen reference runs on the GPU too
def test_a_training_step_on_the_gpu_equals_the_step_on_cpu(tiny_checkpoint, packing, kl_coef):
    cpu_metrics, cpu_grad = step_on("cpu", tiny_checkpoint, packing, kl_coef)
    gpu_metrics, gpu_grad = step_on("cuda", tiny_checkpoint, packing, kl_coef)
    assert gpu_metrics["loss"] == pytest.approx(cpu_metrics["loss"], rel=1e-4, abs=1e-6)
    assert gpu_metrics["grad_norm"] == pytest.approx(cpu_metrics["grad_norm"], rel=1e-4)
    assert cpu_grad.norm() > 0
    assert ((gpu_grad - cpu_grad).norm() / cpu_grad.norm()).item() <= 1e-4


@needs_cuda
def test_a_rollout_engine_on_the_gpu_samples_with_the_logprobs_of_a_cpu_forward(tiny_checkpoint):
    from forge.config import ModelConfig
    from forge.models.loading import load_model, load_tokenizer
    from forge.rollout.engines.hf import HFEngine
    from forge.rollout.engines.protocol import GenerationRequest

    tokenizer = load_tokenizer(tiny_checkpoint)
    gpu_model = load_model(tiny_checkpoint, ModelConfig(), device=resolve_device("cuda"))
    cpu_model = load_model(tiny_checkpoint, ModelConfig())
    engine = HFEngine(gpu_model, [tokenizer.eos_token_id], tokenizer.pad_token_id, seed=0)
    prompts = [[5, 6, 7, 8, 9 + i] for i in range(3)]
    results = engine.generate([GenerationRequest(p, 6, episode_id=str(i)) for i, p in enumerate(prompts)])
    for prompt, result in zip(prompts, results, strict=True):
        assert result.token_ids
        with torch.no_grad():
            logits = cpu_model(input_ids=torch.tensor([prompt + result.token_ids])).logits[0]
        expected = [
            torch.log_softmax(logits[len(prompt) - 1 + i], -1)[t].item()
            for i, t in enumerate(result.token_ids)
        ]
        assert result.logprobs == pytest.approx(expected, abs=1e-4)
