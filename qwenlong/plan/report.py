"""The plan of a run: memory per device at each peak, the verdict with the setting to change, time per step."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from qwenlong.config.schema import Config
from qwenlong.plan.hardware import Device, GiB, device
from qwenlong.plan.memory import MemoryPlan, Settings, check_attention, check_world, memory_plan, settings
from qwenlong.plan.models import ModelShape, model_shape
from qwenlong.plan.placement import rollout_placement
from qwenlong.plan.timing import Part, step_time, throughput_at


@dataclass(frozen=True)
class Problem:
    reason: str  # one line: what does not fit and by how much
    fix: str  # the setting(s) to change


@dataclass
class Plan:
    shape: ModelShape
    settings: Settings
    device: Device
    rl: MemoryPlan | None
    sft: MemoryPlan | None
    problems: list[Problem] = field(default_factory=list)
    parts: list[Part] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)
    throughput: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.problems

    def verdict(self) -> str:
        """One line: ``fits`` with the headroom, or the first problem and its fix."""
        if self.fits:
            peaks = [p for p in (self.rl, self.sft) if p is not None]
            peak = max(max(p.train_bytes, p.generate_bytes) for p in peaks) if peaks else 0
            return f"fits: peak {_gib(peak)} of {_gib(self.device.memory_bytes)} per {self.device.name}"
        first = self.problems[0]
        return f"does not fit: {first.reason}; {first.fix}"


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / 2**20:.0f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _largest_budget(shape: ModelShape, s: Settings, dev: Device, stage: str, tokens: int) -> int:
    """The largest per-rank token budget (multiple of 256) whose training peak fits, 0 if none."""
    lo, hi = 0, tokens // 256
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if memory_plan(shape, s, dev, mid * 256, stage).train_bytes <= dev.memory_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo * 256


def _training_problem(shape: ModelShape, s: Settings, dev: Device, stage: str) -> Problem | None:
    key = "rl.micro_batch_token_budget" if stage == "rl" else "sft.token_budget"
    tokens = s.tokens_per_rank if stage == "rl" else s.sft_tokens_per_rank
    longest = s.longest_sequence if stage == "rl" else s.sft_longest_sequence
    peak = memory_plan(shape, s, dev, tokens, stage).train_bytes
    if peak <= dev.memory_bytes:
        return None
    reason = (f"{stage.upper()} training needs {_gib(peak)} per {dev.name} of {_gib(dev.memory_bytes)} "
              f"at {key}={tokens}")
    fixes = []
    budget = _largest_budget(shape, s, dev, stage, tokens)
    if budget and budget * s.sp >= longest:
        fixes.append(f"{key}={budget}")
    elif budget:
        limit = "sft.max_seq_len" if stage == "sft" else "the phases' max_input_tokens + max_output_tokens"
        fixes.append(f"{key}={budget} with {limit} at most {budget * s.sp}")
    for sp in range(s.sp + 1, s.world + 1):  # the same packed length per SP group over more ranks
        if s.world % sp or shape.heads % sp:
            continue
        per_rank = -(-tokens * s.sp // sp)
        wider = replace(s, sp=sp, tokens_per_rank=per_rank) if stage == "rl" else replace(
            s, sp=sp, sft_tokens_per_rank=per_rank)
        if memory_plan(shape, wider, dev, per_rank, stage).train_bytes <= dev.memory_bytes:
            fixes.append(f"distributed.sp_size={sp} {key}={per_rank}")
            break
    if stage == "rl" and s.engine == "vllm" and not s.sleep and dev.cuda:
        if memory_plan(shape, replace(s, sleep=True), dev, tokens, stage).train_bytes <= dev.memory_bytes:
            fixes.insert(0, "rollout.sleep_between_phases=true")
    if not s.offload_optimizer and s.stage >= 1:
        if memory_plan(shape, replace(s, offload_optimizer=True), dev, tokens, stage).train_bytes <= dev.memory_bytes:
            fixes.append("distributed.offload_optimizer=true")
    fix = ("set " + " or ".join(fixes)) if fixes else "no single setting fits it: use more GPUs or a smaller model"
    return Problem(reason, fix)


def _problems(shape: ModelShape, s: Settings, dev: Device, rl: MemoryPlan | None, sft: MemoryPlan | None
              ) -> list[Problem]:
    problems = []
    if s.sp > 1 and shape.heads % s.sp:
        problems.append(Problem(f"Ulysses SP {s.sp} must divide the {shape.heads} attention heads",
                                "set distributed.sp_size to a divisor of the heads"))
    if rl is not None:
        if s.tokens_per_rank * s.sp < s.longest_sequence:
            need = -(-s.longest_sequence // s.sp)
            problems.append(Problem(
                f"the longest RL sequence ({s.longest_sequence} tokens) exceeds an SP group's micro-batch "
                f"({s.tokens_per_rank} x {s.sp} ranks): the packer refuses it",
                f"set rl.micro_batch_token_budget={need} (or more SP ranks)"))
        if s.engine == "vllm":
            try:
                rollout_placement(s.world, s.tp, s.sp, dev.gpus_per_node if dev.cuda else None)
            except ValueError as error:
                problems.append(Problem(str(error), "set rollout.tensor_parallel_size to a divisor of both"))
            if rl.kv_capacity_tokens is not None and rl.kv_capacity_tokens < s.longest_sequence:
                problems.append(Problem(
                    f"a vLLM engine (TP {s.tp}) holds KV for {rl.kv_capacity_tokens:,} tokens, less than one "
                    f"{s.longest_sequence:,}-token sequence",
                    "raise rollout.gpu_memory_utilization or rollout.tensor_parallel_size"))
        problem = _training_problem(shape, s, dev, "rl")
        if problem:
            problems.append(problem)
        if rl.generate_bytes > dev.memory_bytes:
            engine = sum(line.bytes for line in rl.generate if line.label.startswith("vLLM"))
            room = dev.memory_bytes - (rl.generate_bytes - engine)
            fraction = math.floor(20 * room / dev.memory_bytes) / 20 if s.kv_cache_bytes is None else None
            fix = (f"set rollout.gpu_memory_utilization={fraction:.2f}" if fraction and fraction > 0
                   else "offload the optimizer (distributed.offload_optimizer=true) or use more GPUs")
            problems.append(Problem(f"generation needs {_gib(rl.generate_bytes)} per {dev.name} "
                                    f"(trainer state + engine) of {_gib(dev.memory_bytes)}", fix))
    if sft is not None:
        if s.sft_tokens_per_rank * s.sp < s.sft_longest_sequence:
            problems.append(Problem(f"sft.max_seq_len ({s.sft_longest_sequence}) exceeds an SP group's micro-batch "
                                    f"({s.sft_tokens_per_rank} x {s.sp})",
                                    f"set sft.token_budget={-(-s.sft_longest_sequence // s.sp)}"))
        problem = _training_problem(shape, s, dev, "sft")
        if problem:
            problems.append(problem)
    return problems


def make_plan(cfg: Config, gpus: int, gpu: str | Device = "h100-80gb") -> Plan:
    """The plan of ``cfg`` on ``gpus`` devices of kind ``gpu`` (a name of ``GPUS``, ``cpu`` for this machine's
    RAM shared by the ``gpus`` processes, or a ``Device``). What cannot be planned (a device count that is no
    whole number of SP groups, a model without a shape, an attention the planner does not model) raises a
    ``ConfigError`` naming the setting."""
    check_world(gpus, cfg.distributed.sp_size)
    dev = gpu if isinstance(gpu, Device) else device(gpu, processes=gpus)
    shape = model_shape(cfg.model)
    s = settings(cfg, gpus, cuda=dev.cuda)
    check_attention(shape, s)
    rl = memory_plan(shape, s, dev, stage="rl") if cfg.rl.enabled else None
    sft = memory_plan(shape, s, dev, stage="sft") if cfg.sft.enabled else None
    plan = Plan(shape, s, dev, rl, sft, _problems(shape, s, dev, rl, sft))
    if rl is not None and s.max_output:
        plan.parts, plan.assumptions = step_time(shape, s, dev, rl)
        plan.throughput = throughput_at(shape, s, dev, rl)
    return plan


def _table(lines, total_label: str) -> list[str]:
    unit, scale = ("GiB", GiB) if max((line.bytes for line in lines), default=0) >= GiB else ("MiB", 2**20)
    out = [f"  {line.label:<40} {line.bytes / scale:>8.2f} {unit}  {line.note}" for line in lines]
    out.append(f"  {total_label:<40} {sum(line.bytes for line in lines) / scale:>8.2f} {unit}")
    return out


def format_plan(plan: Plan) -> str:
    s, shape, dev = plan.settings, plan.shape, plan.device
    engines = s.world // s.tp
    rollout = (f"; rollout vllm TP {s.tp}: {engines} engine{'s' if engines > 1 else ''}" if s.engine == "vllm"
               else f"; rollout {s.engine}")
    out = [f"model {shape.name}: {_count(shape.params)} parameters ({_count(shape.active_params)} active), "
           f"{shape.layers} layers, hidden {shape.hidden}, heads {shape.heads}/{shape.kv_heads}, vocab {shape.vocab}",
           f"{s.world} x {dev.name} ({_gib(dev.memory_bytes)} each): SP {s.sp}, ZeRO stage {s.stage}"
           + (", offload params" if s.offload_params else "") + (", offload optimizer" if s.offload_optimizer else "")
           + rollout + (", asleep while training" if s.sleep else "")]
    if plan.rl is not None:
        out += ["", f"RL training peak per device ({s.tokens_per_rank} tokens/rank, SP group "
                f"{s.tokens_per_rank * s.sp}, longest sequence {s.longest_sequence}):"]
        out += _table(plan.rl.train, "total")
        if plan.rl.generate:
            out += ["", "RL generation peak per device:"] + _table(plan.rl.generate, "total")
    if plan.sft is not None:
        out += ["", f"SFT training peak per device ({s.sft_tokens_per_rank} tokens/rank, no rollout engine):"]
        out += _table(plan.sft.train, "total")
    out += ["", "verdict: " + plan.verdict()]
    out += [f"  also: {p.reason}; {p.fix}" for p in plan.problems[1:]]
    if plan.parts:
        fast = sum(p.seconds[0] for p in plan.parts)
        slow = sum(p.seconds[1] for p in plan.parts)
        out += ["", f"time per RL step (longest phase, one generation round): {fast:,.0f}..{slow:,.0f} s"]
        out += [f"  {p.label:<28} {p.seconds[0]:>8,.0f}..{p.seconds[1]:<8,.0f} s  {p.note}" for p in plan.parts]
        out += ["assumptions:"] + [f"  - {a}" for a in plan.assumptions]
        out += ["throughput:"] + [f"  - {t}" for t in plan.throughput]
    return "\n".join(out)
