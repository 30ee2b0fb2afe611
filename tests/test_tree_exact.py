"""Tree packing is exact: per-token logprobs and the loss gradients equal those of
running every sample on its own, for two architectures, LoRA, and both mask paths."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_tree_build import sharing_sequences
from torch.nn.attention.flex_attention import flex_attention
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from forge.tree import attention, build_prefix_tree, dense_tree_mask, flex_tree_block_mask, microbatches
from forge.types import Sample

VOCAB = 32
LOGPROB_TOLERANCE = 1e-5
GRADIENT_TOLERANCE = 1e-5


def tiny_model(architecture: str, attn_implementation: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(0)
    shape = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    if architecture == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**shape, attn_implementation=attn_implementation))
    else:
        model = LlamaForCausalLM(LlamaConfig(**shape, attn_implementation=attn_implementation))
    return model.float().eval()


def lora_model() -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_model("qwen2"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    )
    torch.manual_seed(1)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # peft zero-initialises B; make the adapter matter
            torch.nn.init.normal_(parameter, std=0.1)
    return model


MODELS = {
    "qwen2": lambda: tiny_model("qwen2"),
    "llama": lambda: tiny_model("llama"),
    "llama-eager": lambda: tiny_model("llama", "eager"),  # the full dense additive mask
    "qwen2-lora": lora_model,
}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    # Tiny query blocks, so the block-sparse SDPA path splits these short trees into many.
    saved, attention.QUERY_BLOCK = attention.QUERY_BLOCK, 5
    yield MODELS[request.param]()
    attention.QUERY_BLOCK = saved


def make_samples(sequences: list[list[int]], seed: int) -> list[Sample]:
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for tokens in sequences:
        n = len(tokens)
        loss_mask = (torch.rand(n, generator=generator) < 0.7).long().tolist()
        versions = torch.randint(0, 3, (n,), generator=generator).tolist()
        advantage = float(torch.randn(1, generator=generator))
        samples.append(Sample(tokens, loss_mask, [0.0] * n, versions, advantage))
    return samples


def separate_logprobs(model, sample: Sample) -> torch.Tensor:
    ids = torch.tensor([sample.token_ids])
    logits = model(input_ids=ids).logits[0, :-1]
    return logits.log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]


def policy_loss(logprobs: torch.Tensor, sample: Sample, total_tokens: int) -> torch.Tensor:
    """A per-sample loss that uses the sample's own advantage and mask on shared tokens."""
    mask = torch.tensor(sample.loss_mask[1:], dtype=logprobs.dtype)
    ratio = torch.exp(logprobs - logprobs.detach())
    return -(sample.advantage * ratio * mask).sum() / total_tokens


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def gradients(model, loss_fn) -> torch.Tensor:
    model.zero_grad()
    loss_fn()
    return torch.cat([p.grad.flatten() for p in trainable(model)])


def separate_results(model, samples):
    """Each sample's logprobs from its own forward, the sum of their loss gradients, and
    the sum of those gradients' norms: the scale fp32 rounding works at. (Samples with
    opposite advantages on the same tokens cancel, so the summed gradient can be far
    smaller than its terms, and its rounding error is then large relative to it.)"""
    total = sum(len(s.token_ids) for s in samples)
    logprobs, grads = [], []
    for s in samples:

        def run(s=s):
            own = separate_logprobs(model, s)
            policy_loss(own, s, total).backward()
            logprobs.append(own.detach())

        grads.append(gradients(model, run))
    return logprobs, torch.stack(grads).sum(0), sum(g.norm() for g in grads)


def packed_results(model, samples, packing, budget, attention="auto"):
    total = sum(len(s.token_ids) for s in samples)
    batches = microbatches(samples, packing, budget, attention)
    logprobs = [None] * len(samples)

    def run():
        for batch in batches:  # one backward per micro-batch, as the trainer does
            outputs = batch.forward_logprobs(model)
            loss = sum(
                policy_loss(lp, samples[i], total)
                for i, lp in zip(batch.sample_indices, outputs, strict=True)
            )
            loss.backward()
            for i, lp in zip(batch.sample_indices, outputs, strict=True):
                logprobs[i] = lp.detach()

    return logprobs, gradients(model, run)


def assert_same_results(model, samples, packing, budget):
    budget = max(budget, *(len(s.token_ids) for s in samples))  # no sample may exceed it
    expected_logprobs, expected_grad, scale = separate_results(model, samples)
    logprobs, grad = packed_results(model, samples, packing, budget)
    for got, want in zip(logprobs, expected_logprobs, strict=True):
        assert got.shape == want.shape
        if len(want):
            assert (got - want).abs().max().item() <= LOGPROB_TOLERANCE
    # Relative to the per-sample gradients being summed (equal to the summed gradient's norm
    # when they point alike, larger where opposite advantages cancel); a batch of one-token
    # samples has no predicted token, so every gradient is zero.
    relative_error = ((grad - expected_grad).norm() / scale.clamp_min(1e-30)).item()
    assert relative_error <= GRADIENT_TOLERANCE


random_trees = given(
    sequences=sharing_sequences(vocab=VOCAB // 4), seed=st.integers(0, 2**16), budget=st.integers(18, 80)
)


@settings(max_examples=10, deadline=None)
@random_trees
def test_tree_logprobs_and_gradients_equal_separate_forwards(model, sequences, seed, budget):
    assert_same_results(model, make_samples(sequences, seed), "tree", budget)


@pytest.mark.slow
@settings(max_examples=50, deadline=None)
@random_trees
def test_tree_logprobs_and_gradients_equal_separate_forwards_many_trees(model, sequences, seed, budget):
    assert_same_results(model, make_samples(sequences, seed), "tree", budget)


@settings(max_examples=5, deadline=None)
@random_trees
def test_padded_logprobs_and_gradients_equal_separate_forwards(model, sequences, seed, budget):
    assert_same_results(model, make_samples(sequences, seed), "padded", budget)


def test_shared_tokens_keep_each_samples_own_advantage_and_mask():
    model = tiny_model("qwen2")
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    samples = [
        Sample(prompt + [7, 7], [0] * 8 + [1, 1], [0.0] * 10, [-1] * 8 + [0, 0], advantage=1.0),
        Sample(prompt + [8], [1] * 9, [0.0] * 9, [2] * 9, advantage=-2.0),
        Sample(prompt, [0] * 4 + [1] * 4, [0.0] * 8, [1] * 8, advantage=0.5),
    ]
    assert_same_results(model, samples, "tree", 64)


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_flex_block_mask_attention_equals_dense_mask_attention(compiled):
    torch.manual_seed(0)
    sequences = [[1, 2, 3] * 50 + [i] * (20 + i) for i in range(6)] + [[9] * 40]
    tree = build_prefix_tree(sequences)
    subtree_end = torch.as_tensor(tree.subtree_end)
    n = tree.num_nodes
    query, key, value = (torch.randn(1, 2, n, 16) for _ in range(3))
    attend = torch.compile(flex_attention) if compiled else flex_attention  # compiled skips empty blocks
    # Inductor's kernels compiled in this process: the same code, without the ~5 s start of the
    # worker pool it would compile them in (this is the only compile in the tests).
    with torch._inductor.config.patch(compile_threads=1):
        flex = attend(query, key, value, block_mask=flex_tree_block_mask(subtree_end))
    dense = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=dense_tree_mask(subtree_end, torch.float32)
    )
    assert (flex - dense).abs().max().item() <= LOGPROB_TOLERANCE


@pytest.mark.parametrize(("window", "chunk"), [(None, None), (7, None), (40, None), (None, 8), (None, 37)])
def test_flex_block_mask_with_a_window_or_chunk_equals_the_dense_mask(window, chunk):
    sequences = [[1, 2, 3] * 30 + [i] * (20 + i) for i in range(4)] + [[9] * 40]
    tree = build_prefix_tree(sequences)
    ends, depth = torch.as_tensor(tree.subtree_end), torch.as_tensor(tree.position_ids)
    query, key, value = (
        torch.randn(1, 2, tree.num_nodes, 16, generator=torch.Generator().manual_seed(1)) for _ in range(3)
    )
    flex = flex_attention(
        query, key, value, block_mask=flex_tree_block_mask(ends, 16, depth, window, chunk=chunk)
    )
    mask = dense_tree_mask(ends, torch.float32, depth, window, chunk)
    if chunk is not None:  # the chunk cuts these sequences
        assert (mask == 0).sum() < (dense_tree_mask(ends, torch.float32, depth, window) == 0).sum()
    dense = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    assert (flex - dense).abs().max().item() <= LOGPROB_TOLERANCE


def test_flex_block_mask_skips_blocks_no_query_sees():
    # Two unrelated 256-token roots: the blocks between them are empty and skipped.
    tree_ends = torch.tensor([256] * 256 + [512] * 256)
    block_mask = flex_tree_block_mask(tree_ends, block_size=128)
    assert block_mask.sparsity() > 50.0


def forward_results(model, samples, device, attention=None):
    """Logprobs (fp32, on CPU) and the summed policy-loss gradient (fp32, on CPU): separate
    forwards when `attention` is None, else tree micro-batches with that attention."""
    total = sum(len(s.token_ids) for s in samples)
    logprobs: list = [None] * len(samples)
    model.zero_grad()
    if attention is None:
        for i, s in enumerate(samples):
            ids = torch.tensor([s.token_ids], device=device)
            # log_softmax in fp32, as the tree forward does, so both bf16 runs share that step.
            logits = model(input_ids=ids).logits[0, :-1].float()
            lp = logits.log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]
            policy_loss(lp.cpu(), s, total).backward()
            logprobs[i] = lp.detach().cpu()
    else:
        for batch in microbatches(samples, "tree", 64, attention=attention):
            outputs = batch.forward_logprobs(model)
            sum(
                policy_loss(lp.cpu(), samples[i], total)
                for i, lp in zip(batch.sample_indices, outputs, strict=True)
            ).backward()
            for i, lp in zip(batch.sample_indices, outputs, strict=True):
                logprobs[i] = lp.detach().cpu()
    return logprobs, torch.cat([p.grad.float().flatten().cpu() for p in model.parameters()])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex attention backward needs CUDA in torch 2.13")
@pytest.mark.parametrize("architecture", ["qwen2", "llama"])
def test_flex_path_logprobs_and_gradients_equal_separate_forwards_on_gpu(architecture):
    model = tiny_model(architecture, "flex_attention").cuda()
    reference = tiny_model(architecture, "sdpa").cuda()
    samples = make_samples([[1, 2, 3, 4] * 10 + [i] * (5 + i) for i in range(5)] + [[7, 7, 7]], seed=0)
    expected, want = forward_results(reference, samples, "cuda")
    logprobs, grad = forward_results(model, samples, "cuda", attention="flex")
    for lp, expected_lp in zip(logprobs, expected, strict=True):
        assert (lp - expected_lp).abs().max().item() <= 1e-4
    assert ((grad - want).norm() / want.norm()).item() <= 1e-4


def test_flex_attention_on_a_model_without_flex_is_a_clear_error():
    model = tiny_model("qwen2", "sdpa")
    batch = microbatches(make_samples([[1, 2, 3]], 0), "tree", 16, attention="flex")[0]
    with pytest.raises(ValueError, match="attn_implementation='flex_attention'"):
        batch.forward_logprobs(model)


@pytest.mark.parametrize("architecture", ["qwen2", "llama", "qwen2-lora"])
def test_flex_path_logprobs_through_the_model_equal_separate_forwards_on_cpu(architecture, monkeypatch):
    # torch 2.13 cannot compile flex attention for CPU nor run its backward there, so on CPU
    # the model-level flex path is checked forward-only with eager flex attention (the same
    # BlockMask and the same transformers attention code); gradients are the GPU test's job.
    from transformers.integrations import flex_attention as hf_flex

    calls = []

    def eager_flex(query, key, value, *args, training=False, **kwargs):
        calls.append(kwargs.get("block_mask"))
        return flex_attention(query, key, value, *args, **kwargs)

    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention", eager_flex)
    if architecture == "qwen2-lora":
        model = lora_model()
        model.base_model.model.config._attn_implementation = "flex_attention"
        reference = lora_model()
    else:
        model = tiny_model(architecture, "flex_attention")
        reference = tiny_model(architecture, "sdpa")
    samples = make_samples(
        [[1, 2, 3, 4] * 10 + [i] * (5 + i) for i in range(5)] + [[7, 7, 7], [1, 2]], seed=0
    )
    with torch.no_grad():
        for batch in microbatches(samples, "tree", 64, attention="flex"):
            for index, lp in zip(batch.sample_indices, batch.forward_logprobs(model), strict=True):
                ids = torch.tensor([samples[index].token_ids])
                want = (
                    reference(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]
                )
                assert (lp - want).abs().max().item() <= LOGPROB_TOLERANCE
    assert calls and all(mask is not None for mask in calls)  # every layer went through flex


def separate_entropy(model, sample: Sample) -> torch.Tensor:
    ids = torch.tensor([sample.token_ids])
    log_p = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
    return -(log_p.exp() * log_p).sum(-1)


def entropy_loss(entropy: torch.Tensor, sample: Sample, total_tokens: int) -> torch.Tensor:
    mask = torch.tensor(sample.loss_mask[1:], dtype=entropy.dtype)
    return -(entropy * mask).sum() / total_tokens


@pytest.mark.parametrize("packing", ["tree", "padded"])
@pytest.mark.parametrize("architecture", ["qwen2", "llama"])
def test_entropy_and_its_gradient_equal_separate_forwards(architecture, packing):
    """The entropy bonus goes through the same unmerge gather as the logprobs."""
    model = tiny_model(architecture)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    samples = make_samples([prompt + [7, 7, 1], prompt + [8], prompt, prompt + [7, 2, 2, 2], [5, 5]], seed=3)
    total = sum(len(s.token_ids) for s in samples)
    expected = [separate_entropy(model, s) for s in samples]
    expected_grad = gradients(
        model,
        lambda: sum(entropy_loss(e, s, total) for e, s in zip(expected, samples, strict=True)).backward(),
    )
    got: list = [None] * len(samples)

    def run():
        for batch in microbatches(samples, packing, 12):
            logprobs, entropies = batch.forward_logprobs_and_entropy(model)
            for i, lp, e in zip(batch.sample_indices, logprobs, entropies, strict=True):
                assert lp.shape == e.shape
                got[i] = e
            sum(entropy_loss(got[i], samples[i], total) for i in batch.sample_indices).backward()

    grad = gradients(model, run)
    for e, want in zip(got, expected, strict=True):
        assert (e.detach() - want.detach()).abs().max().item() <= LOGPROB_TOLERANCE
    assert ((grad - expected_grad).norm() / expected_grad.norm()).item() <= GRADIENT_TOLERANCE


# bf16: tree packing is as exact as bf16 allows. Its error against an fp32 separate-forward
# reference is at most BF16_FACTOR times that of plain separate bf16 forwards (the bf16 noise
# floor), or the floor below, whichever is larger.
BF16_FACTOR = 2.0
# These tiny models' logits are below 1 in magnitude, where bf16's spacing is at most 2^-8, so
# rounding the target's logit to bf16 alone moves its logprob by up to 2^-9: an error this small
# is bf16's own, whatever the separate forwards happened to hit.
BF16_LOGPROB_FLOOR = 2.0**-9
# bf16's unit roundoff: merely storing the exact gradient in bf16 errs by up to this, relatively.
BF16_GRADIENT_FLOOR = 2.0**-8

# At init the tiny model attends almost uniformly, so a position off by one moves its logprobs
# by ~1e-4, far under bf16's ~2e-3 noise. Scaling q and k by 8 (attention scores by 64) makes
# position and mask mistakes stand out at bf16 resolution, while logits stay below 1.
ATTENTION_SHARPNESS = 8.0


def sharp_tiny_model(architecture: str, attn_implementation: str) -> torch.nn.Module:
    model = tiny_model(architecture, attn_implementation)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                parameter.mul_(ATTENTION_SHARPNESS)
    return model


BF16_PATHS = [
    pytest.param("cpu", "dense", "sdpa", id="cpu-dense-sdpa"),  # block-sparse SDPA
    pytest.param("cpu", "dense", "eager", id="cpu-dense-eager"),  # the full additive bf16 mask
    pytest.param(
        "cuda",
        "flex",
        "flex_attention",
        id="cuda-flex",
        marks=pytest.mark.skipif(
            not torch.cuda.is_available(), reason="flex attention backward needs CUDA in torch 2.13"
        ),
    ),
]


@pytest.mark.parametrize("architecture", ["qwen2", "llama"])
@pytest.mark.parametrize(("device", "attention", "attn_implementation"), BF16_PATHS)
def test_bf16_tree_is_as_exact_as_separate_bf16_forwards(
    device, attention, attn_implementation, architecture
):
    # Three copies of the same weights: the fp32 reference, and two bf16 models.
    reference = sharp_tiny_model(architecture, "sdpa").to(device)
    plain = sharp_tiny_model(architecture, "sdpa").to(device, torch.bfloat16)
    tree = sharp_tiny_model(architecture, attn_implementation).to(device, torch.bfloat16)
    samples = make_samples([[1, 2, 3, 4] * 10 + [i] * (5 + i) for i in range(5)] + [[7, 7, 7]], seed=0)
    want_logprobs, want_grad = forward_results(reference, samples, device)
    plain_logprobs, plain_grad = forward_results(plain, samples, device)
    tree_logprobs, tree_grad = forward_results(tree, samples, device, attention)

    def logprob_error(logprobs):
        return max((got - want).abs().max().item() for got, want in zip(logprobs, want_logprobs, strict=True))

    def gradient_error(grad):
        return ((grad - want_grad).norm() / want_grad.norm()).item()

    noise, error = logprob_error(plain_logprobs), logprob_error(tree_logprobs)
    assert 1e-4 < noise < 0.1  # really bf16 (fp32 would be ~1e-7), and still a sane model
    assert error <= max(BF16_FACTOR * noise, BF16_LOGPROB_FLOOR)
    assert error < 0.1
    noise, error = gradient_error(plain_grad), gradient_error(tree_grad)
    assert 1e-4 < noise < 0.1
    assert error <= max(BF16_FACTOR * noise, BF16_GRADIENT_FLOOR)
    assert error < 0.1
