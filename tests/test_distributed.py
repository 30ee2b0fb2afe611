"""Two gloo processes with half the batch each take the same optimizer step as one process
with the whole batch, under DDP and under FSDP2 (which shards on CPU too): also when their
halves pack into different numbers of micro-batches, under FSDP2 with gradient checkpointing,
with LoRA adapters and a KL term, in a full fine-tune with a KL term to a sharded reference,
and with two optimizer steps per batch; and what they publish, checkpoint and save is what the
one process does.

Starting a process (torch, transformers, a model) costs more than a case's step, so one
process runs every case's single-process step in turn, and one pair of gloo processes every
case's group step; each parametrized test then compares its own case's results."""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

STEPS = textwrap.dedent("""
    import contextlib, os, sys, torch
    from unittest import mock
    import transformers
    from forge.config import LoraConfig, ModelConfig, TrainConfig, TrainerConfig
    from forge.types import Sample

    model_dir, out_dir, runs = sys.argv[1], sys.argv[2], sys.argv[3:]
    torch.set_num_threads(1)

    def refuse(*args, **kwargs):
        raise AssertionError("a process other than the first read the checkpoint's weights")

    def step(strategy, case):
        out = os.path.join(out_dir, f"{strategy}-{case}.pt")
        distributed = strategy != "single"
        generator = torch.Generator().manual_seed(0)
        samples = []
        if case == "even":
            for i in range(6):
                tokens = torch.randint(8, 40, (10 + 3 * i,), generator=generator).tolist()
                mask = [0] * 5 + [1] * (len(tokens) - 5)
                samples.append(Sample(tokens, mask, [-1.5 * m for m in mask], [0] * len(tokens), advantage=i - 2.5))
            trainer_cfg, steps = TrainerConfig(packing="padded"), 1
        elif case in ("lora", "kl"):
            # The same batch through LoRA adapters with a KL term to the adapter-free model, or
            # a full fine-tune with a KL term to a frozen copy of the model (sharded under FSDP2).
            for i in range(6):
                tokens = torch.randint(8, 40, (10 + 3 * i,), generator=generator).tolist()
                mask = [0] * 5 + [1] * (len(tokens) - 5)
                samples.append(Sample(tokens, mask, [-1.5 * m for m in mask], [0] * len(tokens), advantage=i - 2.5))
            trainer_cfg, steps = TrainerConfig(packing="tree"), 2
        elif case == "minibatches":
            # Two optimizer steps per batch, each on a shuffled half: every process cuts the same
            # halves and trains its share of each, as the single process trains each half. Two
            # GRPO-like groups (a shared prompt each) and one lone sample; one zero advantage.
            for g in range(3):
                prompt = torch.randint(8, 40, (12,), generator=generator).tolist()
                for i in range(3 if g < 2 else 1):
                    tokens = prompt + torch.randint(8, 40, (4 + 2 * i,), generator=generator).tolist()
                    mask = [0] * 12 + [1] * (len(tokens) - 12)
                    samples.append(Sample(tokens, mask, [-1.5 * m for m in mask], [0] * len(tokens),
                                          advantage=0.0 if (g, i) == (0, 1) else i - 1.0 + g))
            trainer_cfg, steps = TrainerConfig(packing="tree"), 2
        else:
            # Two unrelated 40-token samples (2 micro-batches of the 64-token budget) and a family
            # of three that share 48 tokens (one 60-token tree) plus one with nothing to train.
            # The split keeps the family on one process and balances tokens, so one process
            # runs 2 micro-batches and the other 1 (checked below). Two steps, so the second
            # starts from the first.
            prefix = [39] + torch.randint(20, 40, (47,), generator=generator).tolist()
            for i in range(6):
                tokens = (torch.randint(8, 20, (40,), generator=generator).tolist() if i < 2
                          else prefix + torch.randint(8, 40, (4,), generator=generator).tolist())
                mask = [0] * 3 + [0 if i == 5 else 1] * (len(tokens) - 3)
                samples.append(Sample(tokens, mask, [-1.5 * m for m in mask], [0] * len(tokens), advantage=i - 2.5))
            # FSDP2 recomputes each block's activations in the backward here: the same step.
            trainer_cfg = TrainerConfig(packing="tree", max_tokens_per_microbatch=64,
                                        gradient_checkpointing=strategy == "fsdp")
            steps = 2
            from forge.train.distributed import shard
            from forge.train.trainer import trainable
            from forge.tree import microbatches
            counts = [len(microbatches(shard([s for s in samples if trainable(s)], rank, 2), "tree", 64, "auto"))
                      for rank in range(2)]
            assert sorted(counts) == [1, 2], counts
        lora = LoraConfig(enabled=case == "lora")
        train_cfg = TrainConfig(learning_rate=0.01, max_grad_norm=0.05, kl_coef=0.1 if case in ("lora", "kl") else 0.0,
                                minibatches_per_step=2 if case == "minibatches" else 1)
        args = (model_dir, ModelConfig(path=model_dir, lora=lora), train_cfg, trainer_cfg)

        def make():
            if distributed:
                from forge.train.distributed import DistributedTrainer
                trainer = DistributedTrainer(*args, seed=0, strategy=strategy)
                assert trainer.world_size == 2
                return trainer
            from forge.train.trainer import Trainer
            return Trainer(*args, seed=0)

        trainer = make()
        if strategy == "fsdp":  # each process holds half of every weight
            from torch.distributed.tensor import DTensor
            for name, param in trainer.trainable.items():
                assert isinstance(param, DTensor), name
                assert param.to_local().shape[0] <= -(-param.shape[0] // 2), name
            if case == "kl":  # and of the frozen reference's
                for name, param in trainer.reference.named_parameters():
                    assert isinstance(param, DTensor) and not param.requires_grad, name
                    assert param.to_local().shape[0] <= -(-param.shape[0] // 2), name
        metrics = trainer.train_step(samples)
        if case == "uneven":
            # Every process saves the state after the first step (the first writes it), then a
            # new trainer resumes, from the single process's file: the layout is the same.
            os.makedirs(out + ".state", exist_ok=True)
            trainer.save_state(out + ".state")
            trainer = make()
            trainer.load_state(os.path.join(out_dir, f"single-{case}.pt.state"))
        for _ in range(steps - 1):
            metrics = trainer.train_step(samples)
        if case != "even":
            trainer.save(out + ".model")  # under LoRA: the adapters merged into the gathered base
        weights = trainer.weights()  # whole tensors, gathered under FSDP2
        if not distributed or trainer.accelerator.is_main_process:
            torch.save({"params": weights, "grad_norm": metrics["grad_norm"], "metrics": metrics}, out)
        return trainer

    trainer = None
    for run in runs:
        strategy, case = run.split("-")
        print(f"--- {run}", flush=True)  # whose output follows, in a failure's report
        # Under FSDP2 only the first process reads the checkpoint; the others get their
        # shards (and the buffers) from it.
        refused = mock.patch.object(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
        with refused if strategy == "fsdp" and os.environ["RANK"] != "0" else contextlib.nullcontext():
            trainer = step(strategy, case)
    if "WORLD_SIZE" in os.environ:  # the group ends once, after every case
        trainer.close()
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    model_dir: Path, out_dir: Path, world_size: int, runs: list[str], script: str = STEPS
) -> str | None:
    """`runs` ("ddp-even", ...) of `script` in turn in one process, or in each of a pair of gloo
    processes: None if every process ended well, else the output of those that did not."""
    port = free_port()
    processes = []
    for rank in range(world_size):
        env = dict(
            os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""
        )  # gloo on CPU, also on a GPU machine
        if world_size > 1:
            env.update(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(world_size),
                LOCAL_WORLD_SIZE=str(world_size),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            )
        processes.append(
            subprocess.Popen(
                [sys.executable, "-c", script, str(model_dir), str(out_dir), *runs],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    for process in processes:
        try:
            outputs.append(process.communicate(timeout=120 + 60 * len(runs))[0])
        except subprocess.TimeoutExpired:  # processes stuck in a collective: fail, do not hang
            for p in processes:
                p.kill()
            outputs.append(process.communicate()[0] + "\n(timed out)")
    failed = [
        f"rank {rank}:\n{output[-3000:]}"
        for rank, (process, output) in enumerate(zip(processes, outputs, strict=True))
        if process.returncode != 0
    ]
    return "\n".join(failed) or None


def run_each(model_dir: Path, out_dir: Path, world_size: int, runs: list[str]) -> dict[str, str]:
    """Runs `runs` in as few processes as they allow: a run that fails ends its processes and is
    answered with their output, and the runs after it go on in new ones. Returns the failures."""
    failures = {}
    while runs:
        output = launch(model_dir, out_dir, world_size, runs)
        if output is None:
            break
        finished = [(out_dir / f"{run}.pt").exists() for run in runs]
        failed = finished.index(False) if False in finished else len(runs) - 1  # else: in close()
        failures[runs[failed]] = output
        runs = runs[failed + 1 :]
    return failures


CASES = [
    ("ddp", "even"),
    ("ddp", "uneven"),
    ("ddp", "minibatches"),
    ("fsdp", "even"),
    ("fsdp", "uneven"),
    ("fsdp", "lora"),
    ("fsdp", "kl"),
    ("fsdp", "minibatches"),
]


@pytest.fixture(scope="module")
def steps(request, tiny_checkpoint, tmp_path_factory):
    """Every selected case's single-process and group results, in a folder, and the runs that
    failed with their processes' output."""
    selected = {
        tuple(item.callspec.params[key] for key in ("strategy", "case"))
        for item in request.session.items
        if item.originalname == "test_two_gloo_processes_with_half_the_batch_take_the_single_process_step"
    }
    cases = [c for c in CASES if c in selected]
    out_dir = tmp_path_factory.mktemp("steps")
    single = list(dict.fromkeys(f"single-{case}" for _, case in cases))
    failures = run_each(tiny_checkpoint, out_dir, 1, single)  # first: the groups resume from its states
    failures.update(run_each(tiny_checkpoint, out_dir, 2, [f"{s}-{c}" for s, c in cases]))
    return out_dir, failures


def load_model_file(directory):
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "case"), CASES)
def test_two_gloo_processes_with_half_the_batch_take_the_single_process_step(steps, strategy, case):
    out_dir, failures = steps
    for run in (f"single-{case}", f"{strategy}-{case}"):
        if run in failures:
            pytest.fail(f"{run} failed:\n{failures[run]}")
    single, group = torch.load(out_dir / f"single-{case}.pt"), torch.load(out_dir / f"{strategy}-{case}.pt")
    assert group["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-5)
    assert single["params"].keys() == group["params"].keys()
    # Adam's first step is about lr * sign(gradient), so where a gradient is near Adam's eps the
    # order of fp32 sums shows up at a small fraction of lr (0.01): atol 5e-5 is 0.5% of it (the
    # tiny model's init of 2026-12 put one such element at 2.3e-5), while a wrong or missing
    # gradient moves a parameter by about lr, 200x more.
    for name, tensor in single["params"].items():
        torch.testing.assert_close(group["params"][name], tensor, rtol=1e-5, atol=5e-5)
    # The group reports the whole batch's metrics, not rank 0's shard's: counts add up and
    # token means are weighted by each rank's tokens. (Each rank packs its own shard, so the
    # tokens computed, and the ratio, depend on how the batch was split.)
    packing = {"train_seconds", "tokens_computed", "tree_token_ratio", "microbatches"}
    assert set(group["metrics"]) == set(single["metrics"])
    for key in set(single["metrics"]) - packing:
        assert group["metrics"][key] == pytest.approx(single["metrics"][key], rel=1e-4, abs=1e-7), key
    if case == "uneven":
        # The group's checkpoint after step 1 holds what the single process's does
        # (weights and Adam moments, gathered whole).
        one = torch.load(out_dir / f"single-{case}.pt.state" / "trainer.pt", weights_only=False)
        two = torch.load(out_dir / f"{strategy}-{case}.pt.state" / "trainer.pt", weights_only=False)
        torch.testing.assert_close(two["trainable"], one["trainable"], rtol=1e-5, atol=5e-5)
        torch.testing.assert_close(two["optimizer"]["state"], one["optimizer"]["state"], rtol=1e-4, atol=1e-9)
        assert two["policy_version"] == one["policy_version"] == 1
    if case != "even":  # and so does the model it saves after step 2
        saved = load_model_file(out_dir / f"{strategy}-{case}.pt.model")
        assert saved.keys() == load_model_file(out_dir / f"single-{case}.pt.model").keys()
        torch.testing.assert_close(
            saved, load_model_file(out_dir / f"single-{case}.pt.model"), rtol=1e-5, atol=5e-5
        )


ONE_PROCESS_BF16 = textwrap.dedent("""
    import sys, torch
    from torch.distributed.tensor import DTensor
    from forge.config import ModelConfig, TrainConfig, TrainerConfig
    from forge.train.distributed import DistributedTrainer
    from forge.types import Sample

    model_dir, out, device = sys.argv[1], sys.argv[2], sys.argv[3]
    generator = torch.Generator().manual_seed(0)
    samples = []
    for i in range(6):
        tokens = torch.randint(8, 40, (10 + 3 * i,), generator=generator).tolist()
        mask = [0] * 5 + [1] * (len(tokens) - 5)
        samples.append(Sample(tokens, mask, [-1.5 * m for m in mask], [0] * len(tokens), advantage=i - 2.5))
    trainer = DistributedTrainer(model_dir, ModelConfig(path=model_dir), TrainConfig(learning_rate=0.01),
                                 TrainerConfig(), seed=0, strategy="fsdp", mixed_precision="bf16")
    assert all(isinstance(p, DTensor) and p.device.type == device for p in trainer.trainable.values())
    assert all(p.dtype == torch.float32 for p in trainer.trainable.values())  # bf16 is for compute only
    metrics = trainer.train_step(samples)
    torch.save({"params": trainer.weights(), "grad_norm": metrics["grad_norm"], "samples": samples}, out)
    trainer.close()
""")


@pytest.mark.slow
@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
        ),
    ],
)
def test_fsdp2_computing_in_bf16_takes_the_fp32_step_within_bf16_error_on_cpu_and_cuda(
    tiny_checkpoint, tmp_path, device
):
    """One FSDP2 process (on CUDA this is the device check's way to reach FSDP2 with one GPU)
    with `train.mixed_precision: bf16` against the fp32 single trainer: the same gradient
    norm within bf16's error, and nearly every weight moved as the fp32 step moved it (Adam's
    first step is about lr * sign(gradient), so where a gradient is near zero bf16 may flip
    it)."""
    from forge.config import ModelConfig, TrainConfig, TrainerConfig
    from forge.train.trainer import Trainer

    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
    )
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    out = tmp_path / "fsdp.pt"
    done = subprocess.run(
        [sys.executable, "-c", ONE_PROCESS_BF16, str(tiny_checkpoint), str(out), device],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    fsdp = torch.load(out, weights_only=False)

    single = Trainer(
        tiny_checkpoint,
        ModelConfig(path=str(tiny_checkpoint)),
        TrainConfig(learning_rate=0.01),
        TrainerConfig(),
        seed=0,
    )
    initial = {name: p.detach().clone() for name, p in single.trainable.items()}
    metrics = single.train_step(fsdp["samples"])
    assert fsdp["grad_norm"] == pytest.approx(metrics["grad_norm"], rel=2e-2)
    assert fsdp["params"].keys() == single.trainable.keys()
    moved = torch.cat([(p.detach() - initial[n]).flatten() for n, p in single.trainable.items()])
    moved_bf16 = torch.cat([(fsdp["params"][n] - initial[n]).flatten() for n in single.trainable])
    agree = ((moved_bf16 - moved).abs() <= 1e-3).float().mean().item()  # a tenth of lr
    assert agree >= 0.9, agree


def test_shards_cover_the_batch_once_with_their_minimum_and_balanced_tokens():
    import random

    from forge.train.distributed import shard_indices

    rng = random.Random(0)
    for world_size, minimum in [(2, 1), (3, 2), (4, 1), (8, 3)]:
        batch = [[rng.randrange(8, 40) for _ in range(rng.randrange(10, 200))] for _ in range(40)]
        shards = shard_indices(batch, world_size, minimum)
        assert sorted(i for s in shards for i in s) == list(range(len(batch)))
        assert all(len(s) >= minimum for s in shards)
        tokens = [sum(len(batch[i]) for i in s) for s in shards]  # nothing shared: tokens are the cost
        assert max(tokens) - min(tokens) <= 2 * max(map(len, batch)), tokens


def test_samples_that_share_a_prompt_stay_on_one_process():
    """4 GRPO groups of 8 over 4 processes: each process gets one whole group and computes
    its prompt once; dealt out in turn, every process would compute all 4 prompts."""
    import random

    from forge.train.distributed import shard_indices
    from forge.tree import build_prefix_tree

    rng = random.Random(1)
    batch = []
    for _ in range(4):
        prompt = [rng.randrange(8, 40) for _ in range(200)]
        batch += [prompt + [rng.randrange(8, 40) for _ in range(20)] for _ in range(8)]
    rng.shuffle(batch)
    shards = shard_indices(batch, 4)
    assert sorted(len({tuple(batch[i][:200]) for i in s}) for s in shards) == [1, 1, 1, 1]
    computed = sum(build_prefix_tree([batch[i] for i in s]).num_nodes for s in shards)
    dealt = sum(build_prefix_tree(batch[rank::4]).num_nodes for rank in range(4))
    assert computed <= 4 * (200 + 8 * 20)  # each prompt once (responses may share a token)
    assert dealt >= 4 * 4 * 200  # each prompt on every process


def test_group_metrics_add_counts_and_weight_token_means_by_each_process_tokens():
    from forge.train.distributed import combine_metrics

    rank0 = {
        "loss": 0.5,
        "grad_norm": 2.0,
        "learning_rate": 0.1,
        "optimizer_steps_skipped": 0.0,
        "tokens_computed": 30.0,
        "tokens_separate": 60.0,
        "microbatches": 1.0,
        "trained_samples": 3.0,
        "zero_advantage_skipped": 0.0,
        "train_seconds": 1.0,
        "mismatch_kl": 0.2,
        "tree_token_ratio": 2.0,
    }
    # A process whose shard had nothing to train ran padding only: counts, no token means.
    rank1 = {
        "loss": 0.0,
        "grad_norm": 2.0,
        "learning_rate": 0.1,
        "optimizer_steps_skipped": 0.0,
        "tokens_computed": 0.0,
        "tokens_separate": 0.0,
        "microbatches": 0.0,
        "trained_samples": 0.0,
        "zero_advantage_skipped": 1.0,
        "train_seconds": 1.5,
    }
    rank2 = {
        **rank0,
        "loss": 0.25,
        "tokens_computed": 10.0,
        "tokens_separate": 10.0,
        "mismatch_kl": 0.5,
        "tree_token_ratio": 1.0,
    }
    out = combine_metrics([(rank0, 30, 3), (rank1, 0, 1), (rank2, 10, 3)])
    assert out["loss"] == 0.75 and out["grad_norm"] == 2.0 and out["train_seconds"] == 1.5
    assert out["trained_samples"] == 6.0 and out["tree_token_ratio"] == 70.0 / 40.0
    assert out["zero_advantage_skipped"] == 1.0 / 7.0
    assert out["mismatch_kl"] == pytest.approx((0.2 * 30 + 0.5 * 10) / 40)
