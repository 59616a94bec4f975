"""Range and cross-field checks of a loaded ``Config``; errors name the key path."""

from __future__ import annotations

import dataclasses
import math
import re
import urllib.parse
from typing import Any

from qwenlong.config.schema import Config
from qwenlong.config.typed import ConfigError

_POSITIVE = ("sft.lr", "rl.lr", "sft.token_budget", "sft.max_seq_len", "rl.micro_batch_token_budget",
             "rl.temperature", "eval.max_input_tokens", "eval.max_output_tokens", "reward.judge_timeout_s")
_AT_LEAST_ONE = ("rl.group_size", "rl.gen_prompts_per_step", "rl.train_prompts_per_step", "rl.mini_batch_size",
                 "rl.ppo_epochs", "rl.dynamic_sampling.max_rounds", "sft.grad_accum_steps", "distributed.sp_size",
                 "rollout.tensor_parallel_size", "eval.samples_per_prompt", "reward.judge_concurrency",
                 "output.log_every_steps")
_NON_NEGATIVE = ("rl.clip_low", "rl.clip_high", "rl.kl_coef", "rl.entropy_coef", "rl.overlong.buffer",
                 "rl.warmup_steps", "sft.warmup_steps", "output.save_every_steps",
                 "output.keep_checkpoints", "eval.temperature", "eval.every_steps")
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
    _check_finite_and_urls(cfg)
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
    if cfg.eval.judge is not None:  # the evaluation's own judge, checked as the training reward's is
        _check(cfg.eval.judge.judge_timeout_s > 0, "eval.judge.judge_timeout_s",
               f"expected > 0, got {cfg.eval.judge.judge_timeout_s}")
        _check(cfg.eval.judge.judge_concurrency >= 1, "eval.judge.judge_concurrency",
               f"expected >= 1, got {cfg.eval.judge.judge_concurrency}")
    kv_bytes = cfg.rollout.kv_cache_memory_bytes
    _check(kv_bytes is None or kv_bytes > 0, "rollout.kv_cache_memory_bytes", f"expected > 0 or null, got {kv_bytes}")
    sft, rl, dist = cfg.sft, cfg.rl, cfg.distributed
    if sft.enabled:
        _check((sft.steps is None) != (sft.epochs is None), "sft.steps", "set exactly one of sft.steps and sft.epochs")
    _check(rl.clip_low < 1, "rl.clip_low", f"expected < 1 (the ratio floor is 1 - clip_low), got {rl.clip_low}")
    _check(rl.clip_ratio_c is None or rl.clip_ratio_c > 1, "rl.clip_ratio_c",
           f"expected > 1 or null (the dual clip caps a negative token's loss at c * |A|), got {rl.clip_ratio_c}")
    _check(dist.deepspeed_stage in (0, 1, 2, 3), "distributed.deepspeed_stage",
           f"expected 0, 1, 2 or 3, got {dist.deepspeed_stage}")
    _check(not dist.offload_params or dist.deepspeed_stage == 3, "distributed.offload_params",
           "parameter offload needs deepspeed_stage 3")
    _check(not dist.offload_optimizer or dist.deepspeed_stage > 0, "distributed.offload_optimizer",
           "optimizer offload needs deepspeed_stage 1, 2 or 3")
    _check(not rl.enabled or rl.kl_coef == 0 or dist.deepspeed_stage < 3, "rl.kl_coef",
           f"a KL reference policy (kl_coef {rl.kl_coef}) under ZeRO-3 would need its own partitioned engine: "
           "use kl_coef 0 (the QwenLong-L1 recipe) or distributed.deepspeed_stage <= 2")
    _check(cfg.model.dtype != "float16" or dist.deepspeed_stage == 0, "model.dtype",
           "float16 under DeepSpeed would need loss scaling, which qwenlong does not configure: use bfloat16")
    _check(rl.gen_prompts_per_step >= rl.train_prompts_per_step or rl.dynamic_sampling.enabled,
           "rl.gen_prompts_per_step", "without dynamic sampling, generate at least train_prompts_per_step prompts")
    _check(rl.train_prompts_per_step % rl.mini_batch_size == 0, "rl.mini_batch_size",
           f"must divide rl.train_prompts_per_step={rl.train_prompts_per_step}, got {rl.mini_batch_size}")
    _check(not rl.dynamic_sampling.enabled or rl.group_size >= 2, "rl.group_size",
           "dynamic sampling needs groups of at least 2 responses")
    _check(not rl.enabled or bool(rl.phases), "rl.phases", "RL needs at least one phase")
    _check(cfg.eval.samples_per_prompt == 1 or cfg.eval.temperature > 0, "eval.samples_per_prompt",
           "several answers per item need sampled decoding (eval.temperature > 0); greedy repeats one answer")
    names = [phase.name for phase in rl.phases]
    for i, phase in enumerate(rl.phases):
        _check(phase.name not in names[:i], f"rl.phases.{i}.name", f"duplicate phase name {phase.name!r}")
        _check(not rl.overlong.enabled or rl.overlong.buffer <= phase.max_output_tokens, "rl.overlong.buffer",
               f"{rl.overlong.buffer} exceeds rl.phases.{i}.max_output_tokens={phase.max_output_tokens}")
    _validate_values(cfg)
    return cfg


# A phase name becomes part of checkpoint folder names and metric keys: a safe set of characters only
# (no path separators, nothing a shell or a file system reads specially).
_PHASE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MEMORY_AGENT_STAGE = "memory-agent"  # qwenlong.pipeline.memory_agent_stage.STAGE without "rl:" (no torch here)
_TINY_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "max_position_embeddings")


def _leaves(value: Any, path: str) -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [leaf for key, item in value.items() for leaf in _leaves(item, f"{path}.{key}" if path else key)]
    if isinstance(value, list):
        return [leaf for i, item in enumerate(value) for leaf in _leaves(item, f"{path}.{i}")]
    return [(path, value)]


def _check_finite_and_urls(cfg: Config) -> None:
    """Every number finite (NaN passes no range check's intent), every judge endpoint a web URL."""
    for path, value in _leaves(dataclasses.asdict(cfg), ""):
        if isinstance(value, float):
            _check(math.isfinite(value), path, f"expected a finite number, got {value}")
        if path.rsplit(".", 1)[-1] == "judge_endpoint" and value is not None:
            url = urllib.parse.urlsplit(value)
            _check(url.scheme in ("http", "https") and bool(url.hostname), path,
                   f"expected an http:// or https:// URL with a host, got {value!r}")


def _validate_values(cfg: Config) -> None:
    """Sizes positive, model shapes that fit together, growing phases with safe names."""
    sft, rl = cfg.sft, cfg.rl
    _check(sft.steps is None or sft.steps >= 1, "sft.steps", f"expected >= 1, got {sft.steps}")
    _check(sft.epochs is None or sft.epochs > 0, "sft.epochs", f"expected > 0, got {sft.epochs}")
    for path in ("sft.grad_clip", "rl.grad_clip", "rl.advantage_eps"):
        _check(_get(cfg, path) > 0, path, f"expected > 0, got {_get(cfg, path)}")
    for path in ("sft.weight_decay", "rl.weight_decay", "rl.overlong.penalty_factor"):
        _check(_get(cfg, path) >= 0, path, f"expected >= 0, got {_get(cfg, path)}")
    _check(cfg.model.attention != "qwenlong_atomic" or cfg.distributed.sp_size == 1, "model.attention",
           "'qwenlong_atomic' has no sequence-parallel form (distributed.sp_size > 1 runs the deterministic "
           "Ulysses attention): use 'qwenlong'")
    tiny = cfg.model.tiny
    if tiny is not None:
        for key in _TINY_SIZES:
            value = getattr(tiny, key)
            _check(value >= 1, f"model.tiny.{key}", f"expected >= 1, got {value}")
        _check(tiny.rope_theta > 0, "model.tiny.rope_theta", f"expected > 0, got {tiny.rope_theta}")
        heads, kv_heads = tiny.num_attention_heads, tiny.num_key_value_heads
        _check(tiny.hidden_size % heads == 0 and (tiny.hidden_size // heads) % 2 == 0, "model.tiny.num_attention_heads",
               f"{heads} heads must split hidden_size {tiny.hidden_size} into heads of an even size (rotary)")
        _check(heads % kv_heads == 0, "model.tiny.num_key_value_heads",
               f"{kv_heads} must divide num_attention_heads {heads} (grouped-query attention)")
    synthetic = cfg.data.synthetic
    if synthetic is not None:
        for key in ("num_train", "answer_vocab_size"):
            value = getattr(synthetic, key)
            _check(value >= 1, f"data.synthetic.{key}", f"expected >= 1, got {value}")
        _check(synthetic.num_eval >= 1 or not cfg.eval.enabled, "data.synthetic.num_eval",
               f"expected >= 1 while eval is enabled, got {synthetic.num_eval}")
        _check(synthetic.num_distractor_facts >= 0, "data.synthetic.num_distractor_facts",
               f"expected >= 0, got {synthetic.num_distractor_facts}")
    for i, phase in enumerate(rl.phases):
        _check(bool(_PHASE_NAME.fullmatch(phase.name)), f"rl.phases.{i}.name",
               f"expected 1-64 letters, digits, '_', '.' or '-' starting with a letter or digit, got {phase.name!r}")
        # the stage's record and checkpoints are named as a phase of this name would be (rl:memory-agent)
        _check(not rl.memory_agent.enabled or phase.name != MEMORY_AGENT_STAGE, f"rl.phases.{i}.name",
               f"{MEMORY_AGENT_STAGE!r} is the memory-agent stage's name (its record and checkpoints would be the "
               "phase's): rename the phase")
        if i and phase.min_input_tokens is None:  # its own data starts past the previous phase's budget
            before = rl.phases[i - 1].max_input_tokens
            _check(phase.max_input_tokens > before, f"rl.phases.{i}.max_input_tokens",
                   f"a phase reads the prompts past the previous phase's budget: expected > rl.phases.{i - 1}."
                   f"max_input_tokens={before}, got {phase.max_input_tokens} (set rl.phases.{i}.min_input_tokens, "
                   "e.g. 0, for a phase that re-reads shorter prompts)")
