"""The self-checks in bf16 and fp16 over many seeds: how often each passes a family it computes
exactly (a false alarm where not) and catches a defect, under forge.tree.agreement's rule and
under the fixed tolerances it replaced (the trainer's 4x the largest padded-batch error, at least
4 eps; the engine's 0.1), computed from the same first look.

Prints one JSON object and writes bench/results/check_precision.json.
Run: python -m bench.check_precision [--seeds 20]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention
from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

from forge.models.families import FAMILIES, SHAPE, WINDOW
from forge.rollout.engines import engine_check
from forge.rollout.engines.hf import HFEngine
from forge.tree import self_check
from forge.tree.self_check import CHECK_WINDOW, check_tree_path, shrunk_windows

OLD_ENGINE_TOLERANCE = 0.1


def family(name: str) -> Callable[[int], torch.nn.Module]:
    spec = FAMILIES[name]
    return lambda seed: spec.build(spec.attention_implementations()[0], seed)


def index_scaled(strength: float) -> Callable[[int], torch.nn.Module]:
    """Llama whose first layer's attention output is scaled by 1 + strength * sequence index:
    a defect of tunable size (the tree's largest error in fp32: ~0.2 at 1/100, ~0.07 at 1/333)."""

    class Scaled(LlamaAttention):
        def forward(self, hidden_states, *args, **kwargs):
            output, weights = super().forward(hidden_states, *args, **kwargs)
            index = torch.arange(output.shape[1], dtype=output.dtype, device=output.device)
            return output * (1 + strength * index)[None, :, None], weights

    def build(seed: int) -> torch.nn.Module:
        model = FAMILIES["llama"].build("sdpa", seed)
        model.model.layers[0].self_attn.__class__ = Scaled
        return model

    return build


def phimoe(seed: int) -> torch.nn.Module:
    """PhiMoE slides every layer by its mask alone: the tree attends past the window."""
    config = AutoConfig.for_model(
        "phimoe",
        **{
            **SHAPE,
            "head_dim": 8,
            "sliding_window": WINDOW,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
        },
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().eval()


def mpt(alibi_bias_max: int) -> Callable[[int], torch.nn.Module]:
    """MPT: ALiBi counted by cache column, wrong across the engine's pad holes; a larger
    `alibi_bias_max` flattens the slopes (a subtler defect)."""

    def build(seed: int) -> torch.nn.Module:
        config = AutoConfig.for_model(
            "mpt", d_model=32, n_heads=4, n_layers=2, vocab_size=64, max_seq_len=128, pad_token_id=0,
            initializer_range=0.2,
        )  # fmt: skip
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).eval()
        model.transformer.build_mpt_alibi_tensor = lambda heads, length, _max=8, device=None: (
            build_mpt_alibi_tensor(heads, length, alibi_bias_max, device)
        )
        return model

    return build


TREE_CASES = {
    **{name: family(name) for name in ("qwen3_moe", "mixtral", "llama", "qwen2", "mistral", "gemma2")},
    "defect: index-scaled 1/100": index_scaled(1 / 100),
    "defect: index-scaled 1/333": index_scaled(1 / 333),
    "defect: index-scaled 1/500": index_scaled(1 / 500),
    "defect: phimoe window by mask": phimoe,
}
ENGINE_CASES = {
    **{name: family(name) for name in ("qwen3_moe", "mixtral", "llama", "mistral", "gemma2")},
    "defect: mpt alibi 8 (default)": mpt(8),
    "defect: mpt alibi 16": mpt(16),
    "defect: mpt alibi 32": mpt(32),
}


def old_tree_ok(model: torch.nn.Module, seed: int) -> bool:
    """The rule before: largest error <= max(4 eps, 4x the padded batch's largest)."""
    sequences = self_check.check_sequences(int(model.config.vocab_size), seed)
    with torch.no_grad(), shrunk_windows(model, CHECK_WINDOW):
        want = self_check._separate(model, sequences, torch.device("cpu"))
        padded = self_check.position_errors(
            sequences, self_check.packed_logprobs(model, sequences, "padded"), want
        )
        tree = self_check.position_errors(
            sequences, self_check.packed_logprobs(model, sequences, "tree"), want
        )
    eps = torch.finfo(model.get_input_embeddings().weight.dtype).eps
    return max(tree) <= max(4 * eps, 4 * max(padded))


def old_engine_ok(model: torch.nn.Module) -> bool:
    """The rule before: the shared prompt or the copy within 0.1 on the first look."""
    for share in (True, False):
        with torch.no_grad(), shrunk_windows(model, CHECK_WINDOW):
            probe = HFEngine(model, [], 0, temperature=1.0, share_prompt=share, self_check=False)
            try:
                if share and not probe.share_prompt:
                    continue
                errors, _ = engine_check._play(probe, int(model.config.vocab_size), False, 0)
            finally:
                probe.restore_attention()
        if max(errors) <= OLD_ENGINE_TOLERANCE:
            return True
    return False


def new_engine_ok(model: torch.nn.Module, seed: int) -> bool:
    try:
        HFEngine(model, [1], 0, seed=seed)
        return True
    except ValueError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    args = parser.parse_args()
    started = time.perf_counter()
    results: dict[str, dict[str, int]] = {}
    for dtype in (torch.bfloat16, torch.float16):
        for check, cases in (("trainer", TREE_CASES), ("engine", ENGINE_CASES)):
            for name, build in cases.items():
                new = old = 0
                for seed in range(args.seeds):
                    if check == "trainer":
                        new += check_tree_path(build(seed).to(dtype), seed=seed).ok
                        old += old_tree_ok(build(seed).to(dtype), seed)
                    else:
                        new += new_engine_ok(build(seed).to(dtype), seed)
                        old += old_engine_ok(build(seed).to(dtype))
                results[f"{check} {str(dtype).removeprefix('torch.')} {name}"] = {
                    "passed_new": new,
                    "passed_old": old,
                    "seeds": args.seeds,
                }
    out = {
        "what": "seeds passed per case (an exact family should pass every seed; a defect none)",
        "results": results,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(out))
    path = Path(__file__).parent / "results" / "check_precision.json"
    path.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
