"""Typed run configuration: YAML load, dotted command-line overrides, validation.

Every section is a pydantic model that forbids unknown keys, so a typo in a YAML file
or an override fails at once with the key's full dotted path and what it expects.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# What can name an environment variable (rollout.server_api_key_env and its admin twin).
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ConfigError(ValueError):
    """A config file or override the user can fix; the message names the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TinyModelConfig(Section):
    """The random-init model built when `model.path` is not set (offline smoke runs)."""

    architecture: Literal["qwen2", "llama"] = Field(
        "llama",
        description="transformers architecture. With qwen2, transformers 5's AutoTokenizer builds "
        "Qwen2Tokenizer for the saved checkpoint, which reads the tiny tokenizer's text as no tokens; "
        "load it with PreTrainedTokenizerFast or forge's load_tokenizer",
    )
    hidden_size: int = Field(128, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    num_kv_heads: int = Field(2, gt=0)
    intermediate_size: int = Field(256, gt=0)
    max_position_embeddings: int = Field(1024, gt=0)
    extra_words: list[str] = Field(
        default_factory=list,
        description="more words the tokenizer keeps whole (single tokens): an env's own action words, so a "
        "random model can sample them",
    )

    @model_validator(mode="after")
    def _check_words(self) -> TinyModelConfig:
        bad = [word for word in self.extra_words if not word or any(c.isspace() for c in word)]
        if bad:
            raise ValueError(f"model.tiny.extra_words {bad}: each must be one non-empty word without spaces")
        return self


class LoraConfig(Section):
    enabled: bool = Field(False, description="train LoRA adapters with peft instead of all weights")
    r: int = Field(8, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="dropout on the adapters' inputs: the one randomness the trainer's forwards keep (they "
        "run the model in eval mode), so above 0 an on-policy importance ratio is no longer exactly 1",
    )
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="module names peft wraps",
    )


class ModelConfig(Section):
    path: str | None = Field(
        None,
        description="a local Hugging Face checkpoint folder, or a hub model id (org/name: each process finds "
        "it in its node's Hugging Face cache, downloading it when missing); unset builds a tiny random model "
        "(offline)",
    )
    revision: str = Field(
        "main",
        description="for a hub id in model.path: the branch, tag or commit to load (a run pins the commit "
        "it found at start for all its processes)",
    )
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="the weights' dtype in the trainer and the engines; float16 trains only LoRA adapters "
        "(they are float32): AdamW's state underflows in float16, so full weights are refused",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="where the trainer and rollout workers run their models: auto = CUDA in a process that "
        "reserves a GPU (train.num_gpus, rollout.num_gpus_per_worker), else CPU",
    )

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "attn_implementation" in data:
            raise ValueError(
                "model.attn_implementation is set per role now: trainer.attn_implementation and "
                "rollout.attn_implementation (each auto, sdpa, eager or flex_attention)"
            )
        return data


class LatencyConfig(Section):
    """Extra delay on every env step, for a straggler workload on any env: lognormal with
    median_ms and p99_ms (e.g. 50 and 2000), capped at max_ms, seeded per episode. The wait
    is asynchronous: other episodes on the worker go on meanwhile."""

    dist: Literal["none", "lognormal"] = Field("none", description="none: no added latency")
    median_ms: float = Field(50.0, gt=0, description="median delay per step, in milliseconds")
    p99_ms: float = Field(2000.0, gt=0, description="99th-percentile delay per step, in milliseconds")
    max_ms: float | None = Field(
        None, gt=0, description="cap on one delay, in milliseconds; unset: half of env.step_timeout_s"
    )
    seed: int = Field(0, description="mixed with each episode's seed: the same seeds draw the same delays")

    @model_validator(mode="after")
    def _check_tail(self) -> LatencyConfig:
        if self.dist == "lognormal" and self.p99_ms <= self.median_ms:
            raise ValueError(
                f"env.latency.p99_ms={self.p99_ms:g} must be above median_ms={self.median_ms:g} "
                "(a lognormal's tail lies above its median): raise p99_ms or lower median_ms"
            )
        if self.max_ms is not None and self.max_ms < self.median_ms:
            raise ValueError(
                f"env.latency.max_ms={self.max_ms:g} is below median_ms={self.median_ms:g}: "
                "it would cap most delays; raise max_ms or leave it unset"
            )
        return self


class EnvConfig(Section):
    name: str = Field(
        "guess_number",
        description="registered env name (entry point group forge.envs) or package.module:ClassName",
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the env class")
    tasks: str | None = Field(
        None,
        description="local jsonl/parquet/arrow file or dataset name; unset lets the env generate its tasks",
    )
    num_tasks: int = Field(10_000, gt=0, description="procedurally generated tasks (when tasks is unset)")
    tasks_timeout_s: float = Field(
        300.0, gt=0, description="limit on generate_tasks (when tasks is unset), checked before a run starts"
    )
    step_timeout_s: float = Field(
        30.0, gt=0, description="harness-enforced limit on building an env and on one env step"
    )
    stuck_grace_s: float = Field(
        10.0,
        ge=2.0,  # past the guard's re-arm period (1 s), with room for a busy machine
        description="an inline (blocking = False) env call that holds its process's event loop this long past "
        "step_timeout_s (or step_timeout_s past it, if longer) ends the process as stuck in C code",
    )
    episode_timeout_s: float = Field(600.0, gt=0, description="harness-enforced limit on one episode")
    max_error_fraction: float = Field(
        0.5,
        ge=0,
        le=1,
        description="a run stops (exit code 1) when more than this share of its episodes errored over the last "
        "error_window_steps steps (1: never stops)",
    )
    error_window_steps: int = Field(5, gt=0, description="steps over which max_error_fraction is measured")
    latency: LatencyConfig = Field(default_factory=LatencyConfig)

    @model_validator(mode="after")
    def _check_latency_cap(self) -> EnvConfig:
        max_ms = self.latency.max_ms
        if self.latency.dist != "none" and max_ms is not None and max_ms / 1000.0 >= self.step_timeout_s:
            raise ValueError(
                f"env.latency.max_ms={max_ms:g} reaches env.step_timeout_s={self.step_timeout_s:g} s: a delay that "
                "long would end its episode as a timeout; set env.latency.max_ms below step_timeout_s * 1000"
            )
        return self


class RolloutConfig(Section):
    num_workers: int = Field(2, gt=0, description="RolloutWorker actors")
    tasks_per_step: int = Field(4, gt=0, description="distinct tasks per training step")
    group_size: int = Field(8, gt=0, description="episodes per task (G in GRPO)")
    max_rounds_per_step: int = Field(
        1,
        gt=0,
        description="dynamic sampling (DAPO's; verl's filter_groups with max_num_gen_batches): above 1, a sync "
        "step whose groups have fewer than tasks_per_step with learning signal (an advantage not 0) plays another "
        "round of tasks (as many as the rate it found them so far says it needs, at most tasks_per_step), up to "
        "this many rounds, and trains on the first tasks_per_step groups with signal only; an async run leaves "
        "out finished groups without signal, up to (this - 1) x tasks_per_step per batch; 1: every group "
        "trained on",
    )
    max_turns: int = Field(8, gt=0, description="model turns per episode before it ends as truncated")
    max_new_tokens: int = Field(16, gt=0, description="generation cap per model call")
    max_context_tokens: int = Field(
        1024,
        gt=0,
        description="an episode's tokens (prompt, replies, observations) at most; a prompt that leaves no room "
        "for max_new_tokens errors its episode (never cut)",
    )
    prefill_chunk_tokens: int | None = Field(
        None,
        ge=0,
        description="the in-process engine (and forge serve) prefills new tokens in forwards of at most this "
        "many (rows x columns, pads included), its progress beating the stuck guard between them; bounds "
        "a long context's prefill memory; null: 2048 on CPU, 16384 on a GPU; 0: one forward",
    )
    temperature: float = Field(
        1.0,
        gt=0,
        description="sampling temperature; the trainer takes logprobs at it too, so the policy trained is "
        "softmax(logits / temperature), the one sampled",
    )
    top_p: float = Field(1.0, gt=0, le=1.0)
    num_cpus_per_worker: float = Field(0.5, gt=0, description="CPUs Ray reserves per worker (placement only)")
    num_gpus_per_worker: float = Field(0.0, ge=0)
    engine: Literal["inprocess", "server", "remote"] = Field(
        "inprocess",
        description="where generation runs: inside each rollout worker; in num_engines `forge serve` actors "
        "Forge starts (workers then hold no model and reserve no CPU); or on rollout.servers run by someone else",
    )
    servers: list[str] = Field(
        default_factory=list,
        description="engine: remote: server URLs, http://host:port (forge serve), vllm+http://... or sglang+http://...",
    )
    server_api_key_env: str | None = Field(
        None,
        description="engine: remote: the environment variable holding the API key the servers were started "
        "with (vllm serve --api-key, SGLang --api-key), sent as Authorization: Bearer on every request; set it "
        "on every node (where Ray was started), as HF_TOKEN. The variable's name, never the key: the config "
        "is saved with the run",
    )
    server_admin_api_key_env: str | None = Field(
        None,
        description="engine: remote: the environment variable holding the --admin-api-key of SGLang servers "
        "started with one, sent on their admin routes (pause, weight updates, LoRA loads, abort)",
    )
    num_engines: int = Field(2, gt=0, description="engine: server: forge serve actors to start")
    num_cpus_per_engine: float = Field(
        0.5, ge=0, description="engine: server: CPUs each engine actor reserves"
    )
    num_gpus_per_engine: float = Field(
        0.0, ge=0, description="engine: server: GPUs each engine actor reserves"
    )
    engine_host: str = Field(
        "127.0.0.1",
        description="engine: server: address the engines listen on (0.0.0.0 when workers run on other nodes)",
    )
    prefix_cache_tokens: int = Field(
        65536,
        ge=0,
        description="engine: server: episodes' KV each engine keeps between calls, in tokens: live ones', and "
        "ended ones' for later episodes to start from (dropped first), least recently used dropped first",
    )
    max_engine_restarts: int = Field(
        3,
        ge=0,
        description="engine: server: lost engines replaced by new ones over a run (their episodes stay lost)",
    )
    engine_timeout_s: float = Field(
        120.0,
        gt=0,
        description=(
            "a generate call or weight update an engine has not answered by then counts it lost (vLLM servers: "
            "each step of the NCCL weight transfer, the trainer's group rendezvous and broadcast included; "
            "engine: server with weight_sync=broadcast: the gloo group's rendezvous and each broadcast); "
            "with every server lost, how long a run waits for one to come back before it stops"
        ),
    )
    weight_sync: Literal["auto", "object_store", "folder", "broadcast"] = Field(
        "auto",
        description="engine: server: how new weights reach the engines: the Ray object store, a safetensors "
        "folder (rollout.weight_dir, else a temp folder; shared across nodes), a gloo broadcast group "
        "(through host memory, GPU engines too); "
        "auto = the fastest measured per case (bench.weight_sync)",
    )
    weight_dir: str | None = Field(
        None,
        description="engine: remote with SGLang servers: a folder trainer and servers share, for new weights",
    )
    torch_threads: int | None = Field(
        None,
        gt=0,
        description="torch intra-op threads per worker; unset: num_cpus_per_worker rounded down, at least 1. "
        "May exceed the reservation where processes take turns (sync mode: the trainer and a worker can "
        "each use every core)",
    )

    attn_implementation: Literal["auto", "sdpa", "eager", "flex_attention"] = Field(
        "auto",
        description="the rollout engine's transformers attention: auto = sdpa where the model family "
        "has it, else eager",
    )

    @field_validator("server_api_key_env", "server_admin_api_key_env")
    @classmethod
    def _check_key_env(cls, value: str | None) -> str | None:
        # Not echoed back (see _describe): a key pasted in place of its variable's name.
        if value is None or ENV_NAME.fullmatch(value):
            return value
        raise ValueError(
            "name the environment variable that holds the key (e.g. VLLM_API_KEY), not the key itself: the "
            "config is saved with the run. Export the key in a variable and name that variable here"
        )

    @property
    def threads(self) -> int:
        """The torch thread count a worker runs at."""
        return self.torch_threads or max(1, int(self.num_cpus_per_worker))


def _registered(name: str, registry: dict[str, Any], what: str) -> str:
    """`name` if the registry holds it: an unknown one stopped the trainer (the loss) or the
    driver after the first rollout (the advantage), not the config."""
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}; use one of {', '.join(sorted(registry))}")
    return name


_CLIP_READ_BY = {
    "clip_low": "ppo_clip",
    "clip_high": "ppo_clip",
    "cispo_clip_low": "cispo",
    "cispo_clip_high": "cispo",
    "gspo_clip_low": "gspo",
    "gspo_clip_high": "gspo",
}


class TrainConfig(Section):
    mode: Literal["sync", "async"] = "sync"
    max_steps: int = Field(100, gt=0)
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    warmup_steps: int = Field(0, ge=0, description="optimizer steps of linear learning-rate warmup from 0")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant",
        description="learning rate after warmup: constant, or decayed to min_lr_ratio * learning_rate "
        "at the last of the run's max_steps * minibatches_per_step * epochs_per_step optimizer steps",
    )
    min_lr_ratio: float = Field(
        0.0, ge=0, le=1, description="where linear / cosine decay ends, as a fraction"
    )
    minibatches_per_step: int = Field(
        1, gt=0, description="optimizer steps per rollout batch, each on a disjoint slice (PPO-style)"
    )
    epochs_per_step: int = Field(
        1,
        gt=0,
        description="passes over each rollout batch (TRL's num_iterations, verl's ppo_epochs), each "
        "minibatches_per_step optimizer steps on a fresh shuffle; passes after the first are off-policy",
    )
    advantage: str = Field(
        "grpo",
        description="advantage estimator: grpo, dr_grpo, rloo, reinforce_pp_baseline (forge.reward.advantages)",
    )
    advantage_std: Literal["outcome", "reward"] = Field(
        "outcome",
        description="what grpo / reinforce_pp_baseline divide by: the spread of the raw outcomes "
        "(falling back to reward.outcome_gap where they do not vary), so shaping keeps its size; "
        "'reward' is textbook std normalisation of the shaped reward, which blows small speed "
        "differences in all-success groups up to full-size advantages",
    )
    mask_truncated: bool = Field(
        False,
        description="leave out of the loss every episode with a reply cut at rollout.max_new_tokens (it ended "
        "without the model's end of turn; TRL's mask_truncated_completions, DAPO's overlong filtering): its "
        "reward still counts in its group's advantages; with one-token replies (the smoke run) that is every "
        "episode",
    )
    negative_advantage_weight: float = Field(
        1.0,
        gt=0,
        allow_inf_nan=False,
        description="advantages below 0 are multiplied by this after the estimator (and sub-agents' "
        "too), in every mode; below 1 softens the push down on failed episodes' tokens, which on "
        "a mostly-failing start can move the policy's mass onto rarely-sampled tokens; 1: unweighted",
    )
    loss: str = Field("pg", description="policy loss: pg, ppo_clip, cispo, gspo (forge.train.losses)")
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"] = Field(
        "token_mean",
        description="how token losses become the batch's loss: token_mean, over every trained token of the "
        "optimizer batch (DAPO; TRL's dapo, bnpo); seq_mean_token_mean, each sequence's token mean, then their "
        "mean (TRL's grpo); seq_mean_token_sum, each sequence's token sum over the number of sequences (Dr. GRPO, "
        "which TRL also divides by max_completion_length)",
    )
    clip_low: float = Field(
        0.2, ge=0, lt=1, description="ppo_clip: ratio clipped to [1 - clip_low, 1 + clip_high]"
    )
    clip_high: float = Field(0.28, ge=0, description="ppo_clip: DAPO clip-higher upper bound")
    cispo_clip_low: float = Field(0.0, ge=0, description="cispo: lower bound of the stop-gradient IS weight")
    cispo_clip_high: float = Field(5.0, gt=0, description="cispo: upper bound of the stop-gradient IS weight")
    gspo_clip_low: float = Field(
        3e-4, ge=0, lt=1, description="gspo: sequence ratio clipped to [1 - low, 1 + high]"
    )
    gspo_clip_high: float = Field(4e-4, ge=0, description="gspo: upper clip of the sequence ratio")
    tis_cap: float | None = Field(None, gt=0, description="truncated importance sampling cap; unset disables")
    kl_coef: float = Field(
        0.0,
        ge=0,
        description="weight of the KL to the frozen initial policy, k3 per trained token added to its loss "
        "(TRL's beta, verl's kl_loss_coef with low_var_kl); 0 disables and loads no reference",
    )
    entropy_coef: float = Field(
        0.0,
        ge=0,
        description="bonus on the policy's entropy at trained tokens (loss -= coef * entropy); "
        "keeps groups exploring; costs one softmax over the vocabulary per token; 0 disables",
    )
    skip_zero_advantage: bool = Field(
        True,
        description="leave samples with advantage exactly 0 (groups that all scored the same) out of the "
        "forward and backward: the same gradient, less compute; applies when the loss vanishes there "
        "(every built-in loss) and kl_coef and entropy_coef are 0",
    )
    max_steps_without_signal: int = Field(
        20,
        ge=0,
        description="a run that has not yet had a step with learning signal (an episode whose advantage is not "
        "0) stops (exit code 1) after this many steps, or at its last step if sooner: it trains on nothing. "
        "After signal, this many steps without it in a row are said once and the run goes on; 0: off",
    )
    checkpoint_every: int = Field(
        50,
        ge=0,
        description="write a resumable checkpoint every this many steps (and at the last); 0 disables",
    )
    keep_checkpoints: int = Field(2, ge=0, description="resumable checkpoints kept on disk; 0 keeps all")
    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved for the trainer (per trainer process)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved for the trainer (per trainer process)")
    torch_threads: int | None = Field(
        None,
        gt=0,
        description="torch intra-op threads per trainer process; unset: num_cpus rounded down, at least 1",
    )

    @property
    def threads(self) -> int:
        """The torch thread count a trainer process runs at."""
        return self.torch_threads or max(1, int(self.num_cpus))

    num_trainers: int = Field(
        1,
        gt=0,
        description="data-parallel trainer processes (Ray actors, one process group); 1 = single trainer",
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="num_trainers > 1: ddp copies the model to each, fsdp (FSDP2) shards it"
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no",
        description="num_trainers > 1: compute in this precision (bf16 on GPU; fp16 only under ddp); "
        "the single trainer uses model.dtype",
    )
    master_weights: bool = Field(
        True,
        description="training full weights in model.dtype=bfloat16 (one trainer, or several under ddp or "
        "fsdp), step float32 copies of them and round them back, and sum a step's micro-batch gradients in "
        "float32 (8 more bytes a parameter for the copy and float32 moments, 4 more from a step's first "
        "backward to the step), so steps smaller than a bfloat16 weight's precision add up; false: bfloat16 "
        "weights, moments and gradient sums, where those steps are lost (at learning rate 1e-6 most weights "
        "never move)",
    )

    @field_validator("loss")
    @classmethod
    def _check_loss(cls, value: str) -> str:
        from forge.train.losses import LOSSES  # the registry the trainer looks the name up in

        return _registered(value, LOSSES, "loss")

    @field_validator("advantage")
    @classmethod
    def _check_advantage(cls, value: str) -> str:
        from forge.reward.advantages import ADVANTAGE_ESTIMATORS

        return _registered(value, ADVANTAGE_ESTIMATORS, "advantage estimator")

    @model_validator(mode="after")
    def _check_clips_read(self) -> TrainConfig:
        # Each clip is read by one loss alone: set for another, it changed nothing, silently
        # (TRL clips every GRPO loss; Forge's default, pg, clips none). At its default it is let be,
        # since a run's config.yaml writes every key.
        for knob, loss in _CLIP_READ_BY.items():
            if self.loss != loss and getattr(self, knob) != type(self).model_fields[knob].default:
                raise ValueError(
                    f"train.{knob}={getattr(self, knob):g} is read only by train.loss={loss}, and this run "
                    f"trains train.loss={self.loss}: set train.loss={loss}, or leave train.{knob} unset"
                )
        return self

    @property
    def optimizer_steps_per_step(self) -> int:
        """Optimizer steps a rollout batch takes (at most: fewer when it has fewer samples
        than minibatches_per_step)."""
        return self.minibatches_per_step * self.epochs_per_step

    @model_validator(mode="after")
    def _check_schedule(self) -> TrainConfig:
        optimizer_steps = self.optimizer_steps_per_step * self.max_steps
        if self.warmup_steps > optimizer_steps:  # equal: the last step takes the whole rate
            raise ValueError(
                f"train.warmup_steps={self.warmup_steps} is more than the run's {optimizer_steps} optimizer steps "
                "(train.max_steps x train.minibatches_per_step x train.epochs_per_step): the learning rate "
                "would never reach train.learning_rate; lower train.warmup_steps (it counts optimizer steps)"
            )
        if self.min_lr_ratio and self.lr_schedule == "constant":
            raise ValueError(
                f"train.min_lr_ratio={self.min_lr_ratio:g} is where a decay ends, and train.lr_schedule=constant "
                "decays nothing: set train.lr_schedule to linear or cosine, or leave train.min_lr_ratio unset"
            )
        return self

    @model_validator(mode="after")
    def _check_precision(self) -> TrainConfig:
        if self.strategy == "fsdp" and self.mixed_precision == "fp16":
            raise ValueError(
                "train.strategy fsdp takes train.mixed_precision no or bf16 (fp16 needs loss scaling)"
            )
        return self


class TrainerConfig(Section):
    packing: Literal["tree", "padded"] = Field("tree", description="how samples are packed for the forward")
    max_tokens_per_microbatch: int = Field(8192, gt=0)
    attn_implementation: Literal["auto", "sdpa", "eager", "flex_attention"] = Field(
        "auto",
        description="the trainer's transformers attention, under Forge's tree attention: auto = sdpa "
        "where the model family has it, else flex_attention on a GPU, else eager",
    )
    attention: Literal["auto", "dense", "flex"] = Field(
        "auto",
        description="how the tree rule is laid out: flex = a flex-attention BlockMask (needs "
        "attn_implementation flex_attention), dense = block-sparse SDPA (a full mask on eager), auto = flex "
        "exactly when the model runs flex_attention",
    )
    self_check: Literal["fallback", "stop", "off"] = Field(
        "fallback",
        description="before the first step, compare the tree path with separate forwards on a few short "
        "random sequences through the loaded model; on a disagreement print it and fall back to padded "
        "packing (fallback), or raise (stop). Under gradient checkpointing also check that the layers apply "
        "no dropout of their own (OPT's): fallback trains without checkpointing",
    )
    gradient_checkpointing: bool = False


class SpeedShapingConfig(Section):
    """Bonus for finishing fast: weight * h(measure / baseline), h decreasing from 1 to 0."""

    enabled: bool = Field(False, description="add the speed term to the reward")
    weight: float = Field(
        0.2,
        ge=0,
        description="largest bonus, as a fraction of reward.outcome_gap; a policy may trade up to "
        "weight / (1 + weight) of its successes for full speed, so keep it small",
    )
    measure: Literal[
        "turns", "generated_tokens", "wall_seconds", "tool_seconds", "critical_steps", "critical_seconds"
    ] = Field(
        "turns",
        description="what counts as slow; critical_steps: each model turn plus the longest sub-agent run it "
        "started (= turns without sub-agents), critical_seconds: the episode's time on its critical path",
    )
    baseline: Literal["group_median", "task_moving_average", "fixed"] = Field(
        "group_median",
        description="what the measure is divided by: the median over the group's episodes the term "
        "applies to, a per-task moving average of it, or fixed_baseline",
    )
    fixed_baseline: float | None = Field(None, gt=0, description="baseline for baseline: fixed")
    moving_average_decay: float = Field(
        0.9, ge=0, lt=1, description="per-task moving average: weight of the old value per update"
    )
    h: Literal["linear", "exponential", "sigmoid"] = Field(
        "linear",
        description="decreasing map of x = measure/baseline onto [0, 1], 0.5 at x = 1: "
        "linear 1 - x/2 (clipped), exponential 2^-x, sigmoid 1/(1 + exp(sharpness (x - 1)))",
    )
    sharpness: float = Field(4.0, gt=0, description="slope of the sigmoid h")
    apply_to: Literal["success", "all"] = Field(
        "success", description="episodes that earn the bonus; 'all' also rewards failing fast"
    )

    @model_validator(mode="after")
    def _check_fixed(self) -> SpeedShapingConfig:
        if self.enabled and self.baseline == "fixed" and self.fixed_baseline is None:
            raise ValueError("baseline 'fixed' needs reward.speed.fixed_baseline (a positive number)")
        return self


class LengthPenaltyConfig(Section):
    """Kimi k1.5 length penalty: 0.5 - (len - min) / (max - min) over the group's generated
    tokens, kept whole for successes and only its negative part for failures."""

    enabled: bool = False
    weight: float = Field(0.1, ge=0, description="scale, as a fraction of reward.outcome_gap")


class OverlongConfig(Section):
    """DAPO soft overlong penalty: 0 up to max_tokens - buffer_tokens generated tokens, then
    falling linearly to -1 at max_tokens and beyond."""

    enabled: bool = False
    weight: float = Field(0.1, ge=0, description="largest penalty, as a fraction of reward.outcome_gap")
    max_tokens: int = Field(4096, gt=0, description="generated tokens at which the full penalty applies")
    buffer_tokens: int = Field(1024, gt=0, description="width of the linear ramp before max_tokens")

    @model_validator(mode="after")
    def _check_buffer(self) -> OverlongConfig:
        if self.buffer_tokens > self.max_tokens:
            raise ValueError(
                f"reward.overlong.buffer_tokens={self.buffer_tokens} exceeds max_tokens={self.max_tokens}"
            )
        return self


class TurnDiscountConfig(Section):
    """Discount a success per extra turn: weight * (gamma^(turns - 1) - 1)."""

    enabled: bool = False
    weight: float = Field(0.1, ge=0, description="largest penalty, as a fraction of reward.outcome_gap")
    gamma: float = Field(0.9, gt=0, le=1, description="discount per turn after the first")


class ParlConfig(Section):
    """PARL's terms for agent clusters (swarm.enabled): a bonus for sub-agents spawned and one
    for sub-agents that finished, each weight annealed linearly to 0 over the first
    anneal_fraction of train.max_steps (they exist to stop serial collapse early on)."""

    enabled: bool = Field(False, description="add the spawn and finish terms to the reward")
    spawn_weight: float = Field(
        0.1,
        ge=0,
        description="largest bonus for spawning, as a fraction of outcome_gap: weight * min(spawned, "
        "spawn_cap) / spawn_cap",
    )
    spawn_cap: int = Field(
        4, gt=0, description="sub-agents spawned in an episode at which the spawn term is full"
    )
    finish_weight: float = Field(
        0.1,
        ge=0,
        description="bonus for the share of spawned sub-agents that finished, as a fraction of outcome_gap",
    )
    anneal_fraction: float = Field(
        0.5, gt=0, le=1, description="share of train.max_steps over which both weights fall linearly to 0"
    )


class RewardConfig(Section):
    """Total reward = outcome + shaping terms. Each term is bounded to a range of width
    weight * outcome_gap, and the enabled weights must sum below 1, so any success's reward
    stays above any failure's."""

    success_threshold: float = Field(0.5, description="outcome at or above which an episode counts as solved")
    outcome_gap: float = Field(
        1.0,
        gt=0,
        description="smallest outcome difference between a success and a failure the env guarantees "
        "(1.0 for 0/1 outcomes); shaping weights are fractions of it",
    )
    speed: SpeedShapingConfig = Field(default_factory=SpeedShapingConfig)
    length_penalty: LengthPenaltyConfig = Field(default_factory=LengthPenaltyConfig)
    overlong: OverlongConfig = Field(default_factory=OverlongConfig)
    turn_discount: TurnDiscountConfig = Field(default_factory=TurnDiscountConfig)
    parl: ParlConfig = Field(default_factory=ParlConfig)

    @model_validator(mode="after")
    def _check_budget(self) -> RewardConfig:
        terms = {"speed": self.speed, "length_penalty": self.length_penalty}
        terms |= {"overlong": self.overlong, "turn_discount": self.turn_discount}
        used = {name: term.weight for name, term in terms.items() if term.enabled}
        if self.parl.enabled:
            used |= {"parl.spawn": self.parl.spawn_weight, "parl.finish": self.parl.finish_weight}
        if sum(used.values()) >= 1.0:
            listed = " + ".join(f"{name}.weight={weight:g}" for name, weight in used.items())
            raise ValueError(
                f"reward shaping weights {listed} sum to {sum(used.values()):g}; they must sum below 1 "
                "(each is a fraction of outcome_gap) so that any success outranks any failure: lower them"
            )
        return self


class SwarmConfig(Section):
    """Agent clusters: a spawn tool for tool-using envs; sub-agent episodes run concurrently
    on the rollout worker and their answers come back as the tool's result."""

    enabled: bool = Field(False, description="offer the spawn tool to the env's agent (a ToolEnv)")
    max_subagents_per_call: int = Field(
        8, gt=0, description="sub-tasks one spawn call may start; the rest get errors"
    )
    max_subagents_per_episode: int = Field(
        16, gt=0, description="sub-agents one episode may start in all, every level counted"
    )
    depth: int = Field(1, gt=0, description="spawn levels: 1 = sub-agents cannot spawn")
    timeout_s: float = Field(
        60.0, gt=0, description="a sub-agent still running after this returns an error result"
    )
    subagent_max_turns: int = Field(
        4, gt=0, description="a sub-agent's turns; one that ends on a tool call returns that tool's response"
    )
    subagent_policy: Literal["frozen", "current"] = Field(
        "frozen",
        description="frozen: sub-agents sample from a snapshot of frozen_version's weights (PARL); current: "
        "from the policy being trained",
    )
    frozen_version: int = Field(
        0,
        ge=0,
        description="frozen: the policy version kept for sub-agents (0 = the initial weights; until the "
        "run reaches a later one, sub-agents use the current policy)",
    )
    train_subagents: bool = Field(
        False,
        description="train on sub-agents' turns too (needs subagent_policy current), each credited for its own "
        "sub-task against its orchestrator's group's other sub-agents",
    )

    @model_validator(mode="after")
    def _check_training(self) -> SwarmConfig:
        if self.train_subagents and self.subagent_policy != "current":
            raise ValueError(
                "swarm.train_subagents needs swarm.subagent_policy: current (a frozen policy's tokens "
                "are not the trained policy's)"
            )
        return self


class AsyncConfig(Section):
    max_staleness: int = Field(1, ge=0, description="drop data older than this many policy versions")
    window: float | Literal["fifo", "none"] = Field(
        0.3,
        description="which finished groups may leave the pool: those within this fraction of the batch (in "
        "groups, rounded up) of the oldest group not yet trained on; fifo: strictly in generation order; "
        "none: no window, whatever finished first",
    )
    max_buffered_groups: int | None = Field(
        None,
        gt=0,
        description="groups in flight or waiting before rollout pauses; unset: as many as max_staleness "
        "lets train, (max_staleness + 1) * tasks_per_step",
    )
    max_worker_restarts: int = Field(3, ge=0, description="times Ray restarts a dead rollout worker")

    @field_validator("window", mode="before")
    @classmethod
    def _check_window(cls, value: Any) -> Any:
        if value in ("fifo", "none"):
            return value
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
            raise ValueError(
                f"async.window={value!r}: give a fraction of the batch in (0, 1] (the default window is 0.3), "
                "fifo (strictly in generation order) or none (no window: whatever finished first)"
            )
        return float(value)


class SandboxConfig(Section):
    min_level: int = Field(0, ge=0, le=2, description="refuse to start below this isolation level")
    allow_level_0: bool = Field(
        False,
        description="let an env that runs untrusted code (python_coding, file_search) run it at level 0 "
        "(rlimits + uid only: host files any user may read, /tmp, the network; without root, "
        "everything the harness's user can do); warned on the console",
    )
    python: str | None = Field(
        None,
        description="interpreter for sandboxed Python; null: the harness's own, with its packages (read-only)",
    )
    call_cgroup: bool = Field(
        True,
        description="give each sandbox call a cgroup of its own where the harness can (root), capping the "
        "memory (sandbox.Limits.call_memory_bytes, 2 GiB by default) and processes of the call as a whole; "
        "false: per-process rlimits only",
    )
    level: int | None = Field(
        None,
        ge=0,
        le=2,
        description="written by the run into its config.yaml: the level it used, the lowest of its rollout "
        "workers' (restarted ones included; ignored as input)",
    )


class GatewayConfig(Section):
    """Train from black-box agent programs that call an OpenAI-compatible endpoint."""

    enabled: bool = Field(False, description="play episodes through agent processes and the HTTP gateway")
    host: str = Field("127.0.0.1", description="address the gateway listens on")
    port: int = Field(0, ge=0, lt=65536, description="0 picks a free port")
    agent_command: str = Field(
        "{python} -m forge.openai_agent",
        description="command run once per episode ({python} is this interpreter; the default is Forge's reference "
        "openai-SDK agent); it gets OPENAI_BASE_URL, "
        "OPENAI_API_KEY (= the episode id), FORGE_GATEWAY_URL, FORGE_EPISODE_ID and FORGE_MAX_TURNS",
    )
    max_concurrent_agents: int = Field(8, gt=0, description="agent processes running at once")
    agent_timeout_s: float = Field(
        300.0, gt=0, description="an agent process still running after this is killed"
    )
    sampling: Literal["override", "honour"] = Field(
        "override",
        description="override: requests sample with rollout.temperature/top_p (an X-Forge-Sampling header says "
        "when a request asked otherwise); honour: with the request's own, recorded as its behaviour logprobs",
    )
    tool_parser: Literal["auto", "hermes", "llama3_json", "mistral"] = Field(
        "auto", description="how tool calls are read from replies; auto: the family the chat template writes"
    )


class EvalConfig(Section):
    """Held-out evaluation during a run: every every_steps steps (and at the last) the policy
    just published plays `episodes` episodes of each of the first num_tasks rows of `tasks` on
    the rollout workers, sampled as training samples, trained on never; the step's metrics row
    gets eval/*. In async runs they play beside the training groups in flight."""

    tasks: str | None = Field(None, description="held-out task file (or dataset name), read as env.tasks is")
    every_steps: int = Field(
        0, ge=0, description="evaluate every this many steps (and at the last); 0: never"
    )
    num_tasks: int | None = Field(None, gt=0, description="the file's first this many rows; unset: every row")
    episodes: int = Field(1, gt=0, description="episodes per held-out task")

    @model_validator(mode="after")
    def _check_tasks(self) -> EvalConfig:
        if self.every_steps and not self.tasks:
            raise ValueError("eval.every_steps needs eval.tasks: the held-out task file to play")
        return self


class LoggingConfig(Section):
    tensorboard: bool = True
    wandb_project: str | None = None
    progress_bar: bool = True
    env_output: Literal["file", "console"] = Field(
        "file",
        description="where a run's env output goes (its prints, its subprocesses' stdout): file, "
        "OUTPUT_DIR/env-logs/worker-N.log per rollout worker; console, Ray's log forwarding (to debug an env)",
    )
    trajectory_samples: int = Field(4, ge=0, description="decoded trajectories saved per saved step")
    trajectories_every: int = Field(
        1,
        gt=0,
        description="save trajectory samples on every Nth step only (steps N, 2N, ...): "
        "trajectories.jsonl grows N times slower",
    )


class Config(Section):
    seed: int = 0
    output_dir: str = "runs/default"
    model: ModelConfig = Field(default_factory=ModelConfig)
    env: EnvConfig = Field(default_factory=EnvConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    async_: AsyncConfig = Field(default_factory=AsyncConfig, alias="async")
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    swarm: SwarmConfig = Field(default_factory=SwarmConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    @model_validator(mode="after")
    def _check_group(self) -> Config:
        if self.rollout.group_size < 2 and self.train.advantage in ("grpo", "dr_grpo", "rloo"):
            raise ValueError(
                f"rollout.group_size={self.rollout.group_size}: the {self.train.advantage} advantage "
                "needs at least 2 episodes per task"
            )
        if (
            self.swarm.enabled
            and self.swarm.subagent_policy == "frozen"
            and self.rollout.engine != "inprocess"
        ):
            raise ValueError(
                "swarm.subagent_policy frozen keeps a weight snapshot in each rollout worker, which needs "
                "rollout.engine: inprocess; use swarm.subagent_policy: current with engine servers"
            )
        if self.swarm.enabled and self.gateway.enabled:
            raise ValueError(
                "swarm.enabled plays sub-agents in Forge's own agent loop; gateway runs cannot use it"
            )
        if self.rollout.max_rounds_per_step > 1 and self.gateway.enabled:
            raise ValueError(
                f"rollout.max_rounds_per_step={self.rollout.max_rounds_per_step} (dynamic sampling) plays more "
                "groups in Forge's own agent loop; gateway runs cannot: set it to 1"
            )
        if self.eval.every_steps and self.gateway.enabled:
            raise ValueError(
                "eval.every_steps evaluates in runs of Forge's own agent loop only (gateway off); "
                "evaluate this run's final/ with forge eval CONFIG env.tasks=FILE --checkpoint"
            )
        overlong, most = self.reward.overlong, self.rollout.max_turns * self.rollout.max_new_tokens
        if (
            overlong.enabled
            and not self.gateway.enabled
            and most <= overlong.max_tokens - overlong.buffer_tokens
        ):
            raise ValueError(
                f"reward.overlong starts at {overlong.max_tokens - overlong.buffer_tokens} generated tokens "
                f"(max_tokens - buffer_tokens), and an episode generates at most {most} (rollout.max_turns x "
                "rollout.max_new_tokens): the penalty never applies; set reward.overlong.max_tokens and buffer_tokens "
                "within that"
            )
        if self.reward.parl.enabled and not self.swarm.enabled:
            raise ValueError(
                "reward.parl rewards spawned sub-agents: set swarm.enabled: true or turn reward.parl off"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, mode="json")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.max_steps=20` -> (["train", "max_steps"], 20). Values are read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form dotted.key=value")
    key, raw = text.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        # A plain string YAML cannot read (e.g. gateway.agent_command's "{python} my_agent.py",
        # which YAML takes for a mapping) goes through in quotes: say how.
        raise ConfigError(
            f"override {text!r}: value is not valid YAML ({exc}); to give it as a string, quote it: "
            f"'{key.strip()}=\"{raw}\"'"
        ) from exc
    return path, value


def _set_dotted(tree: dict[str, Any], path: list[str], value: Any, original: str) -> None:
    node = tree
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {original!r}: {'.'.join(path[: i + 1])} is a value, not a section")
        node = child
    node[path[-1]] = value


def config_sections(
    model: type[BaseModel] | None = None, prefix: str = ""
) -> list[tuple[str, type[BaseModel]]]:
    """Every section of the schema, the top level first, with its dotted prefix as YAML
    spells it ("" for the top level, then "model.", "model.tiny.", ...)."""
    model = model or Config
    found = [(prefix, model)]
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            found.extend(config_sections(field.annotation, f"{prefix}{field.alias or name}."))
    return found


def known_keys() -> list[str]:
    """Every dotted key a config may set, sections included, as YAML spells them."""
    return [
        prefix + (field.alias or name)
        for prefix, model in config_sections()
        for name, field in model.model_fields.items()
    ]


# Names other trainers use for a key Forge spells differently (TRL's GRPOConfig, verl's
# actor_rollout_ref / algorithm keys): README's "Coming from TRL or verl" says where their
# meanings differ.
_SYNONYMS = {
    "lr": "learning_rate",
    "steps": "max_steps",
    "num_steps": "max_steps",
    "total_steps": "max_steps",
    "num_generations": "group_size",
    "n": "group_size",
    "beta": "kl_coef",
    "kl_loss_coef": "kl_coef",
    "epsilon": "clip_low",
    "epsilon_low": "clip_low",
    "epsilon_high": "clip_high",
    "clip_ratio": "clip_low",
    "clip_ratio_low": "clip_low",
    "clip_ratio_high": "clip_high",
    "loss_type": "loss_aggregation",
    "loss_agg_mode": "loss_aggregation",
    "adv_estimator": "advantage",
    "max_completion_length": "max_new_tokens",
    "max_response_length": "max_new_tokens",
    "lr_scheduler_type": "lr_schedule",
    "entropy_coeff": "entropy_coef",
    "max_num_gen_batches": "max_rounds_per_step",
    "mask_truncated_completions": "mask_truncated",
}


def _near(key: str) -> list[str]:
    """The valid keys a mistyped `key` most likely meant: a near spelling in its own section,
    the same name (or its usual synonym) in another section; else a near spelling anywhere."""
    section, _, leaf = key.rpartition(".")
    keys = known_keys()
    own = [k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == section]
    found = [
        f"{section}.{k}" if section else k for k in difflib.get_close_matches(leaf, own, n=3, cutoff=0.7)
    ]
    found += [k for k in keys if k.rpartition(".")[2] in (leaf, _SYNONYMS.get(leaf)) and k != key]
    found = found or difflib.get_close_matches(key, keys, n=3, cutoff=0.75)
    return list(dict.fromkeys(found))[:3]


# Settings a user may fill with a secret by mistake: an error about them does not repeat the value.
SECRET_SHAPED = {"rollout.server_api_key_env", "rollout.server_admin_api_key_env"}


def _describe(error: dict[str, Any], overrides: dict[str, str]) -> str:
    key = ".".join(str(part) for part in error["loc"])
    unknown = error["type"] == "extra_forbidden"  # an unknown section holds the overridden key
    given = next(
        (
            text
            for path, text in overrides.items()
            if key and (key == path or key.startswith(path + ".") or (unknown and path.startswith(key + ".")))
        ),
        None,
    )
    where = f" (set on the command line by {given!r})" if given else ""
    if unknown:
        near = _near(key)
        hint = f"; did you mean {' or '.join(near)}?" if near else ""
        return f"{key}: unknown key{where}{hint} (`forge train CONFIG --dry-run` shows valid keys)"
    expected = error.get("msg", "invalid value")
    if error["type"] == "value_error":
        expected = expected.removeprefix("Value error, ")
    got = error.get("input")
    got_text = "" if isinstance(got, dict) else f" (got {got!r})"
    if key in SECRET_SHAPED:  # what was given may be a key: never on the console
        got_text = where = ""
    return f"{key}: {expected}{got_text}{where}" if key else f"{expected}{where}"


def validate(raw: dict[str, Any], source: str = "config", overrides: dict[str, str] | None = None) -> Config:
    """`overrides`: dotted key -> the command-line text that set it, so an error names it."""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        lines = "\n  ".join(_describe(err, overrides or {}) for err in exc.errors())
        raise ConfigError(f"invalid {source}:\n  {lines}") from None


def config_file(name_or_path: str | Path) -> Path:
    """The YAML file as given when it exists, else the built-in config of that name
    (`smoke` -> configs/smoke.yaml as installed; `forge configs` lists them)."""
    from forge.builtin_configs import builtin_configs

    path = Path(name_or_path)
    if path.is_file():
        return path
    builtin = builtin_configs()
    if str(name_or_path) in builtin:
        return builtin[str(name_or_path)]
    known = f"built-in: {', '.join(builtin)}; `forge configs` lists them" if builtin else "none built in"
    if path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        hint = f"; to use the built-in one, name it: {path.stem}" if path.stem in builtin else ""
        raise ConfigError(f"config file {path} does not exist here{hint} ({known})")
    raise ConfigError(f"config {name_or_path!r} is neither a YAML file nor a built-in config name ({known})")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys in a mapping: a second `train:` section in a
    file would silently drop every key of the first. Refuse it instead."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    f"{key!r} is given first",
                    seen[key],
                    "and again here; merge the two (YAML would keep only the second, dropping the first's keys)",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> Any:
    with path.open() as stream:  # a stream, so YAML's errors name the file, not "<unicode string>"
        return yaml.load(stream, Loader=_UniqueKeyLoader)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load YAML (or start from defaults when `path` is None) and apply dotted overrides;
    `path` is a YAML file or a built-in config's name."""
    raw: dict[str, Any] = {}
    source = "config"
    if path is not None:
        path = config_file(path)
        try:
            loaded = _read_yaml(path)
        except yaml.YAMLError as exc:
            tabs = " (YAML indents with spaces, not tabs)" if "'\\t'" in str(exc) else ""
            raise ConfigError(f"{path} is not valid YAML{tabs}: {exc}") from exc
        if loaded is None:
            # Most often the wrong file, or one saved empty: a run on every default is a run nobody
            # asked for. `{}` says "the defaults" on purpose.
            raise ConfigError(
                f"{path} holds no settings (it is empty or only comments), so the run would train on every "
                "default; give the sections to change (`forge train smoke --dry-run` prints a whole config), "
                "or write `{}` to mean the defaults"
            )
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, got {type(loaded).__name__}")
        raw = loaded
        source = str(path)
    given = {}
    for text in overrides or []:
        key_path, value = parse_override(text)
        _set_dotted(raw, key_path, value, text)
        given[".".join(key_path)] = text
    return validate(raw, source, given)
