"""The family matrix on a GPU: the tree path's forward and backward with flex attention against
separate forwards, on every family of forge.models.families that has flex attention (LoRA
variants included), in fp32 (exact: logprobs and gradients within 1e-5) and in bf16 (within
twice the error of plain separate bf16 forwards against the fp32 reference, or bf16's own
rounding floor), trees split across micro-batches and whole.

Prints one JSON object and writes bench/results/gpu-families.json.
Run (GPU): python -m bench.gpu_families  (bench/gpu_families.sh)
Check here: python -m bench.gpu_families --device cpu --attention dense (the same comparisons
through the dense tree path: flex has no CPU backward in torch 2.13).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from forge.models.families import FAMILIES, VOCAB, build_lora
from forge.tree import microbatches
from forge.types import Sample

FP32_TOLERANCE = 1e-5
BF16_FACTOR = 2.0
BF16_LOGPROB_FLOOR = 2.0**-9  # rounding a logit below 1 to bf16 moves its logprob by up to this
BF16_GRADIENT_FLOOR = 2.0**-8  # bf16's unit roundoff
BUDGETS = {"split-trees": 24, "one-tree": 200}


def samples(seed: int) -> list[Sample]:
    """Shared prompts, branches, a prefix of another sample, an unrelated one; past the windows."""
    generator = torch.Generator().manual_seed(seed)

    def tokens(n: int) -> list[int]:
        return torch.randint(2, VOCAB, (n,), generator=generator).tolist()

    prompt = tokens(10)
    branch = prompt + tokens(5)
    sequences = [
        branch + tokens(7),
        branch + tokens(3),
        prompt + tokens(11),
        prompt + tokens(2),
        tokens(16),
        branch,
    ]
    out = []
    for tokens_ in sequences:
        n = len(tokens_)
        mask = (torch.rand(n, generator=generator) < 0.7).long().tolist()
        out.append(Sample(tokens_, mask, [0.0] * n, [0] * n, float(torch.randn(1, generator=generator))))
    return out


def policy_loss(logprobs: torch.Tensor, sample: Sample, total: int) -> torch.Tensor:
    mask = torch.tensor(sample.loss_mask[1:], dtype=logprobs.dtype, device=logprobs.device)
    return -(sample.advantage * torch.exp(logprobs - logprobs.detach()) * mask).sum() / total


def run(model, batch_samples: list[Sample], device: str, attention: str | None, budget: int):
    """Logprobs and the summed policy-loss gradient (fp32, CPU): separate forwards when
    `attention` is None, else tree micro-batches with that attention."""
    total = sum(len(s.token_ids) for s in batch_samples)
    logprobs: list = [None] * len(batch_samples)
    model.zero_grad()
    if attention is None:
        for i, s in enumerate(batch_samples):
            ids = torch.tensor([s.token_ids], device=device)
            lp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]
            policy_loss(lp, s, total).backward()
            logprobs[i] = lp.detach().cpu()
    else:
        for batch in microbatches(batch_samples, "tree", budget, attention=attention):
            outputs = batch.forward_logprobs(model)
            sum(
                policy_loss(lp, batch_samples[i], total)
                for i, lp in zip(batch.sample_indices, outputs, strict=True)
            ).backward()
            for i, lp in zip(batch.sample_indices, outputs, strict=True):
                logprobs[i] = lp.detach().float().cpu()
    grad = torch.cat([p.grad.float().flatten().cpu() for p in model.parameters() if p.requires_grad])
    return logprobs, grad


def errors(got, want) -> tuple[float, float]:
    (got_lp, got_grad), (want_lp, want_grad) = got, want
    logprob = max((g - w).abs().max().item() for g, w in zip(got_lp, want_lp, strict=True) if len(w))
    return logprob, ((got_grad - want_grad).norm() / want_grad.norm()).item()


def build(name: str, lora: bool, implementation: str, device: str, dtype: torch.dtype):
    family = FAMILIES[name]
    model = build_lora(family, implementation) if lora else family.build(implementation)
    return model.to(device, dtype)


def check_family(name: str, lora: bool, device: str, attention: str) -> dict:
    implementation = "flex_attention" if attention == "flex" else "eager"
    batch_samples = samples(seed=len(name))
    reference = run(build(name, lora, "eager", device, torch.float32), batch_samples, device, None, 0)
    plain_bf16 = run(build(name, lora, "eager", device, torch.bfloat16), batch_samples, device, None, 0)
    noise = errors(plain_bf16, reference)
    out: dict = {"bf16_noise": {"logprob": noise[0], "gradient": noise[1]}}
    ok = True
    for budget_name, budget in BUDGETS.items():
        fp32 = errors(
            run(
                build(name, lora, implementation, device, torch.float32),
                batch_samples,
                device,
                attention,
                budget,
            ),
            reference,
        )
        bf16 = errors(
            run(
                build(name, lora, implementation, device, torch.bfloat16),
                batch_samples,
                device,
                attention,
                budget,
            ),
            reference,
        )
        fp32_ok = fp32[0] <= FP32_TOLERANCE and fp32[1] <= FP32_TOLERANCE
        bf16_ok = bf16[0] <= max(BF16_FACTOR * noise[0], BF16_LOGPROB_FLOOR) and bf16[1] <= max(
            BF16_FACTOR * noise[1], BF16_GRADIENT_FLOOR
        )
        ok &= fp32_ok and bf16_ok
        out[budget_name] = {
            "fp32": {"logprob": fp32[0], "gradient": fp32[1], "ok": fp32_ok},
            "bf16": {"logprob": bf16[0], "gradient": bf16[1], "ok": bf16_ok},
        }
    out["ok"] = ok
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--attention", default="flex", choices=["flex", "dense"])
    parser.add_argument(
        "--families", nargs="*", default=None, help="default: every family with flex attention"
    )
    parser.add_argument("--output", type=Path, default=Path("bench/results/gpu-families.json"))
    args = parser.parse_args()
    if args.attention == "flex" and args.device != "cuda":
        parser.error("--attention flex needs --device cuda: torch 2.13 has no flex attention backward on CPU")
    names = args.families or [
        n for n, f in FAMILIES.items() if "flex_attention" in f.attention_implementations()
    ]
    started = time.perf_counter()
    results = {}
    for name in names:
        for lora in [False, True] if FAMILIES[name].lora else [False]:
            key = f"{name}-lora" if lora else name
            results[key] = check_family(name, lora, args.device, args.attention)
            print(key, "ok" if results[key]["ok"] else "DISAGREES", flush=True)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    report = {
        "benchmark": "gpu_families",
        "device": f"{device}; torch {torch.__version__}",
        "attention": args.attention,
        "tolerances": {
            "fp32": FP32_TOLERANCE,
            "bf16_factor": BF16_FACTOR,
            "bf16_floors": {"logprob": BF16_LOGPROB_FLOOR, "gradient": BF16_GRADIENT_FLOOR},
        },
        "all_ok": all(r["ok"] for r in results.values()),
        "seconds": round(time.perf_counter() - started, 1),
        "families": results,
    }
    print(json.dumps(report))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1) + "\n")
    return 0 if report["all_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
