"""What FSDP2 saves each data-parallel trainer process, and what it costs, against DDP.

Two gloo processes (`DistributedTrainer`, one CPU thread each) train the same batch under
`train.strategy` ddp and fsdp, alternating `--repeats` times so drift in the machine's speed
falls on both. Per strategy, per process (the larger of the two ranks, median over repeats):

- `weights_mb`: the trainable weights this process holds (its shards under FSDP2);
- `gradients_mb`: the gradients it holds at the optimizer step (sharded under FSDP2);
- `optimizer_mb`: its AdamW state (both moments, sharded under FSDP2);
- `reference_mb`: the frozen KL reference of this full fine-tune (`train.kl_coef` 0.05;
  sharded under FSDP2 as well);
- `training_state_mb`: the four together, what a process keeps besides activations;
- `loading_mb_first` / `loading_mb_others`: how far building the trainer (policy and
  reference) raised the process's resident memory (VmHWM over the RSS before it), for the
  first process and the largest of the others. Under FSDP2 only the first reads the
  checkpoint; the others build on the meta device and receive their shards;
- `step_seconds`: a training step (forward, backward, optimizer step), median over `--steps`
  after one warm-up step.

`fsdp_over_ddp` divides fsdp by ddp. Prints one JSON object and writes
bench/results/fsdp.json.

    python -m bench.fsdp                 # 4 layers, hidden 512; 3 repeats of 5 steps (~2 minutes)

On CPU over gloo FSDP2's all-gathers and reduce-scatters are slow copies, so expect the
step to cost more there; the memory columns are what carries over to GPUs. (Process
memory beyond loading is not compared: it is mostly torch's own.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from bench.memory import reset_high_water, resident_mb
from bench.ranks import run_ranks, timed_steps
from bench.report import save_result
from forge.config import ModelConfig, TinyModelConfig, TrainConfig, TrainerConfig
from forge.types import Sample

RESULTS = Path(__file__).parent / "results" / "fsdp.json"
MODEL = TinyModelConfig(hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=4, intermediate_size=2048)
STRATEGIES = ("ddp", "fsdp")
WORLD_SIZE = 2


def batch(num_samples: int = 8, length: int = 256, seed: int = 0) -> list[Sample]:
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(num_samples):
        tokens = torch.randint(8, 40, (length,), generator=generator).tolist()
        mask = [0] * 32 + [1] * (length - 32)
        samples.append(Sample(tokens, mask, [-1.0 * m for m in mask], [0] * length, advantage=i - 3.5))
    return samples


def local_megabytes(tensors: list[torch.Tensor]) -> float:
    """Bytes this process holds for `tensors` (its shard of a DTensor)."""
    from torch.distributed.tensor import DTensor

    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local) / 2**20


def child(strategy: str, model_dir: str, steps: int, out: str) -> None:
    """One rank: train, time, and write what it holds."""
    import torch.distributed as dist

    from forge.train.distributed import DistributedTrainer

    torch.set_num_threads(1)
    import peft  # noqa: F401  (imported before the baseline: their code is not the model's memory)
    import transformers.models.qwen2.modeling_qwen2  # noqa: F401

    before = resident_mb("VmRSS")
    reset_high_water()
    trainer = DistributedTrainer(
        model_dir,
        ModelConfig(path=model_dir),
        TrainConfig(learning_rate=1e-4, kl_coef=0.05),
        TrainerConfig(packing="padded"),
        seed=0,
        strategy=strategy,
    )
    loading = resident_mb("VmHWM") - before
    gradients: list[float] = []
    clip = trainer.clip_gradients

    def measured_clip() -> torch.Tensor:  # runs once the step's gradients are all there
        gradients.append(local_megabytes([p.grad for p in trainer.trainable.values() if p.grad is not None]))
        return clip()

    trainer.clip_gradients = measured_clip
    samples = batch()
    seconds = timed_steps(trainer, samples, steps)
    state = [t for s in trainer._torch_optimizer().state.values() for t in s.values() if t.dim() > 0]
    report = {
        "weights_mb": local_megabytes(list(trainer.trainable.values())),
        "gradients_mb": max(gradients),
        "optimizer_mb": local_megabytes(state),
        "reference_mb": local_megabytes(list(trainer.reference.parameters())),
        "step_seconds": statistics.median(seconds),
        "loading_mb": loading,
    }
    report["training_state_mb"] = sum(
        report[key] for key in ("weights_mb", "gradients_mb", "optimizer_mb", "reference_mb")
    )
    Path(f"{out}.rank{dist.get_rank()}").write_text(json.dumps(report))
    trainer.close()


def run(strategy: str, model_dir: Path, steps: int, workdir: Path) -> dict[str, float]:
    """Two ranks under `strategy`; each measure is the larger rank's (loading: the first's and
    the others')."""
    out = workdir / strategy
    run_ranks("bench.fsdp", [strategy, str(model_dir), str(steps), str(out)], WORLD_SIZE)
    reports = [json.loads(Path(f"{out}.rank{rank}").read_text()) for rank in range(WORLD_SIZE)]
    measures = {key: max(r[key] for r in reports) for key in reports[0] if key != "loading_mb"}
    measures["loading_mb_first"] = reports[0]["loading_mb"]
    measures["loading_mb_others"] = max(r["loading_mb"] for r in reports[1:])
    return measures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per strategy, alternating")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run (after one warm-up)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--child", nargs=4, metavar=("STRATEGY", "MODEL_DIR", "STEPS", "OUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        strategy, model_dir, steps, out = args.child
        child(strategy, model_dir, int(steps), out)
        return

    from forge.models.tiny import save_tiny_checkpoint

    runs: dict[str, list[dict[str, float]]] = {s: [] for s in STRATEGIES}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_tiny_checkpoint(MODEL, Path(tmp) / "model", seed=0)
        for _ in range(args.repeats):
            for strategy in STRATEGIES:
                runs[strategy].append(run(strategy, model_dir, args.steps, Path(tmp)))
    results = {
        s: {key: round(statistics.median(r[key] for r in runs[s]), 4) for key in runs[s][0]}
        for s in STRATEGIES
    }
    result = {
        "model": MODEL.model_dump(),
        "processes": WORLD_SIZE,
        "batch": {"samples": len(batch()), "tokens_per_sample": len(batch()[0].token_ids)},
        "repeats": args.repeats,
        "steps": args.steps,
        **results,
        "fsdp_over_ddp": {
            key: round(results["fsdp"][key] / results["ddp"][key], 3) for key in results["ddp"]
        },
        "runs": runs,
    }
    print(json.dumps(result, indent=2))
    save_result(result, args.output)


if __name__ == "__main__":
    main()
