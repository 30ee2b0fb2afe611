"""bfloat16 weights trained through float32 master copies (forge.train.master_weights) on more
than one trainer process: under DDP and FSDP2 (two gloo processes) a step at a learning rate
below a bfloat16 weight's precision moves the weights as a float32 step moves them, as the
single trainer's master weights do, and a resumed trainer gets its copies back in float32 and
takes the same next steps."""

import textwrap

import pytest
import torch
from test_distributed import launch

LEARNING_RATE = 2e-5  # a step of it rounds away on a bfloat16 weight larger than 512 times it
STEPS = 4

SCRIPT = textwrap.dedent(f"""
    import os, sys, torch
    from forge.config import ModelConfig, TrainConfig, TrainerConfig
    from forge.types import Sample

    model_dir, out_dir, runs = sys.argv[1], sys.argv[2], sys.argv[3:]
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    samples = []
    for i in range(8):
        tokens = torch.randint(8, 40, (10 + 3 * i,), generator=generator).tolist()
        mask = [0] * 5 + [1] * (len(tokens) - 5)
        samples.append(Sample(tokens, mask, [-1.5 * m for m in mask], [0] * len(tokens), advantage=i - 3.5))
    # Several micro-batches a step on every process: their gradients are summed.
    trainer_cfg = TrainerConfig(packing="padded", max_tokens_per_microbatch=40)
    train_cfg = TrainConfig(learning_rate={LEARNING_RATE})

    def make(strategy, dtype):
        args = (model_dir, ModelConfig(path=model_dir, dtype=dtype), train_cfg, trainer_cfg)
        if strategy == "single":
            from forge.train.trainer import Trainer
            return Trainer(*args, seed=0)
        from forge.train.distributed import DistributedTrainer
        return DistributedTrainer(*args, seed=0, strategy=strategy)

    def copies(trainer):
        # The float32 master copies, whole: gathered from every process under FSDP2, for the first.
        _, optimizer = trainer.training_state()
        state = optimizer.get("state", {{}})
        return {{name: kept["master"] for name, kept in state.items() if "master" in kept}}

    for strategy in runs:
        print(f"--- {{strategy}}", flush=True)
        trainer = make(strategy, "bfloat16")
        out = {{"initial": trainer.weights()}}
        out["grad_norm"] = trainer.train_step(samples)["grad_norm"]  # of the float32 sums
        out["saved"] = copies(trainer)
        os.makedirs(os.path.join(out_dir, strategy + ".state"), exist_ok=True)
        trainer.save_state(os.path.join(out_dir, strategy + ".state"))
        resumed = make(strategy, "bfloat16")
        resumed.load_state(os.path.join(out_dir, strategy + ".state"))
        out["loaded"] = copies(resumed)
        for _ in range({STEPS} - 1):
            trainer.train_step(samples)
            resumed.train_step(samples)
        out.update(params=trainer.weights(), copies=copies(trainer),
                   resumed_params=resumed.weights(), resumed_copies=copies(resumed))
        if strategy == "single":  # the float32 reference, from float32 weights
            reference = make("single", "float32")
            out["reference_initial"] = reference.weights()
            for _ in range({STEPS}):
                reference.train_step(samples)
            out["reference"] = reference.weights()
        if trainer.writes_files:
            torch.save(out, os.path.join(out_dir, strategy + ".pt"))
    if "WORLD_SIZE" in os.environ:
        trainer.close()
""")


@pytest.fixture(scope="module")
def results(tiny_checkpoint, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("master_weights")
    failed = {"single": launch(tiny_checkpoint, out_dir, 1, ["single"], SCRIPT)}
    failed["group"] = launch(tiny_checkpoint, out_dir, 2, ["ddp", "fsdp"], SCRIPT)

    def load(strategy):
        failure = failed["single" if strategy == "single" else "group"]
        if not (out_dir / f"{strategy}.pt").exists():
            pytest.fail(f"{strategy} failed:\n{failure}")
        return torch.load(out_dir / f"{strategy}.pt", weights_only=False)

    return load


def moved_as_float32(result, reference):
    """Of the weights the float32 reference's steps move by a bfloat16 step or more (from the
    same start, rounded), the fraction that moved there."""
    hits = total = 0
    for name, start in result["initial"].items():
        target = (start.float() + reference["reference"][name] - reference["reference_initial"][name]).to(
            start.dtype
        )
        should = target != start
        hits += (result["params"][name][should] == target[should]).sum().item()
        total += should.sum().item()
    return hits / total, total


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["single", "ddp", "fsdp"])
def test_small_steps_move_bfloat16_weights_as_float32_steps_do(results, strategy):
    result, reference = results(strategy), results("single")
    fraction, total = moved_as_float32(result, reference)
    assert total > 1000  # the steps add up to a bfloat16 step on this many weights
    # Measured: 0.91 on each (the rest sit at a rounding boundary or where bfloat16 forwards turn a
    # near-zero gradient); plain bfloat16 AdamW, as more than one process took it before: 0.02.
    assert fraction > 0.8, fraction
    for name, param in result["params"].items():  # the weights are their copies, rounded
        assert param.dtype == torch.bfloat16
        assert torch.equal(param, result["copies"][name].to(torch.bfloat16)), name


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_take_the_single_trainers_master_weight_steps(results, strategy):
    group, single = results(strategy), results("single")
    assert group["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-3)
    assert group["copies"].keys() == single["copies"].keys()
    apart = torch.cat([(group["copies"][n] - copy).abs().flatten() for n, copy in single["copies"].items()])
    # Each process sums its own micro-batches, bfloat16 forwards of other groupings than the single
    # trainer's: where a gradient is near zero its sign may differ (a copy then moves up to lr
    # a step the other way), elsewhere the copies agree. A gradient missing or not summed moves
    # copies by about lr a step.
    close = (apart <= 0.5 * LEARNING_RATE).float().mean().item()
    assert close > 0.998, close  # measured: 0.9995 under DDP and FSDP2
    assert apart.max() <= 2 * STEPS * LEARNING_RATE


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["single", "ddp", "fsdp"])
def test_a_resumed_trainer_keeps_its_float32_copies_and_takes_the_same_steps(results, strategy):
    result = results(strategy)
    assert result["loaded"].keys() == result["saved"].keys() == result["params"].keys()
    for name, saved in result["saved"].items():
        assert saved.dtype == result["loaded"][name].dtype == torch.float32
        assert torch.equal(result["loaded"][name], saved), name
        assert torch.equal(result["resumed_copies"][name], result["copies"][name]), name
        assert torch.equal(result["resumed_params"][name], result["params"][name]), name
