"""Typed run configuration: dataclasses loaded from YAML, with errors that name the bad key.

    cfg = load_config("configs/tiny-cpu.yaml", overrides=["rl.phases.0.max_input_tokens=4096"])

Every section is a dataclass with defaults, so a YAML file only states what differs. Loading
rejects unknown keys and wrong types with a ``ConfigError`` naming the key path
(``rl.phases.1.steps: expected int, got str '10k'``). Overrides are ``dotted.path=value``
strings; the value is read as YAML (``4096``, ``true``, ``[a, b]``, ``null``), list items are
addressed by index, and overrides apply before validation, so they are checked the same way.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from qwenlong.curriculum import Phase, RetrospectiveSampling


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


# ----------------------------------------------------------------------------------------- schema


@dataclass
class TinyModelConfig:
    """A randomly initialised Qwen2-architecture model built from this config (CPU demos, tests)."""

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
    attention: Literal["qwenlong", "sdpa", "eager"] = "qwenlong"
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if (self.name is None) == (self.tiny is None):
            raise ValueError("name: set exactly one of model.name and model.tiny")


@dataclass
class SyntheticDataConfig:
    """Generated DocQA-style data (``qwenlong.data.synthetic``, nothing downloaded).

    Document lengths (tokens) are spread uniformly over [min_document_tokens, max_document_tokens];
    ``num_distractor_facts`` is the difficulty knob (facts that are not asked about).
    """

    task: Literal["copy_marked_fact", "retrieval", "multiple_choice", "arithmetic", "mixed"] = "retrieval"
    num_train: int = 512
    num_eval: int = 128
    min_document_tokens: int = 64
    max_document_tokens: int = 1024
    num_distractor_facts: int = 3
    answer_vocab_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
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
    task_balanced: bool = False  # QwenLong-L1.5: balance task types within each batch

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
    """DAPO: drop groups whose rewards are all equal, regenerate up to ``max_rounds`` times."""

    enabled: bool = False
    max_rounds: int = 10


@dataclass
class OverlongConfig:
    """DAPO soft overlong penalty over the last ``buffer`` tokens before the response limit."""

    enabled: bool = False
    buffer: int = 1000
    penalty_factor: float = 1.0


@dataclass
class RLConfig:
    """GRPO / DAPO (method.md section 2) and the phased curriculum (section 1)."""

    enabled: bool = True
    advantage: Literal["grpo", "mean-only", "task-std"] = "grpo"
    advantage_eps: float = 1e-6
    clip_low: float = 0.2
    clip_high: float = 0.28
    kl_coef: float = 0.0
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
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
    phases: list[Phase] = field(default_factory=list)
    retrospective: RetrospectiveSampling = field(default_factory=RetrospectiveSampling)


@dataclass
class RewardConfig:
    """Hybrid reward: rule check, then an LLM judge when the rule score is below 1."""

    judge: Literal["none", "openai"] = "none"  # "openai": any OpenAI-compatible server (e.g. vLLM's)
    judge_endpoint: str | None = None
    judge_model: str | None = None
    judge_api_key_env: str | None = None  # name of the environment variable holding the key
    judge_timeout_s: float = 60.0
    judge_concurrency: int = 16

    def __post_init__(self) -> None:
        if self.judge != "none" and (self.judge_endpoint is None or self.judge_model is None):
            raise ValueError("judge_endpoint: a judge needs judge_endpoint and judge_model")


@dataclass
class RolloutConfig:
    """Which engine generates responses; its log-probs are checked against the trainer's."""

    engine: Literal["hf", "vllm"] = "hf"
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.6
    check_logprobs: bool = True  # log the engine-vs-trainer log-prob mismatch


@dataclass
class EvalConfig:
    """Held-out evaluation (method.md section 5): before training, after SFT and after RL."""

    enabled: bool = True
    max_input_tokens: int = 120_000  # longer inputs are cut in the middle
    max_output_tokens: int = 10_000
    temperature: float = 0.7
    top_p: float = 0.95
    samples_per_prompt: int = 1
    before_training: bool = True
    after_each_phase: bool = True


@dataclass
class DistributedConfig:
    """Data parallel via DeepSpeed ZeRO (stage 0 = plain DDP) and Ulysses sequence parallel groups."""

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
    log_every_steps: int = 1
    tensorboard: bool = True


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


# ---------------------------------------------------------------------------- range checks


_POSITIVE = ("sft.lr", "rl.lr", "sft.token_budget", "sft.max_seq_len", "rl.micro_batch_token_budget",
             "rl.temperature", "eval.max_input_tokens", "eval.max_output_tokens", "reward.judge_timeout_s")
_AT_LEAST_ONE = ("rl.group_size", "rl.gen_prompts_per_step", "rl.train_prompts_per_step", "rl.mini_batch_size",
                 "rl.ppo_epochs", "rl.dynamic_sampling.max_rounds", "sft.grad_accum_steps", "distributed.sp_size",
                 "rollout.tensor_parallel_size", "eval.samples_per_prompt", "reward.judge_concurrency",
                 "output.log_every_steps")
_NON_NEGATIVE = ("rl.clip_low", "rl.clip_high", "rl.kl_coef", "rl.entropy_coef", "rl.overlong.buffer",
                 "rl.warmup_steps", "sft.warmup_steps", "output.save_every_steps", "eval.temperature")
_PROBABILITY = ("rl.top_p", "eval.top_p", "rollout.gpu_memory_utilization")


def _get(cfg: Config, path: str) -> Any:
    value: Any = cfg
    for key in path.split("."):
        value = getattr(value, key)
    return value


def _check(ok: bool, path: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{path}: {message}")


def validate(cfg: Config) -> Config:
    """Range and cross-field checks that the types cannot express; returns ``cfg``."""
    ranges = (
        (_POSITIVE, lambda v: v > 0, "> 0"),
        (_AT_LEAST_ONE, lambda v: v >= 1, ">= 1"),
        (_NON_NEGATIVE, lambda v: v >= 0, ">= 0"),
        (_PROBABILITY, lambda v: 0 < v <= 1, "in (0, 1]"),
    )
    for paths, ok, expected in ranges:
        for path in paths:
            value = _get(cfg, path)
            _check(ok(value), path, f"expected {expected}, got {value}")
    sft, rl, dist = cfg.sft, cfg.rl, cfg.distributed
    if sft.enabled:
        _check((sft.steps is None) != (sft.epochs is None), "sft.steps", "set exactly one of sft.steps and sft.epochs")
    _check(rl.clip_low < 1, "rl.clip_low", f"expected < 1 (the ratio floor is 1 - clip_low), got {rl.clip_low}")
    _check(dist.deepspeed_stage in (0, 1, 2, 3), "distributed.deepspeed_stage",
           f"expected 0, 1, 2 or 3, got {dist.deepspeed_stage}")
    _check(not dist.offload_params or dist.deepspeed_stage == 3, "distributed.offload_params",
           "parameter offload needs deepspeed_stage 3")
    _check(rl.gen_prompts_per_step >= rl.train_prompts_per_step or rl.dynamic_sampling.enabled,
           "rl.gen_prompts_per_step", "without dynamic sampling, generate at least train_prompts_per_step prompts")
    _check(rl.train_prompts_per_step % rl.mini_batch_size == 0, "rl.mini_batch_size",
           f"must divide rl.train_prompts_per_step={rl.train_prompts_per_step}, got {rl.mini_batch_size}")
    _check(not rl.dynamic_sampling.enabled or rl.group_size >= 2, "rl.group_size",
           "dynamic sampling needs groups of at least 2 responses")
    _check(not rl.enabled or bool(rl.phases), "rl.phases", "RL needs at least one phase")
    names = [phase.name for phase in rl.phases]
    for i, phase in enumerate(rl.phases):
        _check(phase.name not in names[:i], f"rl.phases.{i}.name", f"duplicate phase name {phase.name!r}")
        _check(not rl.overlong.enabled or rl.overlong.buffer <= phase.max_output_tokens, "rl.overlong.buffer",
               f"{rl.overlong.buffer} exceeds rl.phases.{i}.max_output_tokens={phase.max_output_tokens}")
    return cfg


# --------------------------------------------------------------------------------- YAML -> dataclasses


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _build(tp: Any, value: Any, path: str) -> Any:
    """Turn the YAML value at ``path`` into type ``tp``, or raise ConfigError naming ``path``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _build(inner, value, path)
    if value is None:
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got null")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: expected one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        return [_build(args[0], item, f"{path}.{i}") for i, item in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, path)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-5" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{path}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build_dataclass(cls: type, value: Any, path: str) -> Any:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a mapping of {cls.__name__} fields, got {value!r}")
    prefix = f"{path}." if path else ""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in value:
        if key not in fields:
            raise ConfigError(f"{prefix}{key}: unknown key (allowed: {', '.join(fields)})")
    kwargs = {key: _build(hints[key], item, f"{prefix}{key}") for key, item in value.items()}
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}{name}: required key is missing")
    try:
        return cls(**kwargs)
    except ValueError as error:  # __post_init__ messages start with the field name
        raise ConfigError(f"{prefix}{error}") from None


# ---------------------------------------------------------------------------------------- overrides


def apply_override(data: dict, override: str) -> dict:
    """Set ``dotted.path=value`` in a raw (not yet validated) config dict, in place."""
    key_path, sep, text = override.partition("=")
    if not sep or not key_path:
        raise ConfigError(f"{override}: expected an override of the form dotted.key=value")
    value = yaml.safe_load(text) if text.strip() else None
    keys = key_path.strip().split(".")
    node: Any = data
    for depth, key in enumerate(keys):
        here = ".".join(keys[: depth + 1])
        last = depth == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"{here}: no item {key} in a list of {len(node)}")
            index = int(key)
            if last:
                node[index] = value
            else:
                node = node[index]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"{here}: cannot set a key inside {type(node).__name__} {node!r}")
        if last:
            node[key] = value
        else:
            if not isinstance(node.get(key), (dict, list)):
                node[key] = {}
            node = node[key]
    return data


def config_from_dict(data: Mapping | None, overrides: Iterable[str] = ()) -> Config:
    """Build and validate a ``Config`` from a raw mapping plus ``dotted.key=value`` overrides."""
    raw = _plain(data or {})
    for override in overrides:
        apply_override(raw, override)
    return validate(_build_dataclass(Config, raw, ""))


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """Read a YAML preset, apply overrides, validate."""
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    try:
        return config_from_dict(data, overrides)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def config_to_dict(cfg: Config) -> dict:
    """Plain dict of a config (``config_from_dict`` of it gives an equal config)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (into a run directory or checkpoint)."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")


def _plain(value: Any) -> Any:
    """Deep copy into plain dicts and lists (so overrides never touch the caller's data)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
