"""Per-device memory of a run: what the trainer, the kernels and the rollout engine hold at their peaks.

Two moments bound a step. *Training*: the policy's weights, gradients and optimizer state (as
the ZeRO stage and offload settings place them), the KL reference's frozen copy (``rl.kl_coef > 0``),
the activations of the largest micro-batch (per rank: the token budget; under Ulysses SP each rank
holds its shard of every layer), the fused LM head's and attention's backward buffers, and whatever
the rollout engine keeps while it is idle (all of it, unless it sleeps). *Generation*: the trainer's
resident state plus the engine's share of the device (weights over TP and KV cache). Each line says
where its number comes from; the assumptions are the module constants below. Only our attention
kernels are modelled (:func:`check_attention` refuses the others by name).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qwenlong.config import ConfigError
from qwenlong.config.schema import Config
from qwenlong.plan.hardware import Device, GiB
from qwenlong.plan.kernel_sizes import kernel_constant
from qwenlong.plan.models import ModelShape

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# DeepSpeed defaults (qwenlong's DeepSpeed config sets none of them): reduce bucket (elements). Stages 1-3
# allocate it whole (``torch.empty``) in the gradient-accumulation dtype, the model dtype by default, whatever
# the model's size; stage 3 (``overlap_comm`` on by default) still keeps a single one
DEEPSPEED_REDUCE_BUCKET = 500_000_000
CUDA_CONTEXT_BYTES = int(1.5 * GiB)  # CUDA context, cuBLAS/NCCL workspaces and buffers, per GPU
VLLM_ASLEEP_BYTES = 1 * GiB  # a sleeping vLLM engine keeps its CUDA graphs and context
VLLM_RUNTIME_BYTES = 2 * GiB  # vLLM's activation and sampler reserve beside weights and KV cache
FRAGMENTATION = 0.10  # of the transient (per micro-batch) allocations: the caching allocator's slack
# the attention implementations whose memory the planner models: our varlen kernels (``qwenlong.kernels.attention``)
MODELLED_ATTENTION = ("qwenlong", "qwenlong_atomic")


@dataclass(frozen=True)
class Line:
    label: str
    bytes: int
    note: str = ""


@dataclass
class Settings:
    """What the memory and time models read from a run's config (``settings(cfg, gpus)``)."""

    world: int
    sp: int
    stage: int
    offload_optimizer: bool
    offload_params: bool
    dtype_bytes: int
    tokens_per_rank: int  # RL's micro-batch token budget (per GPU): rl.micro_batch_token_budget
    sft_tokens_per_rank: int  # SFT's (sft.token_budget); 0 when SFT is off
    longest_sequence: int  # prompt + response of the longest RL phase
    sft_longest_sequence: int
    gradient_checkpointing: bool
    engine: str
    tp: int
    gpu_fraction: float
    kv_cache_bytes: int | None
    sleep: bool
    gen_sequences: int  # prompts generated per round x group size
    train_sequences: int
    max_input: int
    max_output: int
    attention: str = "qwenlong"  # model.attention
    kl_reference: bool = False  # rl.kl_coef > 0: the trainer keeps a frozen copy of the policy
    ppo_epochs: int = 1  # training passes over each step's batch (rl.ppo_epochs)
    notes: list[str] = field(default_factory=list)


def check_world(world: int, sp_size: int, argument: str = "gpus") -> None:
    """A run's device count must be at least 1 and a whole number of SP groups; else a ``ConfigError`` naming
    ``argument`` (``--gpus`` on the command line), which ``qwenlong`` reports in one line with exit status 2."""
    if world < 1:
        raise ConfigError(f"{argument}: must be >= 1, got {world}")
    if world % sp_size:
        raise ConfigError(f"{argument}: {world} is not a multiple of distributed.sp_size ({sp_size}): "
                          "the ranks form sequence-parallel groups of sp_size")


def settings(cfg: Config, gpus: int, cuda: bool = True) -> Settings:
    dist, rl, sft = cfg.distributed, cfg.rl, cfg.sft
    check_world(gpus, dist.sp_size)
    phases = rl.phases if rl.enabled else []
    longest = max((p.max_input_tokens + p.max_output_tokens for p in phases), default=0)
    max_input = max((p.max_input_tokens for p in phases), default=0)
    max_output = max((p.max_output_tokens for p in phases), default=0)
    colocated_vllm = cfg.rollout.engine == "vllm" and cuda
    sleep = cfg.rollout.sleep_between_phases
    return Settings(
        world=gpus, sp=dist.sp_size, stage=dist.deepspeed_stage, offload_optimizer=dist.offload_optimizer,
        offload_params=dist.offload_params, dtype_bytes=DTYPE_BYTES[cfg.model.dtype],
        tokens_per_rank=rl.micro_batch_token_budget if rl.enabled else 0,
        sft_tokens_per_rank=sft.token_budget if sft.enabled else 0, longest_sequence=longest,
        sft_longest_sequence=sft.max_seq_len if sft.enabled else 0,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        engine=cfg.rollout.engine, tp=cfg.rollout.tensor_parallel_size,
        gpu_fraction=cfg.rollout.gpu_memory_utilization, kv_cache_bytes=cfg.rollout.kv_cache_memory_bytes,
        sleep=colocated_vllm if sleep is None else (sleep and colocated_vllm),
        gen_sequences=rl.gen_prompts_per_step * rl.group_size,
        train_sequences=rl.train_prompts_per_step * rl.group_size,
        max_input=max_input, max_output=max_output, attention=cfg.model.attention,
        kl_reference=rl.enabled and rl.kl_coef > 0, ppo_epochs=rl.ppo_epochs,
    )


def check_attention(shape: ModelShape, s: Settings) -> None:
    """Refuse, naming ``model.attention``, a run whose training attention the planner does not model: its numbers
    would leave out what may be the largest allocation of all. ``eager`` (transformers' matmul-softmax-matmul)
    materializes heads x T x T scores and probabilities in every layer over the whole packed row (its mask only
    hides the other sequences' keys) and keeps the fp32 softmax output and the model-dtype probabilities for the
    backward; ``sdpa`` runs whichever kernel PyTorch picks for the T x T block-diagonal mask transformers builds
    over a packed row. Under Ulysses SP (``sp_size > 1``) every layer runs our attention whatever
    ``model.attention`` says (``SequenceParallelCausalLM``), so the plan holds there."""
    tokens = max(s.tokens_per_rank, s.sft_tokens_per_rank)
    if s.sp > 1 or s.attention in MODELLED_ATTENTION or not tokens:
        return
    advice = "which qwenlong plan does not model; plan (and train) with model.attention=qwenlong"
    if s.attention == "eager":
        kept = shape.heads * tokens * tokens * (4 if s.dtype_bytes == 4 else 4 + s.dtype_bytes)
        raise ConfigError(f"model.attention: 'eager' materializes heads x T x T attention probabilities in every "
                          f"layer (one layer's at {tokens:,} tokens per micro-batch: {_gb(kept)} kept for its "
                          f"backward), {advice}")
    raise ConfigError(f"model.attention: {s.attention!r} runs the kernel PyTorch picks for the T x T block-diagonal "
                      f"mask transformers builds over a packed row (the mask alone: {_gb(tokens * tokens)} at "
                      f"{tokens:,} tokens), {advice}")


# ----------------------------------------------------------------------------- activations


def layer_activation_bytes(shape: ModelShape, b: int, sp: int) -> int:
    """Bytes per token that one decoder layer's autograd graph holds (HF Qwen2/Qwen3/Llama layer, our attention),
    beyond the layer's input.

    RMSNorm (x2): its input in fp32 (a bf16 layer's fp32 copies; an fp32 layer's second norm saves the residual
    sum itself, its first the layer's input, not counted here), its normalised and its weighted output;
    attention: rotated q and k, v (under Ulysses with kv heads repeated up to the SP degree), the attention
    output and its fp32 log-sum-exp; ``o_proj`` reads a view of that output, except under Ulysses, where it
    saves the second all-to-all's copy; MLP: gate, SiLU(gate), up and their product (MoE: per routed copy,
    plus the router's fp32 probabilities and the gathered token copies). A bf16 layer's residual sum is saved
    by nobody (its norm keeps the fp32 copy). The rotary cos/sin are shared by all layers
    (:func:`rotary_bytes`). Checked against what autograd saves (``saved_tensors_hooks``) for a Qwen2 layer in
    fp32 and bf16 (``tests/test_plan.py``).
    """
    h, d = shape.hidden, shape.head_dim
    q = shape.heads * d
    kv = (max(shape.kv_heads, sp) if sp > 1 else shape.kv_heads) * d
    norm_inputs = 2 * 4 * h if b < 4 else 4 * h
    norms = 2 * 2 * b * h
    attention = (q + 2 * kv) * b + q * b * (2 if sp > 1 else 1) + 4 * shape.heads
    return norm_inputs + norms + attention + mlp_activation_bytes(shape, b)


def mlp_activation_bytes(shape: ModelShape, b: int) -> int:
    """Per token, what a layer's MLP saves (see :func:`layer_activation_bytes`)."""
    h = shape.hidden
    if shape.moe:
        k = shape.experts_per_token
        return 8 * shape.experts + k * (2 * h * b + 4 * shape.expert_intermediate * b) + h * b
    return 4 * shape.intermediate * b


def rotary_bytes(shape: ModelShape, b: int) -> int:
    """Per token, the rotary cos and sin (model dtype) that every layer's q/k rotation saves: computed once."""
    return 2 * shape.head_dim * b


def layer_backward_extra_bytes(shape: ModelShape, b: int, sp: int, tokens: int, attention_workspace: int) -> int:
    """What a layer's backward holds beyond its saved tensors, at the larger of its two peaks (bytes).

    Autograd frees each node's saved tensors once the node has run, and each gradient once its consumer has,
    so the MLP's and the attention's peaks do not meet. *MLP*: the backward of ``act * up`` holds three
    intermediate-wide gradients (of the product, of SiLU(gate), of up) while the product itself is already
    freed (its one reader, ``down_proj``, has run), beside the gradient coming into the layer. *Attention*,
    later: the MLP's saved tensors and the second norm's are gone; the gradients of the residual sum and of
    the attention output are live beside the attention backward's own buffers (``attention_workspace``). A
    trace of every allocation of a checkpointed CPU step puts its peak at the MLP's product backward
    (``benchmarks/bench_plan_memory.py``)."""
    h, q = shape.hidden, shape.heads * shape.head_dim
    width = shape.experts_per_token * shape.expert_intermediate if shape.moe else shape.intermediate
    mlp_peak = tokens * (2 * width * b + h * b)
    freed = mlp_activation_bytes(shape, b) + 2 * b * h + 4 * h  # the MLP's and the second norm's (its fp32 input)
    attention_peak = tokens * ((h + q) * b - freed) + attention_workspace
    return max(mlp_peak, attention_peak)


def lm_head_workspace_bytes(shape: ModelShape, tokens: int, b: int, cuda: bool) -> int:
    """The fused LM head's backward buffers (``qwenlong.kernels.logprobs``), both paths: d(hidden) (T x d) and
    d(weight) (V x d) in the input dtype, fp32 sums of d(hidden) (T x d) and of one vocabulary chunk's d(weight)
    rows (VOCAB_CHUNK x d), plus the logits chunk: on CUDA one TOKEN_CHUNK x VOCAB_CHUNK tile of fp32 logits and
    one of dz in the input dtype (the CUDA extension, which ``auto`` takes where it was built, and whose chunks
    are the Triton kernels' (``linear_logprobs``); those hold the dz tile only); on CPU (chunked PyTorch) fp32
    tiles of its TOKEN_CHUNK x VOCAB_CHUNK (logits, probabilities, weight and hidden rows, ``chunked``). Every
    token is counted as valid (nothing is gathered then)."""
    h, v = shape.hidden, shape.vocab
    module = "logprobs.linear_logprobs" if cuda else "logprobs.chunked"
    rows = min(kernel_constant(module, "TOKEN_CHUNK"), tokens)
    cols = min(kernel_constant(module, "VOCAB_CHUNK"), v)
    grads = (tokens + v) * h * b + tokens * h * 4 + cols * h * 4 + 4 * 4 * tokens
    if cuda:
        return grads + rows * cols * (4 + b)
    return grads + 4 * (3 * rows * cols + cols * h + rows * h)


def attention_workspace_bytes(shape: ModelShape, tokens: int, b: int, sp: int, longest: int, cuda: bool,
                              atomic: bool = False) -> int:
    """One attention layer's backward buffers (``qwenlong.kernels.attention``) per rank: dq, dk, dv and the
    fp32 ``delta`` rows (Triton, one tile per program, nothing T x T); the CPU path also accumulates one
    sequence's dq/dk/dv in fp32 and holds (heads x BLOCK_Q x BLOCK_K) fp32 score tiles. ``atomic``
    (``model.attention: qwenlong_atomic``): the Triton backward adds dq into a zeroed fp32 buffer (tokens x
    heads x head_dim) and casts it to the model dtype at the end, both alive at that cast (``_triton_backward``):
    4 bytes per element more, except in an fp32 model, where the buffer is dq itself; the CPU path is the same
    either way."""
    d = shape.head_dim
    q = shape.heads * d
    kv = (max(shape.kv_heads, sp) if sp > 1 else shape.kv_heads) * d
    buffers = tokens * ((q + 2 * kv) * b + 4 * shape.heads)
    if cuda:
        return buffers + (4 * tokens * q if atomic and b != 4 else 0)
    block_q = kernel_constant("attention.blockwise", "BLOCK_Q")
    block_k = kernel_constant("attention.blockwise", "BLOCK_K")
    sequence = min(longest, tokens * sp) if longest else tokens * sp
    heads = shape.heads // sp if sp > 1 else shape.heads
    return buffers + sequence * (q + 2 * kv) // max(sp, 1) * 4 + 4 * 4 * heads * block_q * block_k


# ----------------------------------------------------------------------------- the lines


@dataclass
class MemoryPlan:
    device: Device
    train: list[Line]
    generate: list[Line]
    kv_capacity_tokens: int | None  # per engine, for vLLM
    engines: int

    @property
    def train_bytes(self) -> int:
        return sum(line.bytes for line in self.train)

    @property
    def generate_bytes(self) -> int:
        return sum(line.bytes for line in self.generate)


def _gb(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / 2**20:.0f} MiB"


def reduce_bucket_bytes(shape: ModelShape, s: Settings, cuda: bool, peak_at_head: bool = True) -> int:
    """DeepSpeed's gradient reduce bucket (stages 1-3): ``reduce_bucket_size`` elements in the model dtype,
    allocated whole however small the model; a GPU holds all of it. On a CPU host only the pages written are
    resident: stage 3 allocates its bucket once, so every gradient of an earlier step (at most the parameters)
    has written its pages; stages 1-2 allocate it afresh at every backward (``setup_buckets``), so at the
    backward's peak it holds only the gradients reduced before that peak: none at the LM head's (the
    backward's first op), an untied head's at a layer's."""
    allocated = DEEPSPEED_REDUCE_BUCKET * s.dtype_bytes
    if cuda:
        return allocated
    if s.stage == 3:
        written = shape.params
    else:
        written = 0 if peak_at_head or shape.tie_embeddings else shape.embedding_params
    return min(allocated, written * s.dtype_bytes)


def state_lines(shape: ModelShape, s: Settings, cuda: bool = True, peak_at_head: bool = True) -> list[Line]:
    """Weights, gradients and optimizer state per rank: plain PyTorch (stage 0) keeps all three in the
    model dtype (AdamW moments included); DeepSpeed (stages 1-3) adds fp32 master weights, keeps them and
    the moments as 1/world shares, and accumulates gradients in the model dtype: whole under stage 1, a
    1/world partition under stages 2-3 (the fp32 copy of the partition exists only inside the optimizer
    step, when the activations are gone), beside its reduce bucket (``peak_at_head``: where the backward peaks,
    which decides the bucket's resident pages on a CPU host). Measured on 2 gloo processes by
    ``benchmarks/bench_plan_memory.py --zero``."""
    p, b, n = shape.params, s.dtype_bytes, s.world
    lines = []
    if s.stage == 3:
        where = "on CPU (offload_params)" if s.offload_params else f"1/{n} of {_gb(p * b)}"
        lines.append(Line("policy weights", 0 if s.offload_params else p * b // n, where))
        unit = max(shape.layer_params, shape.embedding_params)
        lines.append(Line("ZeRO-3 gathered parameters", 2 * unit * b,
                          "the module being computed and the next one prefetched (largest: "
                          f"{'LM head' if shape.embedding_params >= shape.layer_params else 'a layer'})"))
    else:
        lines.append(Line("policy weights", p * b, f"{p:,} parameters x {b} bytes"))
    if s.stage == 0:
        lines.append(Line("gradients", p * b, "full, model dtype"))
        lines.append(Line("optimizer (AdamW m, v)", 2 * p * b, "model dtype, no master copy (plain PyTorch)"))
        return lines
    if s.stage == 1:
        lines.append(Line("gradients", p * b, "full, model dtype (each rank accumulates all of them)"))
    elif s.offload_optimizer:
        lines.append(Line("gradients", 0, "partition on CPU (offload_optimizer)"))
    else:
        lines.append(Line("gradients", p * b // n, f"model dtype, 1/{n} (the partition this rank reduces into)"))
    bucket = reduce_bucket_bytes(shape, s, cuda, peak_at_head)
    lines.append(Line("gradient reduce buckets", bucket,
                      f"DeepSpeed's reduce_bucket_size ({DEEPSPEED_REDUCE_BUCKET:,} elements) x {b} bytes, allocated "
                      "whole" if cuda else "the pages of DeepSpeed's reduce bucket written before the backward's peak"))
    lines.append(Line("optimizer (fp32 master + AdamW m, v)", 0 if s.offload_optimizer else 12 * p // n,
                      "on CPU (offload_optimizer)" if s.offload_optimizer else f"12 bytes x 1/{n} of the parameters"))
    return lines


def reference_lines(shape: ModelShape, s: Settings) -> list[Line]:
    """The KL reference policy (``rl.kl_coef > 0``), held at every moment of RL: ``GRPOTrainer.set_reference``
    keeps ``TrainingBackend.frozen_copy()``, a deep copy of the policy module, so it lives where the policy's
    weights do (the GPU; on a CPU run, the process's RAM), in the model dtype, whole: ZeRO stages 1-2 partition
    gradients and optimizer state, not the module's weights, and neither offload setting moves the copy (ZeRO-3,
    which could partition it, is refused with KL when the config loads). Its log-probs are one more no-grad
    forward per step (:func:`qwenlong.plan.timing.step_time`). With ``rl.kl_reference: phase_start`` each phase's
    new copy is made while the old one is still held, outside any micro-batch: not counted here."""
    if not s.kl_reference:
        return []
    return [Line("KL reference weights", shape.params * s.dtype_bytes,
                 f"frozen copy of the policy (rl.kl_coef > 0): {shape.params:,} parameters x {s.dtype_bytes} bytes")]


def backward_peaks(shape: ModelShape, s: Settings, cuda: bool, t: int, longest: int) -> tuple[int, int]:
    """The backward's two working sets beyond what it holds throughout (bytes): the fused LM head's backward
    beside the final norm's saved tensors, and, once those are freed, one layer's backward (recomputed under
    checkpointing, its saved tensors included) at its own larger peak (:func:`layer_backward_extra_bytes`)."""
    b = s.dtype_bytes
    attention = attention_workspace_bytes(shape, t, b, s.sp, longest, cuda, atomic=s.attention == "qwenlong_atomic")
    extra = layer_backward_extra_bytes(shape, b, s.sp, t, attention)
    layer = t * layer_activation_bytes(shape, b, s.sp) + extra if s.gradient_checkpointing else extra
    head = lm_head_workspace_bytes(shape, t, b, cuda) + t * shape.hidden * (4 + 2 * b)  # + the final norm's
    return head, layer


def activation_lines(shape: ModelShape, s: Settings, cuda: bool, t: int, longest: int) -> list[Line]:
    """What the backward holds throughout (every layer's input under checkpointing, else every layer's saved
    tensors; the rotary cos/sin) and its working set at the larger of its two peaks (:func:`backward_peaks`)."""
    b = s.dtype_bytes
    rotary = t * rotary_bytes(shape, b)
    if s.gradient_checkpointing:
        held = shape.layers * t * shape.hidden * b
        note = f"{t} tokens/rank: {shape.layers} layer inputs (checkpoints)"
    else:  # an fp32 layer's first norm saves the layer input itself (a bf16 one saves its fp32 copy)
        inputs = shape.hidden * b if b == 4 else 0
        held = shape.layers * t * (layer_activation_bytes(shape, b, s.sp) + inputs)
        note = f"{t} tokens/rank x {shape.layers} layers' saved tensors (no checkpointing)"
    head, layer = backward_peaks(shape, s, cuda, t, longest)
    which = (f"the fused LM head's ({_gb(head)}: fp32 d(hidden), d(weight), dz chunk, the final norm's saved "
             f"tensors) over one layer's ({_gb(layer)})" if head >= layer else
             f"one layer's ({_gb(layer)}: {'recomputed, ' if s.gradient_checkpointing else ''}the MLP's gradients "
             f"in flight, or later attention's dq/dk/dv) over the fused LM head's ({_gb(head)})")
    return [
        Line("activations", held + rotary, note + (f" (SP {s.sp}: each rank its shard)" if s.sp > 1 else "")),
        Line("backward working set", max(head, layer), which),
    ]


def engine_weight_bytes(shape: ModelShape, s: Settings) -> int:
    return shape.params * 2 // s.tp  # vLLM serves bf16


def engine_kv_bytes_per_token(shape: ModelShape, s: Settings) -> int:
    """KV bytes one token costs each GPU of an engine: kv heads are split over TP (replicated when TP > kv heads)."""
    heads = max(shape.kv_heads // s.tp, 1)
    return 2 * shape.layers * heads * shape.head_dim * 2


def engine_lines(shape: ModelShape, s: Settings, dev: Device) -> tuple[list[Line], int | None]:
    """The engine's share of each of its GPUs while it generates, and its KV capacity in tokens."""
    if s.engine != "vllm":
        return [], None
    weights = engine_weight_bytes(shape, s)
    if s.kv_cache_bytes is not None:
        kv = s.kv_cache_bytes
        lines = [Line("vLLM weights", weights, f"bf16 / TP {s.tp}"),
                 Line("vLLM KV cache", kv, "rollout.kv_cache_memory_bytes"),
                 Line("vLLM runtime", VLLM_RUNTIME_BYTES, "activations, sampler, CUDA graphs")]
    else:
        total = int(s.gpu_fraction * dev.memory_bytes)
        kv = total - weights - VLLM_RUNTIME_BYTES
        lines = [Line("vLLM engine", total, f"gpu_memory_utilization {s.gpu_fraction} of {_gb(dev.memory_bytes)}: "
                      f"weights {_gb(weights)} (TP {s.tp}) + KV {_gb(max(kv, 0))} + runtime")]
    return lines, max(kv, 0) // engine_kv_bytes_per_token(shape, s)


def memory_plan(shape: ModelShape, s: Settings, dev: Device, tokens: int | None = None,
                stage: str = "rl") -> MemoryPlan:
    """The lines of RL (``stage="rl"``: the rollout engine beside the trainer) or SFT (no engine), at the
    stage's token budget per rank or ``tokens``."""
    cuda = dev.cuda
    if tokens is None:
        tokens = s.tokens_per_rank if stage == "rl" else s.sft_tokens_per_rank
    longest = s.longest_sequence if stage == "rl" else s.sft_longest_sequence
    head, layer = backward_peaks(shape, s, cuda, tokens, longest)
    state = state_lines(shape, s, cuda, peak_at_head=head >= layer)
    if stage == "rl":
        state += reference_lines(shape, s)
    acts = activation_lines(shape, s, cuda, tokens, longest)
    engine, capacity = engine_lines(shape, s, dev) if stage == "rl" else ([], None)
    base = [Line("CUDA context and NCCL", CUDA_CONTEXT_BYTES, "measured typical")] if cuda else []
    transient = sum(line.bytes for line in acts)
    margin = Line("fragmentation margin", int(FRAGMENTATION * transient),
                  f"{FRAGMENTATION:.0%} of the per-micro-batch allocations")
    if engine and s.sleep:
        idle = [Line("vLLM engine (asleep)", VLLM_ASLEEP_BYTES, "level-1 sleep: weights to CPU, KV cache freed")]
    elif engine:
        idle = [Line(line.label + " (awake: no sleep)", line.bytes, line.note) for line in engine]
    else:
        idle = []
    train = state + acts + [margin] + idle + base
    resident = [line for line in state if line.label not in ("ZeRO-3 gathered parameters", "gradient reduce buckets")]
    if stage == "sft":
        generate = []
    elif s.engine == "vllm":
        generate = resident + engine + base
    else:  # HF generate on the policy: its KV cache; ZeRO-3 gathers each layer as it goes
        batch = min(64, max(s.gen_sequences // max(s.world // s.sp, 1), 1))
        kv = batch * s.longest_sequence * shape.kv_bytes_per_token(s.dtype_bytes)
        generate = state + [Line("HF generate KV cache", kv, f"{batch} sequences x {s.longest_sequence} tokens")] + base
    return MemoryPlan(dev, train, generate, capacity, engines=s.world // s.tp if s.engine == "vllm" else s.world)
