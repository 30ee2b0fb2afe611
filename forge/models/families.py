"""Tiny random-init models of every model family Forge is tested on, and what each supports:
the family matrix (tests/test_model_families.py), the GPU check and the README table use these."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

VOCAB = 64
WINDOW = 6  # sliding windows shorter than the matrix's sequences, so the window matters
SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=1,
    # Wider than the default 0.02, so attention is far from uniform and a wrong mask shows.
    initializer_range=0.2,
)


@dataclass(frozen=True)
class Family:
    """A model family: its transformers classes, a tiny config, and what it exercises."""

    name: str
    config_class: str
    model_class: str
    config: dict[str, Any]
    lora: bool = False  # the matrix also trains it through LoRA adapters
    features: tuple[str, ...] = ()  # what makes it differ from Llama, for the README table
    # The attention projections, peft's LoRA targets (model.lora.target_modules for this family).
    attention_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    extra_modules: tuple[str, ...] = field(default=())  # LoRA targets beyond the attention's
    # torch runs its flex attention on CPU (the matrix's forward-only check); transformers
    # computes attention sinks under flex only on a GPU.
    flex_on_cpu: bool = True

    def build(self, attn_implementation: str = "sdpa", seed: int = 0) -> torch.nn.Module:
        """The tiny model in fp32, eval mode, with weights that depend only on `seed`."""
        import transformers

        config = getattr(transformers, self.config_class)(
            **{**SHAPE, **self.config}, attn_implementation=attn_implementation
        )
        torch.manual_seed(seed)
        return getattr(transformers, self.model_class)(config).float().eval()

    def attention_implementations(self) -> list[str]:
        """The transformers attention implementations this family supports."""
        import transformers

        model_class = getattr(transformers, self.model_class)
        return [
            name
            for name, supported in (
                ("sdpa", model_class._supports_sdpa),
                ("eager", True),
                ("flex_attention", model_class._supports_flex_attn),
            )
            if supported
        ]


def _lora_wrap(model: torch.nn.Module, targets: list[str], seed: int) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    torch.manual_seed(seed + 1)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # peft zero-initialises B; make the adapter matter
            torch.nn.init.normal_(parameter, std=0.1)
    return model


def build_lora(family: Family, attn_implementation: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    targets = [*family.attention_modules, *family.extra_modules]
    return _lora_wrap(family.build(attn_implementation, seed), targets, seed)


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in [
        Family(
            "qwen2",
            "Qwen2Config",
            "Qwen2ForCausalLM",
            # Layers from max_window_layers on slide: layer 0 full, layer 1 sliding.
            dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
            lora=True,
            features=("sliding window on layers >= max_window_layers",),
        ),
        Family("qwen3", "Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=8), features=("q/k norm",)),
        Family("llama", "LlamaConfig", "LlamaForCausalLM", dict(head_dim=8)),
        Family(
            "mistral",
            "MistralConfig",
            "MistralForCausalLM",
            dict(head_dim=8, sliding_window=WINDOW),
            lora=True,
            features=("sliding window on every layer",),
        ),
        Family(
            "gemma2",
            "Gemma2Config",
            "Gemma2ForCausalLM",
            # A soft-cap small enough to bend these scores, and q.k scaled by 1 (not 1/sqrt(8)).
            dict(
                head_dim=8,
                sliding_window=WINDOW,
                attn_logit_softcapping=1.0,
                final_logit_softcapping=3.0,
                query_pre_attn_scalar=1,
            ),
            lora=True,
            features=("sliding / full layers alternate", "attention logit soft-cap", "final logit soft-cap"),
        ),
        Family(
            "gemma3",
            "Gemma3TextConfig",
            "Gemma3ForCausalLM",
            dict(
                head_dim=8,
                sliding_window=WINDOW,
                layer_types=["sliding_attention", "full_attention"],
                query_pre_attn_scalar=1,
            ),
            features=("sliding / full layers with their own rotary bases", "q/k norm"),
        ),
        Family(
            "phi3",
            "Phi3Config",
            "Phi3ForCausalLM",
            dict(partial_rotary_factor=0.5, sliding_window=2 * WINDOW),
            features=("partial rotary", "sliding window"),
            attention_modules=("qkv_proj", "o_proj"),
        ),
        Family(
            "gpt_neox",
            "GPTNeoXConfig",
            "GPTNeoXForCausalLM",
            dict(rotary_pct=0.25),
            features=("partial rotary", "parallel residual"),
            attention_modules=("query_key_value", "dense"),
        ),
        Family("olmo2", "Olmo2Config", "Olmo2ForCausalLM", dict(), features=("q/k norm after projection",)),
        Family(
            "gptj",
            "GPTJConfig",
            "GPTJForCausalLM",
            # Rotary on 4 of each head's 8 dimensions, rotating interleaved pairs (GPT-NeoX's halves).
            dict(rotary_dim=4),
            features=("interleaved partial rotary", "parallel residual"),
            attention_modules=("q_proj", "k_proj", "v_proj", "out_proj"),
        ),
        Family(
            "codegen",
            "CodeGenConfig",
            "CodeGenForCausalLM",
            dict(rotary_dim=4),
            features=("interleaved partial rotary", "parallel residual", "fused qkv split in 4 groups"),
            attention_modules=("qkv_proj", "out_proj"),
        ),
        Family(
            "cohere2",
            "Cohere2Config",
            "Cohere2ForCausalLM",
            dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"], logit_scale=0.5),
            features=(
                "sliding / full layers, rotary on sliding layers only",
                "parallel residual",
                "logit scale",
            ),
        ),
        Family(
            "starcoder2",
            "Starcoder2Config",
            "Starcoder2ForCausalLM",
            dict(sliding_window=WINDOW),
            features=("sliding window on every layer", "biases", "layer norm"),
        ),
        Family(
            "granite",
            "GraniteConfig",
            "GraniteForCausalLM",
            # Scores scaled by attention_multiplier, not 1/sqrt(head_dim): the tree must keep it.
            dict(
                attention_multiplier=0.3,
                residual_multiplier=0.5,
                embedding_multiplier=3.0,
                logits_scaling=2.0,
            ),
            features=("attention / residual / embedding / logit multipliers",),
        ),
        Family(
            "qwen3_moe",
            "Qwen3MoeConfig",
            "Qwen3MoeForCausalLM",
            # The config asks for router logits and an aux loss: Forge's forwards leave them out.
            dict(
                head_dim=8,
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=32,
                output_router_logits=True,
                router_aux_loss_coef=0.01,
            ),
            features=("mixture of experts (router aux loss left out)",),
        ),
        Family(
            "mixtral",
            "MixtralConfig",
            "MixtralForCausalLM",
            dict(head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW),
            features=("mixture of experts", "sliding window"),
        ),
        Family(
            "gpt_oss",
            "GptOssConfig",
            "GptOssForCausalLM",
            dict(head_dim=8, sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2),
            features=("attention sinks", "sliding / full layers alternate", "mixture of experts"),
            flex_on_cpu=False,
        ),
        Family(
            "deepseek_v3",
            "DeepseekV3Config",
            "DeepseekV3ForCausalLM",
            # Multi-head latent attention: keys and values from a compressed latent, rotary on part.
            dict(
                q_lora_rank=16,
                kv_lora_rank=16,
                qk_rope_head_dim=4,
                qk_nope_head_dim=4,
                v_head_dim=8,
                head_dim=4,
                num_key_value_heads=4,
                n_routed_experts=4,
                num_experts_per_tok=2,
                first_k_dense_replace=1,
                moe_intermediate_size=16,
                n_group=1,
                topk_group=1,
            ),
            features=("multi-head latent attention", "mixture of experts"),
            attention_modules=("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"),
        ),
        Family(
            "llama4_text",
            "Llama4TextConfig",
            "Llama4ForCausalLM",
            # Layer 0 chunked (a position sees its own chunk of WINDOW), layer 1 full without rotary.
            dict(
                head_dim=8,
                attention_chunk_size=WINDOW,
                no_rope_layers=[1, 0],
                num_local_experts=2,
                num_experts_per_tok=1,
                intermediate_size_mlp=64,
            ),
            features=("chunked attention", "layers without rotary", "mixture of experts"),
        ),
    ]
}


def matrix_paths(family: Family) -> list[tuple[str, str]]:
    """(packing, attention implementation) pairs the family matrix checks on CPU: tree on every
    implementation the family has (flex forward-only: torch has no CPU flex backward; none where
    the family's flex runs on a GPU only), padded on every implementation but flex."""
    paths = []
    for implementation in family.attention_implementations():
        if implementation != "flex_attention" or family.flex_on_cpu:
            paths.append(("tree", implementation))
        if implementation != "flex_attention":
            paths.append(("padded", implementation))
    return paths


TABLE_START = "<!-- family-table:start (generated by python -m forge.models.families; do not edit) -->"
TABLE_END = "<!-- family-table:end -->"
COLUMNS = [
    ("tree", "sdpa"),
    ("tree", "eager"),
    ("tree", "flex_attention"),
    ("padded", "sdpa"),
    ("padded", "eager"),
]


def support_table() -> str:
    """The README table of families x packing paths, from the same definitions that
    parametrize tests/test_model_families.py."""
    header = (
        "| family | transformers class | exercises | "
        + " | ".join(f"{packing} {implementation}" for packing, implementation in COLUMNS)
        + " | LoRA |"
    )
    lines = [header, "|" + "---|" * (len(COLUMNS) + 4)]
    for family in FAMILIES.values():
        checked = set(matrix_paths(family))
        cells = []
        for packing, implementation in COLUMNS:
            if (
                (packing, implementation) == ("tree", "flex_attention")
                and not family.flex_on_cpu
                and (implementation in family.attention_implementations())
            ):
                cells.append("GPU only (transformers); GPU check, not yet run")
            elif (packing, implementation) not in checked:
                cells.append("no (transformers)")
            elif implementation == "flex_attention":
                cells.append("exact forward (CPU); backward: GPU check, not yet run")
            else:
                cells.append("exact")
        features = ", ".join(family.features) or "(the reference)"
        lora = "exact" if family.lora else ""
        lines.append(
            f"| {family.name} | `{family.model_class}` | {features} | " + " | ".join(cells) + f" | {lora} |"
        )
    return "\n".join(lines)


def render_readme(text: str) -> str:
    """`text` with the family table between its markers replaced by `support_table()`."""
    if TABLE_START not in text or TABLE_END not in text:
        raise ValueError(f"README.md lacks the family table markers {TABLE_START!r} and {TABLE_END!r}")
    before, rest = text.split(TABLE_START, 1)
    _, after = rest.split(TABLE_END, 1)
    return f"{before}{TABLE_START}\n{support_table()}\n{TABLE_END}{after}"


if __name__ == "__main__":
    from pathlib import Path

    readme = Path(__file__).resolve().parents[2] / "README.md"
    readme.write_text(render_readme(readme.read_text()))
