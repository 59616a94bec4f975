"""The run configuration's sections as dataclasses with defaults (a YAML file states only what differs)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from qwenlong.curriculum import Phase, RetrospectiveSampling


@dataclass
class TinyModelConfig:
    """A randomly initialised Qwen2-architecture model built from this config (CPU demos, tests).

    ``vocab_size``: the size the demo tokenizer is trained to (when ``data.tokenizer`` is not given); BPE stops
    early on a small corpus, and the model takes the tokenizer's real size (``qwenlong plan`` reads this one).
    """

    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True


@dataclass
class ModelConfig:
    """The policy: a pretrained checkpoint (``name``: hub id or local path) or a ``tiny`` one."""

    name: str | None = None
    tiny: TinyModelConfig | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    attention: Literal["qwenlong", "qwenlong_atomic", "sdpa", "eager"] = "qwenlong"
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if (self.name is None) == (self.tiny is None):
            raise ValueError("name: set exactly one of model.name and model.tiny")


@dataclass
class SyntheticDataConfig:
    """Generated DocQA-style data (``qwenlong.data.synthetic``, nothing downloaded).

    Document lengths (tokens) are spread uniformly over [min_document_tokens, max_document_tokens];
    ``num_distractor_facts`` is the difficulty knob (facts that are not asked about);
    ``distractor_values`` says whether their values are answer words too (``shared``: the reader must
    bind the asked key to its value) or never are (``other``: see ``qwenlong.data.SyntheticConfig``).
    ``teacher_accuracy``: the fraction of warm-up SFT traces that are right, among the records a teacher can
    get wrong (a record without a distractor of another value, or a misread number, is always right); the
    others go wrong as ``teacher_error`` says (``evidence``: follow a distractor throughout; ``conclusion``:
    quote the right evidence, then answer a distractor's value), as some traces of a distilling teacher do
    (``qwenlong.data.synthetic.teacher_response``). With ``teacher_accuracy_shortest`` set, the
    teacher's accuracy falls linearly with document length, from that value at the shortest
    documents to ``teacher_accuracy`` at the longest (a teacher that loses track in long inputs).
    """

    task: Literal["copy_marked_fact", "retrieval", "multiple_choice", "arithmetic", "mixed"] = "retrieval"
    num_train: int = 512
    num_eval: int = 128
    min_document_tokens: int = 64
    max_document_tokens: int = 1024
    num_distractor_facts: int = 3
    answer_vocab_size: int = 16
    distractor_values: Literal["shared", "other"] = "shared"
    teacher_accuracy: float = 1.0
    teacher_accuracy_shortest: float | None = None
    teacher_error: Literal["evidence", "conclusion"] = "evidence"
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("teacher_accuracy", "teacher_accuracy_shortest"):
            value = getattr(self, key)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{key}: must be in [0, 1], got {value}")
        if not 64 <= self.min_document_tokens <= self.max_document_tokens:
            raise ValueError(
                f"min_document_tokens: expected 64 <= min_document_tokens <= max_document_tokens, "
                f"got {self.min_document_tokens} and {self.max_document_tokens}"
            )


@dataclass
class DataConfig:
    """Where examples come from. Files are parquet/JSONL rows (prompt, data_source, ground truth)."""

    train_files: list[str] = field(default_factory=list)
    sft_files: list[str] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)
    synthetic: SyntheticDataConfig | None = None
    tokenizer: str | None = None  # name or path; None: the model's own (or the synthetic task's)
    # QwenLong-L1.5: every generation round draws equally many prompts of each task (data_source)
    task_balanced: bool = False

    def __post_init__(self) -> None:
        if self.synthetic is None and not self.train_files:
            raise ValueError("train_files: give training files or a synthetic section")


@dataclass
class SFTConfig:
    """Warm-up supervised fine-tuning on packed sequences, loss on response tokens only."""

    enabled: bool = True
    steps: int | None = None  # exactly one of steps and epochs when enabled
    epochs: float | None = None
    lr: float = 1e-5
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    token_budget: int = 16384  # tokens per packed micro-batch (per GPU)
    grad_accum_steps: int = 1
    max_seq_len: int = 32768


@dataclass
class DynamicSamplingConfig:
    """DAPO: drop groups whose rewards are all equal and generate again: at most ``max_rounds`` generation
    rounds per step, the first included.

    ``on_exhausted``: when the rounds (or the phase's unused prompts) run out before the batch is full,
    ``train`` on the groups kept (counted in the step's ``dynamic_sampling/exhausted``) or ``error``.
    """

    enabled: bool = False
    max_rounds: int = 10
    on_exhausted: Literal["train", "error"] = "train"


@dataclass
class OverlongConfig:
    """DAPO soft overlong penalty over the last ``buffer`` tokens before the response limit."""

    enabled: bool = False
    buffer: int = 1000
    penalty_factor: float = 1.0


@dataclass
class EntropyControlConfig:
    """QwenLong-L1.5's entropy control (l15.md section 4, ``qwenlong.algorithms.entropy_control``); off by default.

    Negative-gradient clipping: tokens of negative-advantage responses leave the loss when their entropy
    exceeds ``tau_token`` (token level) or their response's mean token entropy exceeds ``tau_sequence``
    (sequence level); None turns a level off. AEPO (both bounds set): when the step's batch entropy (mean over
    responses of their mean token entropy) rises above ``entropy_high``, only responses with a positive
    advantage (and, with ``positive_reward``, a positive task reward: the overlong penalty does not count) train,
    until it falls below ``entropy_low``.
    Entropies are the fused kernel's, at the sampling temperature, of the policy that generated the rollouts.
    A dropped token's loss term is 0; the loss's denominators do not change.
    """

    tau_token: float | None = None
    tau_sequence: float | None = None
    entropy_low: float | None = None
    entropy_high: float | None = None
    positive_reward: bool = True

    def __post_init__(self) -> None:
        if (self.entropy_low is None) != (self.entropy_high is None):
            raise ValueError("entropy_low, entropy_high: AEPO needs both bounds (or neither), got "
                             f"{self.entropy_low} and {self.entropy_high}")
        if self.aepo and not 0 <= self.entropy_low <= self.entropy_high:  # the config loads without torch
            raise ValueError(f"entropy_low, entropy_high: expected 0 <= entropy_low <= entropy_high, "
                             f"got {self.entropy_low} and {self.entropy_high}")
        for key in ("tau_token", "tau_sequence"):
            value = getattr(self, key)
            if value is not None and not value >= 0:
                raise ValueError(f"{key}: expected an entropy threshold >= 0 (or null: off), got {value}")

    @property
    def aepo(self) -> bool:
        return self.entropy_high is not None

    @property
    def enabled(self) -> bool:
        return self.aepo or self.tau_token is not None or self.tau_sequence is not None


@dataclass
class MemoryAgentStageConfig:
    """QwenLong-L1.5's memory-agent expert (l15.md sections 1 and 5, ``qwenlong.agents``); off by default.

    After the RL phase ``after_phase``, the policy is trained as a memory agent for ``steps`` RL steps:
    documents read ``chunk_tokens`` at a time, at most ``memory_tokens`` of memory + plan per step, an answer
    of at most ``answer_tokens``. The expert is then merged with the phase's policy by SCE (base: the policy
    RL started from; ``select_topk`` of each tensor's entries by variance), and the following phases train the
    merged model. Agent data: ``data`` files (default: the run's training data); with synthetic data,
    ``synthetic_documents`` two-chunk records of ``2 * chunk_tokens`` tokens (and as many for its evaluation).
    ``prompts_per_step``: questions per step (each ``rl.group_size`` trajectories); None: ``rl``'s own.
    """

    enabled: bool = False
    after_phase: str | None = None
    steps: int = 1
    chunk_tokens: int = 32_768
    memory_tokens: int = 15_000
    answer_tokens: int = 10_000
    select_topk: float = 0.1
    data: list[str] = field(default_factory=list)
    synthetic_documents: int = 256
    prompts_per_step: int | None = None

    def __post_init__(self) -> None:
        if self.prompts_per_step is not None and self.prompts_per_step < 1:
            raise ValueError(f"prompts_per_step: expected >= 1 (or null: rl's), got {self.prompts_per_step}")
        if self.enabled and not self.after_phase:
            raise ValueError("after_phase: the memory-agent stage needs the name of the RL phase it follows")
        for key in ("steps", "chunk_tokens", "memory_tokens", "answer_tokens", "synthetic_documents"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: expected >= 1, got {getattr(self, key)}")
        if not 0.0 < self.select_topk <= 1.0:
            raise ValueError(f"select_topk: expected a fraction in (0, 1], got {self.select_topk}")


@dataclass
class RLConfig:
    """GRPO / DAPO (method.md section 2) and the phased curriculum (section 1).

    ``advantage``: ``grpo`` (group mean and std), ``mean-only`` (group mean), ``task-std`` (group mean,
    the std of all the batch's rewards of the prompt's task: QwenLong-L1.5). ``clip_ratio_c``: dual
    clip, a negative-advantage token's loss is capped at ``clip_ratio_c * |A|`` (None: off; verl uses 3).
    ``kl_reference``: the frozen policy of the k3 KL term (only when ``kl_coef > 0``), the one RL starts
    from (``sft``) or each phase's starting policy (``phase_start``).
    """

    enabled: bool = True
    advantage: Literal["grpo", "mean-only", "task-std"] = "grpo"
    advantage_eps: float = 1e-6
    clip_low: float = 0.2
    clip_high: float = 0.28
    clip_ratio_c: float | None = None
    kl_coef: float = 0.0
    kl_reference: Literal["sft", "phase_start"] = "sft"
    entropy_coef: float = 0.0
    loss_aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "token-mean"
    group_size: int = 8
    gen_prompts_per_step: int = 128  # prompts generated per round
    train_prompts_per_step: int = 128  # prompts (groups) trained on per step
    mini_batch_size: int = 32  # prompts per optimizer update
    ppo_epochs: int = 1
    temperature: float = 0.7
    top_p: float = 0.95
    lr: float = 2e-6
    lr_schedule: Literal["cosine", "constant"] = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch_token_budget: int = 10000  # tokens per GPU; an SP group packs sp_size times this
    dynamic_sampling: DynamicSamplingConfig = field(default_factory=DynamicSamplingConfig)
    overlong: OverlongConfig = field(default_factory=OverlongConfig)
    entropy_control: EntropyControlConfig = field(default_factory=EntropyControlConfig)
    memory_agent: MemoryAgentStageConfig = field(default_factory=MemoryAgentStageConfig)
    phases: list[Phase] = field(default_factory=list)
    retrospective: RetrospectiveSampling = field(default_factory=RetrospectiveSampling)

    def __post_init__(self) -> None:
        agent = self.memory_agent
        if agent.enabled and agent.after_phase not in [phase.name for phase in self.phases]:
            raise ValueError(f"memory_agent.after_phase: {agent.after_phase!r} is not one of the RL phases "
                             f"{[phase.name for phase in self.phases]}")


@dataclass
class RewardConfig:
    """Hybrid reward: rule check, then an LLM judge when the rule score is below 1.

    ``judge``: ``"openai"`` is any OpenAI-compatible server (a local vLLM server, a hosted API;
    needs ``judge_endpoint`` and ``judge_model``), ``"local"`` a HF model loaded in-process
    (``judge_model`` is its name or path), ``"none"`` rules only.
    """

    judge: Literal["none", "openai", "local"] = "none"
    judge_endpoint: str | None = None
    judge_model: str | None = None
    judge_api_key_env: str | None = None  # name of the environment variable holding the key
    judge_timeout_s: float = 60.0  # openai judge only (the local judge runs in-process, one batch at a time)
    judge_concurrency: int = 16  # openai judge only

    def __post_init__(self) -> None:
        if self.judge == "openai" and self.judge_endpoint is None:
            raise ValueError("judge_endpoint: the openai judge needs judge_endpoint and judge_model")
        if self.judge != "none" and self.judge_model is None:
            raise ValueError(f"judge_model: the {self.judge} judge needs judge_model")

    def judge_options(self) -> dict | None:
        """The options ``qwenlong.rewards.judge.make_judge`` takes; None when no judge is configured."""
        if self.judge == "none":
            return None
        if self.judge == "local":
            return {"backend": "local", "model": self.judge_model}
        api_key = os.environ.get(self.judge_api_key_env) if self.judge_api_key_env else None
        return {"backend": "openai", "base_url": self.judge_endpoint, "model": self.judge_model, "api_key": api_key,
                "timeout": self.judge_timeout_s, "max_concurrency": self.judge_concurrency}


@dataclass
class RolloutConfig:
    """Which engine generates responses; its log-probs are checked against the trainer's."""

    engine: Literal["hf", "vllm"] = "hf"
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.6
    # vLLM's KV cache size; None: its own choice (from gpu_memory_utilization; on a CPU build, from the
    # VLLM_CPU_KVCACHE_SPACE variable or most of the RAM)
    kv_cache_memory_bytes: int | None = None
    # vLLM sleep mode between rollouts: the engine frees its KV cache and moves its weights to CPU while the
    # policy trains, and takes them back before generating. None: on for vLLM on CUDA (its engines share the
    # trainer's GPUs); vLLM's sleep mode needs CUDA, so a CPU build runs without it (and says so once)
    sleep_between_phases: bool | None = None

    def __post_init__(self) -> None:
        if self.sleep_between_phases and self.engine != "vllm":
            raise ValueError(f"sleep_between_phases: only the vllm engine sleeps (engine: {self.engine} generates "
                             "with the policy itself)")


@dataclass
class EvalConfig:
    """Held-out evaluation (method.md section 5): before training, after SFT, after each RL phase and
    every ``every_steps`` RL steps of the curriculum's phases (0: never within a phase; the memory-agent
    stage is evaluated as an agent before and after its merge instead).

    Each benchmark (the held-out examples' ``data_source``) is scored separately; the reported number is
    the macro average over benchmarks. ``judge``: the evaluation's own judge (the paper's is a large
    hosted model), given like ``reward``'s; None: the training reward's. ``rules``: ``release`` checks
    answers exactly as the public release does (numbers comparable with the paper), ``default`` with
    the training reward's stricter rules.
    """

    enabled: bool = True
    max_input_tokens: int = 120_000  # longer inputs are cut in the middle
    max_output_tokens: int = 10_000
    temperature: float = 0.7
    top_p: float = 0.95
    samples_per_prompt: int = 1
    before_training: bool = True
    after_each_phase: bool = True
    every_steps: int = 0
    judge: RewardConfig | None = None
    rules: Literal["release", "default"] = "release"


@dataclass
class DistributedConfig:
    """Multi-process training, launched with ``torchrun --nproc-per-node N -m qwenlong ...`` (one process
    per device; a plain ``python -m qwenlong`` is one process).

    Ranks form sequence-parallel groups of ``sp_size`` consecutive ranks (Ulysses: each rank a token shard
    of every micro-batch) and ``world / sp_size`` data-parallel groups (each its own micro-batches).
    ``deepspeed_stage`` 0: plain PyTorch, gradients summed over ranks; 1-3: DeepSpeed ZeRO, with optional
    CPU offload of optimizer state (stages 1-3) and parameters (stage 3).
    """

    backend: Literal["auto", "nccl", "gloo"] = "auto"
    sp_size: int = 1
    deepspeed_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False


@dataclass
class OutputConfig:
    """Run directory, checkpoints and logs."""

    dir: str = "runs/default"
    save_every_steps: int = 0  # 0: only at phase ends
    keep_checkpoints: int = 2  # per stage or phase, the newest N are kept; 0: all
    log_every_steps: int = 1
    tensorboard: bool = True
    # a HF model folder (safetensors, config, tokenizer, model card) under export/: of the run's final model,
    # of every stage and phase, or none (``qwenlong export`` writes one from any checkpoint later)
    export: Literal["final", "every_stage", "none"] = "final"


@dataclass
class Config:
    """A whole run: warm-up SFT, phased RL and evaluation."""

    seed: int = 0
    model: ModelConfig = field(default_factory=lambda: ModelConfig(tiny=TinyModelConfig()))
    data: DataConfig = field(default_factory=lambda: DataConfig(synthetic=SyntheticDataConfig()))
    sft: SFTConfig = field(default_factory=SFTConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
