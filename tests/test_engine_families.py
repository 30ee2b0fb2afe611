"""The rollout engine on every family of the matrix: behaviour logprobs from its kept KV
caches (ragged multi-turn batches with pad holes, shared prompts, sliding windows shorter than
the contexts, prefills in chunks) equal a fresh forward's, and a weight sync (all weights, or LoRA adapters: the
trainer's tensors in process, or a peft adapter folder as forge serve takes it) makes it
sample the new policy."""

from __future__ import annotations

import copy

import pytest
import torch

from forge.config import ConfigError, ModelConfig
from forge.models.families import FAMILIES, WINDOW
from forge.models.loading import choose_attn_implementation, load_model
from forge.rollout.engines.hf import HFEngine
from forge.rollout.engines.protocol import GenerationRequest
from forge.rollout.engines.shared_prefix import SharedPromptLayer
from forge.rollout.engines.updates import apply_adapter

TOLERANCE = 1e-5
STOP = 1  # the families' eos id


def rollout_model(name: str, seed: int = 0) -> torch.nn.Module:
    family = FAMILIES[name]
    config = family.build("eager", seed).config
    implementation = choose_attn_implementation(config, "auto", "cpu", "rollout.attn_implementation")
    return family.build(implementation, seed)


def fresh_logprobs(model, context: list[int], generated: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([context + generated])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return torch.tensor([logprobs[len(context) - 1 + i, t].item() for i, t in enumerate(generated)])


def play_ragged(engine: HFEngine, model, turns: int, seed: int, contexts: dict | None = None) -> int:
    """Episodes that share a prompt, sit out turns, stop at different lengths and get
    observations of different lengths (pad holes in the kept batch), and one per turn comes back
    differing from its cached tokens (a client that re-rendered them); every sampled token's
    logprob is checked against a fresh forward. `contexts` (episode id -> its tokens so far)
    carries episodes on from an earlier call, whose KV the engine holds; it is updated in place.
    Returns the longest context seen."""
    prompt = [5, 6, 7, 8]
    if contexts is None:
        contexts = {}
    if not contexts:
        contexts.update({f"e{i}": prompt + [9 + i] for i in range(4)})
    longest = 0
    for turn in range(turns):
        names = [n for i, n in enumerate(contexts) if (turn + i) % 5 != 0]
        requests = [
            GenerationRequest(contexts[n], 1 + (turn + i) % 4, episode_id=n) for i, n in enumerate(names)
        ]
        for i, (request, result) in enumerate(zip(requests, engine.generate(requests), strict=True)):
            want = fresh_logprobs(model, request.token_ids, result.token_ids)
            got = torch.tensor(result.logprobs)
            assert (got - want).abs().max().item() <= TOLERANCE, (turn, request.episode_id)
            observation = [20 + turn] * (1 + (i * 3 + turn + seed) % 7)
            sent = request.token_ids
            if i == turn % len(names):  # re-rendered: the cached KV is reused up to this token only
                sent = sent[:-1] + [30 + turn]
            contexts[request.episode_id] = sent + result.token_ids + observation
            longest = max(longest, len(contexts[request.episode_id]))
    return longest


def play_group(engine: HFEngine, model, turns: int) -> type:
    """A group of 4 episodes on one prompt longer than the windows: its first turn shares the
    prompt's KV; later turns sit episodes out and add observations of different lengths. Every
    token is checked against a fresh forward. Returns the kept cache layers' type after turn 1."""
    contexts = {f"g{i}": [5 + (i * 3) % 50 for i in range(3 * WINDOW)] for i in range(4)}
    layer_type = None
    for turn in range(turns):
        names = [n for i, n in enumerate(contexts) if turn == 0 or (turn + i) % 3 != 0]
        requests = [
            GenerationRequest(contexts[n], 2 + (turn + i) % 3, episode_id=n) for i, n in enumerate(names)
        ]
        for i, (request, result) in enumerate(zip(requests, engine.generate(requests), strict=True)):
            want = fresh_logprobs(model, request.token_ids, result.token_ids)
            assert (torch.tensor(result.logprobs) - want).abs().max().item() <= TOLERANCE, (
                turn,
                request.episode_id,
            )
            contexts[request.episode_id] = (
                request.token_ids + result.token_ids + [20 + turn] * (1 + (i + turn) % 4)
            )
        if turn == 0:
            layer_type = type(engine._batch.cache.layers[0])
    return layer_type


# Shared (llama, qwen3_moe, gpt_neox) and copied (mistral: sliding window) in the fast run.
GROUP_FAST = {"llama", "qwen3_moe", "gpt_neox", "mistral"}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[] if n in GROUP_FAST else [pytest.mark.slow]) for n in FAMILIES]
)
def test_a_groups_shared_prompt_samples_with_fresh_forward_logprobs(name):
    """Where the family's attention is plain sdpa (no window, soft-cap or sinks) the group's
    rows share one copy of the prompt's KV, read by Forge's shared-prompt attention; elsewhere
    it is copied into every row. Either way, behaviour logprobs are a fresh forward's."""
    model = rollout_model(name)
    engine = HFEngine(model, [STOP], pad_token_id=0, seed=3)
    layer_type = play_group(engine, model, turns=4)
    assert (layer_type is SharedPromptLayer) == engine.share_prompt


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[] if n in GROUP_FAST else [pytest.mark.slow]) for n in FAMILIES]
)
def test_new_episodes_start_from_another_episodes_cache_with_fresh_forward_logprobs(name, monkeypatch):
    """A group whose first episode came in an earlier call, then an episode whose prompt shares
    only a system prompt (longer than the windows) with them: each starts from the KV another
    episode holds, prefills the rest, and samples with a fresh forward's logprobs (those of the
    group ended and kept as `retire` keeps them, one copied out of the kept batch); as do two
    tasks in one call under a system prompt no episode holds, run once for both."""
    model = rollout_model(name)
    engine = HFEngine(model, [STOP], pad_token_id=0, seed=3)
    system = [5 + (i * 7) % 50 for i in range(3 * WINDOW + 4)]
    # GPT-J and CodeGen hold 128 positions: a shorter common start runs apart here.
    monkeypatch.setattr("forge.rollout.engines.episode_kv.SHARED_START_MIN_TOKENS", 4 * WINDOW)
    other = [4] + [5 + (i * 11) % 50 for i in range(4 * WINDOW)]
    calls = [
        [GenerationRequest(system + [60], 3, episode_id="a")],
        [GenerationRequest(system + [60], 3, episode_id=f"b{i}") for i in range(3)],
        [GenerationRequest(system + [61, 62], 3, episode_id="c")],
        # Two tasks under a system prompt no episode holds: it runs once, apart.
        [GenerationRequest(other + [60 + i, 61], 3, episode_id=f"d{i}") for i in range(2)],
    ]
    prefilled = []
    for requests in calls:
        if requests[0].episode_id == "c":  # the group has ended: only their kept KV is left
            for name in ("a", "b0", "b1", "b2"):
                engine.retire(name)
            assert engine.retired_episodes == 4 and engine.cached_episodes == 0
        results = engine.generate(requests)
        prefilled.append(sum(result.prefill_tokens for result in results))
        for request, result in zip(requests, results, strict=True):
            want = fresh_logprobs(model, request.token_ids, result.token_ids)
            assert (torch.tensor(result.logprobs) - want).abs().max().item() <= TOLERANCE, request.episode_id
    assert prefilled == [len(system) + 1, 1, 2, len(other) + 2 * 2]


def test_plain_sdpa_families_share_the_prompt_and_windowed_or_capped_ones_copy_it():
    shares = {name: HFEngine(rollout_model(name), [STOP], pad_token_id=0).share_prompt for name in FAMILIES}
    assert all(shares[name] for name in ["llama", "qwen3", "qwen3_moe", "gpt_neox", "gptj", "codegen"])
    assert not shares["mistral"] and not shares["gemma2"] and not shares["qwen2"]
    assert not shares["deepseek_v3"]  # MLA caches latents, not keys: the engine's check copies its prompt


def test_the_shared_prompt_is_one_copy_however_many_rows():
    model = rollout_model("llama")
    engine = HFEngine(model, [STOP], pad_token_id=0, seed=3)
    prompt = list(range(2, 40))
    engine.generate([GenerationRequest(prompt, 3, episode_id=f"e{i}") for i in range(8)])
    layer = engine._batch.cache.layers[0]
    assert layer.prompt_keys.shape[0] == 1 and layer.prompt_keys.shape[2] == len(prompt)
    assert layer.keys.shape[0] == 8 and layer.keys.shape[2] < len(
        prompt
    )  # the rows hold only their own tokens


# Prefill chunks of 7 tokens (rows x columns): play_ragged's 3-4 rows take 1-2 columns a chunk,
# so chunk edges fall inside pad runs and windows; play_group's prompt (3 windows) takes 7.
CHUNK = 7


@pytest.mark.parametrize("name", list(FAMILIES))
def test_engine_behaviour_logprobs_equal_a_fresh_forward(name):
    """Prefilled in chunks (the one-forward prefill plays in the other tests here)."""
    model = rollout_model(name)
    engine = HFEngine(model, [STOP], pad_token_id=0, seed=3, prefill_chunk_tokens=CHUNK)
    assert play_ragged(engine, model, turns=8, seed=0) > 4 * WINDOW  # far past every window


# Shared prompt (llama), sliding windows (mistral; gemma3, one mask per layer type).
@pytest.mark.parametrize("name", ["llama", "mistral", "gemma3"])
def test_a_groups_prompt_prefilled_in_chunks_samples_with_fresh_forward_logprobs(name):
    model = rollout_model(name)
    engine = HFEngine(model, [STOP], pad_token_id=0, seed=3, prefill_chunk_tokens=CHUNK)
    assert (play_group(engine, model, turns=4) is SharedPromptLayer) == engine.share_prompt


def test_a_chunked_prefill_stays_in_its_budget_and_fills_one_cache_buffer_sized_once():
    """A long prompt's chunks are written into one buffer per layer, reserved for the whole
    prompt and the reply at the first chunk (growing it per chunk would copy it each time), and
    a later turn's chunks extend it with at most one reservation."""
    model = rollout_model("mistral")
    engine = HFEngine(model, [STOP], pad_token_id=0, seed=3, prefill_chunk_tokens=CHUNK)
    forwards: list[tuple[int, int, int]] = []  # tokens computed, layer 0's key buffer and its size

    def record(module, args, kwargs, output):
        keys = output.cache.layers[0]._keys
        forwards.append((kwargs["input_ids"].numel(), keys.data_ptr(), keys.shape[2]))

    model.register_forward_hook(record, with_kwargs=True)
    prompts = {"a": [5 + i % 50 for i in range(40)], "b": [7 + i % 40 for i in range(23)]}
    requests = [GenerationRequest(prompt, 4, episode_id=name) for name, prompt in prompts.items()]
    results = engine.generate(requests)
    prefill = forwards[: -(max(len(r.token_ids) for r in results) - 1) or None]
    assert len(prefill) == 40 // (CHUNK // 2) + 1 and all(tokens <= CHUNK for tokens, _, _ in prefill)
    assert {(pointer, size) for _, pointer, size in forwards} == {(forwards[0][1], 40 + 4)}
    forwards.clear()
    later = [
        GenerationRequest(r.token_ids + result.token_ids + [30] * 9, 4, episode_id=r.episode_id)
        for r, result in zip(requests, results, strict=True)
    ]
    engine.generate(later)
    assert len({pointer for _, pointer, _ in forwards}) == 1 and all(
        tokens <= CHUNK for tokens, _, _ in forwards
    )


def test_an_unset_prefill_chunk_is_the_devices_default_and_zero_is_one_forward():
    from forge.rollout.engines.hf import CPU_PREFILL_CHUNK, GPU_PREFILL_CHUNK, default_prefill_chunk

    assert HFEngine(rollout_model("llama"), [STOP], pad_token_id=0).prefill_chunk_tokens == CPU_PREFILL_CHUNK
    assert default_prefill_chunk(torch.device("cuda")) == GPU_PREFILL_CHUNK > CPU_PREFILL_CHUNK
    assert (
        HFEngine(rollout_model("llama"), [STOP], pad_token_id=0, prefill_chunk_tokens=0).prefill_chunk_tokens
        is None
    )


def test_a_negative_prefill_chunk_is_refused_naming_the_setting():
    with pytest.raises(ValueError, match="rollout.prefill_chunk_tokens"):
        HFEngine(rollout_model("llama"), [STOP], pad_token_id=0, prefill_chunk_tokens=-1)


# Tied embeddings (gemma2) and expert weights (qwen3_moe) in the fast run; every family in the slow one.
SYNC_FAST = {"gemma2", "qwen3_moe"}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[] if n in SYNC_FAST else [pytest.mark.slow]) for n in FAMILIES]
)
def test_weight_sync_makes_the_engine_sample_the_new_policy(name):
    model, trained = rollout_model(name), rollout_model(name, seed=1)
    engine = HFEngine(model, [STOP], pad_token_id=0, seed=3)
    episodes: dict = {}
    play_ragged(engine, model, turns=2, seed=0, contexts=episodes)  # caches from the old weights
    engine.load_weights({k: v.clone() for k, v in trained.state_dict().items()}, version=1)
    assert engine.policy_version == 1
    play_ragged(engine, trained, turns=3, seed=1, contexts=episodes)  # the same episodes go on


def lora_pair(name: str, folder) -> tuple[torch.nn.Module, torch.nn.Module, ModelConfig]:
    """A family's checkpoint loaded as Forge loads it with LoRA on its attention projections:
    the trainer's model (adapters trainable) and a rollout worker's (rollout attention)."""
    family = FAMILIES[name]
    family.build("eager").save_pretrained(folder)
    cfg = ModelConfig(
        path=str(folder), lora=dict(enabled=True, r=4, alpha=8, target_modules=list(family.attention_modules))
    )
    trainer = load_model(folder, cfg, trainable=True)
    worker = load_model(folder, cfg, attn_implementation="auto", setting_key="rollout.attn_implementation")
    return trainer, worker, cfg


def train_adapters(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Move every adapter far from its initial value (peft starts B at zero, a no-op) and return
    what the trainer publishes: its trainable tensors (Trainer.weights)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    state = model.state_dict()
    return {n: state[n].detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_merged_agrees(engine: HFEngine, adapted: torch.nn.Module) -> None:
    """The engine's next-token distribution equals the adapters merged into the base weights."""
    merged = copy.deepcopy(adapted).merge_and_unload().eval()
    context = [5, 6, 7, 8] + list(range(9, 9 + 3 * WINDOW))
    with torch.no_grad():
        logits = merged(input_ids=torch.tensor([context])).logits[0, -1].float()
    expected = torch.log_softmax(logits / engine.temperature, dim=-1)
    assert (engine.next_token_logprobs(context) - expected).abs().max().item() <= TOLERANCE


# Soft-capped sliding layers and tied embeddings (gemma2) and fused attention projections
# (phi3's qkv_proj) in the fast run; every family in the slow one.
LORA_FAST = {"gemma2", "phi3"}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[] if n in LORA_FAST else [pytest.mark.slow]) for n in FAMILIES]
)
def test_a_lora_adapter_sync_makes_the_engine_sample_the_adapted_policy(name, tmp_path):
    trainer, worker, _ = lora_pair(name, tmp_path)
    engine = HFEngine(worker, [STOP], pad_token_id=0, seed=3)
    episodes: dict = {}
    play_ragged(engine, worker, turns=2, seed=0, contexts=episodes)  # caches from the initial adapters
    for version, seed in [(1, 11), (2, 12)]:
        engine.load_weights(train_adapters(trainer, seed), version=version)
        assert engine.policy_version == version
        trainer.eval()
        play_ragged(engine, trainer, turns=3, seed=version, contexts=episodes)  # the same episodes go on
        assert_merged_agrees(engine, trainer)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[] if n in LORA_FAST else [pytest.mark.slow]) for n in FAMILIES]
)
def test_a_lora_adapter_folder_makes_the_engine_sample_the_adapted_policy(name, tmp_path):
    """forge serve's path: a base model, then adapter folders (the first wraps it in peft, the
    next replaces the adapter weights)."""
    trainer, _, cfg = lora_pair(name, tmp_path / "model")
    base = load_model(
        tmp_path / "model",
        ModelConfig(path=cfg.path),
        attn_implementation="auto",
        setting_key="rollout.attn_implementation",
    )
    engine = HFEngine(base, [STOP], pad_token_id=0, seed=3)
    episodes: dict = {}
    play_ragged(engine, base, turns=2, seed=0, contexts=episodes)  # caches from the base model
    for version, seed in [(1, 21), (2, 22)]:
        train_adapters(trainer, seed)
        trainer.save_pretrained(tmp_path / f"adapter{version}")
        engine.model = apply_adapter(engine.model, tmp_path / f"adapter{version}")
        engine.load_weights({}, version=version)  # what forge serve's update does after loading
        trainer.eval()
        play_ragged(engine, trainer, turns=3, seed=version, contexts=episodes)  # the same episodes go on
        assert_merged_agrees(engine, trainer)


def test_lora_targets_the_family_lacks_are_refused_naming_the_setting(tmp_path):
    FAMILIES["gpt_neox"].build("eager").save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"target_modules names \['q_proj'.*query_key_value"):
        load_model(tmp_path, ModelConfig(path=str(tmp_path), lora=dict(enabled=True)))
    FAMILIES["phi3"].build("eager").save_pretrained(tmp_path)  # some targets exist: still refused
    with pytest.raises(ConfigError, match=r"names \['q_proj', 'k_proj', 'v_proj'\].*qkv_proj"):
        load_model(tmp_path, ModelConfig(path=str(tmp_path), lora=dict(enabled=True)))
