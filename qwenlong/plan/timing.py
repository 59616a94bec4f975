"""Time per RL step, as a range, each part with the assumption that bounds it.

Generation is bandwidth-bound: each decode step of an engine reads its weights once and the KV
cache of every sequence in its batch, so a step costs (weight bytes + batch x context x KV bytes
per token) / HBM bandwidth on each of its TP GPUs, and a batch is what the KV capacity holds.
Prefill and the trainer's passes are compute-bound: FLOPs at a stated fraction of the GPU's dense
bf16 peak (model FLOPs utilisation), or the measured one where ``benchmarks/results/`` holds a GPU
result with an ``mfu`` column. Transfers are bytes over the link they cross.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from qwenlong.plan.hardware import Device
from qwenlong.plan.memory import MemoryPlan, Settings, engine_kv_bytes_per_token, engine_weight_bytes
from qwenlong.plan.models import ModelShape

# (slow end, fast end) of each assumption
MFU = (0.25, 0.45)  # training and old-log-prob passes (model FLOPs over the dense bf16 peak)
PREFILL_MFU = (0.35, 0.6)
DECODE_BANDWIDTH = (0.5, 0.8)  # share of peak HBM bandwidth a decode step reaches
RESPONSE_FRACTION = (1.0, 0.3)  # mean response length / max_output_tokens
PROMPT_FRACTION = (1.0, 0.5)  # mean prompt length / max_input_tokens
FAST, SLOW = 1, 0
RESULTS_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


@dataclass(frozen=True)
class Part:
    label: str
    seconds: tuple[float, float]  # (fast, slow)
    note: str


def measured_mfu(results_dir: Path = RESULTS_DIR) -> tuple[float, float] | None:
    """(min, max) of the ``mfu`` column of GPU benchmark results, or None when there are none."""
    values = []
    for path in sorted(results_dir.glob("*.json")) if results_dir.is_dir() else []:
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(result, dict) or result.get("environment", {}).get("card", "cpu") == "cpu":
            continue
        values += [row["mfu"] for row in result.get("rows", []) if isinstance(row.get("mfu"), int | float)]
    return (min(values), max(values)) if values else None


def forward_flops(shape: ModelShape, tokens: float, seq_len: float) -> float:
    """A forward pass over ``tokens`` tokens in sequences of ``seq_len``: 2 FLOPs per active parameter
    per token, plus causal attention (QK^T and PV: 2 x 2 x heads x head_dim per key seen, seq_len / 2 on average)."""
    attention = 2 * shape.layers * shape.heads * shape.head_dim * seq_len
    return tokens * (2 * shape.active_params + attention)


def train_passes(s: Settings) -> int:
    """Forward-pass equivalents of one training pass over a micro-batch: forward, backward (two: d(input) and
    d(weight)) and, with gradient checkpointing, the recomputed forward. ``GRPOTrainer.update`` runs it once per
    epoch (``rl.ppo_epochs``) over each step's batch; the old (and reference) log-probs are computed once."""
    return 4 if s.gradient_checkpointing else 3


def decode_step_seconds(shape: ModelShape, s: Settings, dev: Device, batch: int, context: float,
                        bandwidth: float) -> float:
    weights = engine_weight_bytes(shape, s)
    if shape.moe:  # the experts a step's tokens touch (all of them once the batch is large)
        expert_bytes = shape.layers * shape.experts * 3 * shape.hidden * shape.expert_intermediate * 2 // s.tp
        touched = min(1.0, batch * shape.experts_per_token / shape.experts)
        weights = weights - expert_bytes + touched * expert_bytes
    kv = batch * context * engine_kv_bytes_per_token(shape, s)
    return (weights + kv) / (dev.hbm_bytes_per_s * bandwidth)


def step_time(shape: ModelShape, s: Settings, dev: Device, plan: MemoryPlan) -> tuple[list[Part], list[str]]:
    """The parts of one RL step (one generation round) and the assumptions behind them."""
    tp = s.tp if s.engine == "vllm" else 1
    engines = max(s.world // tp, 1)  # a TP wider than the ranks is a problem of the verdict: time one engine
    per_engine = math.ceil(s.gen_sequences / engines)
    mfu = measured_mfu()
    mfu_note = "measured (benchmarks/results/)" if mfu else "stated bounds: no GPU result in benchmarks/results/"
    mfu = mfu or MFU
    parts, assumptions = [], []
    gen, prefill = [], []
    for end in (FAST, SLOW):
        prompt, response = PROMPT_FRACTION[end] * s.max_input, RESPONSE_FRACTION[end] * s.max_output
        context = prompt + response / 2
        capacity = plan.kv_capacity_tokens
        batch = per_engine if capacity is None else max(1, min(per_engine, int(capacity // (prompt + response))))
        steps = math.ceil(per_engine / batch) * response
        gen.append(steps * decode_step_seconds(shape, s, dev, batch, context, DECODE_BANDWIDTH[end]))
        flops = forward_flops(shape, per_engine * prompt, prompt)
        prefill.append(flops / (tp * dev.bf16_flops * PREFILL_MFU[end]))
    batch_note = (f"{engines} engine{'s' if engines > 1 else ''} of TP {tp}, {per_engine} sequences each, "
                  "batch up to the KV capacity"
                  + (f" ({plan.kv_capacity_tokens:,} tokens)" if plan.kv_capacity_tokens else ""))
    parts.append(Part("generate: decode", (gen[0], gen[1]), batch_note))
    parts.append(Part("generate: prefill", (prefill[0], prefill[1]), f"prompt FLOPs at {PREFILL_MFU} MFU"))
    train_time, logprob_time = [], []
    passes = train_passes(s)
    for end in (FAST, SLOW):
        seq = PROMPT_FRACTION[end] * s.max_input + RESPONSE_FRACTION[end] * s.max_output
        fwd = forward_flops(shape, s.train_sequences * seq, seq)
        rate = s.world * dev.bf16_flops * mfu[end]
        logprob_time.append(fwd / rate)
        train_time.append(s.ppo_epochs * passes * fwd / rate)
    parts.append(Part("old log-probs", (logprob_time[0], logprob_time[1]), f"one forward, MFU {mfu} ({mfu_note})"))
    if s.kl_reference:  # GRPOTrainer._old_logprobs: the reference's forward over the same batches
        parts.append(Part("reference log-probs", (logprob_time[0], logprob_time[1]),
                          f"one forward of the KL reference (rl.kl_coef > 0), MFU {mfu}"))
    epochs = f" x {s.ppo_epochs} epochs (rl.ppo_epochs)" if s.ppo_epochs > 1 else ""
    parts.append(Part("train", (train_time[0], train_time[1]),
                      f"forward + backward{' + recompute' if s.gradient_checkpointing else ''}{epochs}, MFU {mfu}"))
    param_bytes = shape.params * s.dtype_bytes
    if s.stage == 3:  # KL is refused under ZeRO-3: no reference forward to gather for
        micro = math.ceil(s.train_sequences * (s.max_input + s.max_output) / (s.tokens_per_rank * s.world))
        # the old log-probs' forward, then each epoch's passes (the backward's two FLOP passes share one gather)
        gathers = micro * (1 + s.ppo_epochs * (passes - 1))
        link = dev.network_bytes_per_s if s.world > dev.gpus_per_node else dev.nvlink_bytes_per_s
        seconds = gathers * param_bytes / link
        if s.offload_params:
            seconds += gathers * param_bytes / s.world / dev.pcie_bytes_per_s
        parts.append(Part("ZeRO-3 parameter gathers", (0.0, seconds),
                          f"{gathers} gathers of {param_bytes / 1e9:.0f} GB per rank (up to {micro} micro-batches); "
                          "hidden behind compute at best, not at all at worst"
                          + (" + PCIe for offload_params" if s.offload_params else "")))
    if s.engine == "vllm":
        link = dev.network_bytes_per_s if s.world > dev.gpus_per_node else dev.nvlink_bytes_per_s
        parts.append(Part("weight sync", (param_bytes / dev.nvlink_bytes_per_s, param_bytes / link),
                          "the whole policy gathered to every engine once per step"))
        if s.sleep:
            wake = 2 * engine_weight_bytes(shape, s) / dev.pcie_bytes_per_s
            parts.append(Part("sleep and wake", (wake, wake), "weights / TP to CPU and back over PCIe"))
    parts.append(Part("score", (0.0, 5.0), "overlapped with generation; at worst the last groups' judge calls"))
    assumptions += [
        f"responses average {RESPONSE_FRACTION[1]:.0%}..{RESPONSE_FRACTION[0]:.0%} of max_output_tokens, "
        f"prompts {PROMPT_FRACTION[1]:.0%}..{PROMPT_FRACTION[0]:.0%} of max_input_tokens "
        f"({s.max_input} / {s.max_output})",
        f"decode reaches {DECODE_BANDWIDTH[0]:.0%}..{DECODE_BANDWIDTH[1]:.0%} of {dev.hbm_bytes_per_s / 1e12:.2f} TB/s",
        "one generation round: each further dynamic-sampling round adds the generate lines again",
    ]
    return parts, assumptions


def throughput_at(shape: ModelShape, s: Settings, dev: Device, plan: MemoryPlan, seq_len: int = 120_000) -> list[str]:
    """Training and decode tokens/s at ``seq_len``-token sequences (the presets' longest inputs)."""
    mfu = measured_mfu() or MFU
    per_token = forward_flops(shape, 1, seq_len) * train_passes(s)
    lines = [f"train: {mfu[0] * dev.bf16_flops / per_token:,.0f}..{mfu[1] * dev.bf16_flops / per_token:,.0f} "
             f"tokens/s per GPU at {seq_len // 1000}K-token sequences (MFU {mfu[0]:.0%}..{mfu[1]:.0%})"]
    if s.engine == "vllm" and plan.kv_capacity_tokens:
        batch = max(1, plan.kv_capacity_tokens // seq_len)
        rates = [batch / decode_step_seconds(shape, s, dev, batch, seq_len, bw) for bw in DECODE_BANDWIDTH]
        lines.append(f"decode: {rates[0]:,.0f}..{rates[1]:,.0f} tokens/s per engine at {seq_len // 1000}K context "
                     f"(batch {batch}: what the KV cache holds)")
    return lines
