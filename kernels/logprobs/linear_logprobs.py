"""Fused LM head: per-token log-probs, entropy and mean log-prob without the T x V logits.

For hidden states ``h`` (T, d), head weight ``W`` (V, d), temperature ``tau`` and target ``t``:

    z = h W^T / tau                     logits, one (BLOCK_T, BLOCK_V) tile at a time, fp32
    L = logsumexp_j z_j                 online over vocabulary tiles (running max m)
    logp_t = z_t - L
    H = -sum_j p_j log p_j = log s - a / s,   s = sum_j e^(z_j - m),  a = sum_j e^(z_j - m) (z_j - m)
    mean_logp = (1/V) sum_j z_j - L     (label smoothing needs it)

``a`` is carried relative to the running max (``a <- e^(m - m') (a + (m - m') s)``), so
the entropy never subtracts two numbers of the logits' size: logits of 1e4 stay accurate.

Backward recomputes every tile and forms the logit gradient in fast memory:

    dz_j = g_logp (1[j = t] - p_j)  -  g_H p_j (log p_j + H)  +  g_mean (1/V - p_j)
    dh = (dz W) / tau,   dW = (dz^T h) / tau

Determinism without atomics: d(hidden) comes from a kernel over token blocks and d(weight)
from a kernel over vocabulary tiles. Each program owns the rows it writes and walks the
other axis in a fixed order, so both gradients are bitwise reproducible. The price is one
extra recompute of the logits (4 GEMM-sized passes in backward instead of 3); per-token-block
partial d(weight) buffers would instead cost (T / BLOCK_T) x V x d floats, far too much at
120K tokens. Both gradients accumulate in fp32 buffers (d(weight): V x d x 4 bytes) that
are cast to the input dtype at the end. Tile sizes depend on d and dtype only, never on T, so
a token's outputs are the same bits whatever else is in the batch. CPU tensors take the chunked PyTorch path (:mod:`.chunked`)
unless the Triton interpreter is on.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import select_backend
from ..utils.checks import FLOAT_DTYPES, check_same_device, check_tensor
from ..utils.compile_spec import CompileSpec
from . import cuda_backend
from .chunked import ChunkedLinearStats

_TRITON_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_BACKWARD_FP32_ARGS = ("lse_ptr", "entropy_ptr", "grad_logp_ptr", "grad_entropy_ptr", "grad_mean_ptr")
_BACKWARD_FLAGS = ("WITH_ENTROPY_GRAD", "WITH_MEAN_GRAD")


@triton.jit
def _logits_tile(hidden_ptr, weight_ptr, rows, cols, row_in, col_in, D, inv_temperature,
                 BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """fp32 (BLOCK_T, BLOCK_V) tile of h W^T / tau; masked rows and columns read as zero."""
    acc = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        dim_in = dims < D
        h = tl.load(hidden_ptr + rows[:, None] * D + dims[None, :], mask=row_in[:, None] & dim_in[None, :], other=0.0)
        w = tl.load(weight_ptr + cols[:, None] * D + dims[None, :], mask=col_in[:, None] & dim_in[None, :], other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
    return acc * inv_temperature


@triton.jit
def _dlogits_tile(z, cols, col_in, target, lse, entropy, g_logp, g_entropy, g_mean, V,
                  WITH_ENTROPY_GRAD: tl.constexpr, WITH_MEAN_GRAD: tl.constexpr):
    """Gradient of the per-token outputs with respect to the (tempered) logits tile."""
    log_p = z - lse[:, None]
    p = tl.where(col_in[None, :], tl.exp(log_p), 0.0)
    dz = tl.where(cols[None, :] == target[:, None], g_logp[:, None], 0.0) - g_logp[:, None] * p
    if WITH_ENTROPY_GRAD:
        dz -= g_entropy[:, None] * p * (log_p + entropy[:, None])
    if WITH_MEAN_GRAD:
        dz += g_mean[:, None] * (tl.where(col_in[None, :], 1.0 / V, 0.0) - p)
    return dz


@triton.jit
def _load_row_grads(rows, row_in, targets_ptr, lse_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr, grad_mean_ptr,
                    inv_temperature, ignore_index, WITH_ENTROPY_GRAD: tl.constexpr, WITH_MEAN_GRAD: tl.constexpr):
    """Per-row inputs of the backward pass; output gradients are zero on ignored rows and carry 1/tau."""
    target = tl.load(targets_ptr + rows, mask=row_in, other=ignore_index)
    valid = row_in & (target != ignore_index)
    lse = tl.load(lse_ptr + rows, mask=row_in, other=0.0)
    g_logp = tl.load(grad_logp_ptr + rows, mask=valid, other=0.0) * inv_temperature
    entropy = tl.zeros_like(lse)
    g_entropy = tl.zeros_like(lse)
    g_mean = tl.zeros_like(lse)
    if WITH_ENTROPY_GRAD:
        entropy = tl.load(entropy_ptr + rows, mask=row_in, other=0.0)
        g_entropy = tl.load(grad_entropy_ptr + rows, mask=valid, other=0.0) * inv_temperature
    if WITH_MEAN_GRAD:
        g_mean = tl.load(grad_mean_ptr + rows, mask=valid, other=0.0) * inv_temperature
    return target, lse, entropy, g_logp, g_entropy, g_mean


@triton.jit
def _forward_kernel(hidden_ptr, weight_ptr, targets_ptr, logp_ptr, entropy_ptr, mean_logp_ptr, lse_ptr,
                    T, V, D, inv_temperature, ignore_index,
                    WITH_ENTROPY: tl.constexpr, WITH_MEAN: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_in = rows < T
    target = tl.load(targets_ptr + rows, mask=row_in, other=ignore_index)
    running_max = tl.full((BLOCK_T,), -3.0e38, dtype=tl.float32)  # finite: (m - m') * 0 stays 0
    sum_exp = tl.zeros((BLOCK_T,), dtype=tl.float32)
    shifted_sum = tl.zeros((BLOCK_T,), dtype=tl.float32)
    logit_sum = tl.zeros((BLOCK_T,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_in = cols < V
        z = _logits_tile(hidden_ptr, weight_ptr, rows, cols, row_in, col_in, D, inv_temperature,
                         BLOCK_T, BLOCK_V, BLOCK_D, PRECISION)
        new_max = tl.maximum(running_max, tl.max(tl.where(col_in[None, :], z, -3.0e38), axis=1))
        rescale = tl.exp(running_max - new_max)
        shifted = z - new_max[:, None]
        exps = tl.where(col_in[None, :], tl.exp(shifted), 0.0)
        if WITH_ENTROPY:
            shifted_sum = rescale * (shifted_sum + (running_max - new_max) * sum_exp) + tl.sum(exps * shifted, axis=1)
        sum_exp = rescale * sum_exp + tl.sum(exps, axis=1)
        running_max = new_max
        if WITH_MEAN:
            logit_sum += tl.sum(tl.where(col_in[None, :], z, 0.0), axis=1)
        target_logit += tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), axis=1)
    valid = target != ignore_index
    log_sum_exp = tl.log(sum_exp)
    lse = running_max + log_sum_exp
    tl.store(lse_ptr + rows, lse, mask=row_in)
    tl.store(logp_ptr + rows, tl.where(valid, target_logit - lse, 0.0), mask=row_in)
    if WITH_ENTROPY:
        tl.store(entropy_ptr + rows, tl.where(valid, log_sum_exp - shifted_sum / sum_exp, 0.0), mask=row_in)
    if WITH_MEAN:
        tl.store(mean_logp_ptr + rows, tl.where(valid, logit_sum / V - lse, 0.0), mask=row_in)


@triton.jit
def _backward_hidden_kernel(hidden_ptr, weight_ptr, targets_ptr, lse_ptr, entropy_ptr, grad_logp_ptr,
                            grad_entropy_ptr, grad_mean_ptr, grad_hidden_ptr,
                            T, V, D, inv_temperature, ignore_index,
                            WITH_ENTROPY_GRAD: tl.constexpr, WITH_MEAN_GRAD: tl.constexpr, BLOCK_T: tl.constexpr,
                            BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """One program per token block: d(hidden) rows += dz W over every vocabulary tile, in order."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_in = rows < T
    target, lse, entropy, g_logp, g_entropy, g_mean = _load_row_grads(
        rows, row_in, targets_ptr, lse_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr, grad_mean_ptr,
        inv_temperature, ignore_index, WITH_ENTROPY_GRAD, WITH_MEAN_GRAD)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_in = cols < V
        z = _logits_tile(hidden_ptr, weight_ptr, rows, cols, row_in, col_in, D, inv_temperature,
                         BLOCK_T, BLOCK_V, BLOCK_D, PRECISION)
        dz = _dlogits_tile(z, cols, col_in, target, lse, entropy, g_logp, g_entropy, g_mean, V,
                           WITH_ENTROPY_GRAD, WITH_MEAN_GRAD).to(weight_ptr.dtype.element_ty)
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            dim_in = dims < D
            w = tl.load(weight_ptr + cols[:, None] * D + dims[None, :], mask=col_in[:, None] & dim_in[None, :],
                        other=0.0)
            out = grad_hidden_ptr + rows[:, None] * D + dims[None, :]
            out_mask = row_in[:, None] & dim_in[None, :]
            acc = tl.load(out, mask=out_mask, other=0.0)
            tl.store(out, tl.dot(dz, w, acc, input_precision=PRECISION), mask=out_mask)


@triton.jit
def _backward_weight_kernel(hidden_ptr, weight_ptr, targets_ptr, lse_ptr, entropy_ptr, grad_logp_ptr,
                            grad_entropy_ptr, grad_mean_ptr, grad_weight_ptr,
                            T, V, D, inv_temperature, ignore_index,
                            WITH_ENTROPY_GRAD: tl.constexpr, WITH_MEAN_GRAD: tl.constexpr, BLOCK_T: tl.constexpr,
                            BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """One program per vocabulary tile: d(weight) rows += dz^T h over every token block, in order."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_in = cols < V
    for t0 in range(0, T, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        row_in = rows < T
        target, lse, entropy, g_logp, g_entropy, g_mean = _load_row_grads(
            rows, row_in, targets_ptr, lse_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr, grad_mean_ptr,
            inv_temperature, ignore_index, WITH_ENTROPY_GRAD, WITH_MEAN_GRAD)
        z = _logits_tile(hidden_ptr, weight_ptr, rows, cols, row_in, col_in, D, inv_temperature,
                         BLOCK_T, BLOCK_V, BLOCK_D, PRECISION)
        dz = _dlogits_tile(z, cols, col_in, target, lse, entropy, g_logp, g_entropy, g_mean, V,
                           WITH_ENTROPY_GRAD, WITH_MEAN_GRAD).to(hidden_ptr.dtype.element_ty)
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            dim_in = dims < D
            h = tl.load(hidden_ptr + rows[:, None] * D + dims[None, :], mask=row_in[:, None] & dim_in[None, :],
                        other=0.0)
            out = grad_weight_ptr + cols[:, None] * D + dims[None, :]
            out_mask = col_in[:, None] & dim_in[None, :]
            acc = tl.load(out, mask=out_mask, other=0.0)
            tl.store(out, tl.dot(tl.trans(dz), h, acc, input_precision=PRECISION), mask=out_mask)


def block_config(dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes and launch options for hidden size ``dim`` and input dtype (never a function of T).

    Chosen from the sm_90 compile report: with 8 warps these tiles use HGMMA and do not spill
    for bf16/fp16 (fp32 inputs take FMA, not tensor cores, and a narrower vocabulary tile).
    """
    wide = dtype == torch.float32
    return {
        "BLOCK_T": 64,
        "BLOCK_V": 64 if wide else 128,
        "BLOCK_D": min(32, max(16, triton.next_power_of_2(dim))),
        "PRECISION": "ieee" if wide else "tf32",  # fp32 inputs: no silent tf32 rounding
        "num_warps": 8,
        "forward_stages": 2 if wide else 3,
        "backward_stages": 2,
    }


def _launch_options(config: dict, backward: bool) -> tuple[dict, dict]:
    constexprs = {k: config[k] for k in ("BLOCK_T", "BLOCK_V", "BLOCK_D", "PRECISION")}
    stages = config["backward_stages" if backward else "forward_stages"]
    return constexprs, {"num_warps": config["num_warps"], "num_stages": stages}


class _TritonLinearStats(torch.autograd.Function):
    """Autograd wrapper of the Triton kernels: ``(logp, entropy | None, mean_logp | None)``."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, ignore_index, with_entropy, with_mean_logp):
        num_tokens, dim = hidden.shape
        vocab = weight.shape[0]
        constexprs, launch = _launch_options(block_config(dim, hidden.dtype), backward=False)
        # NaN-filled, so a row the kernel failed to write cannot pass for a result
        logp, entropy, mean_logp, lse = (
            torch.full((num_tokens,), float("nan"), dtype=torch.float32, device=hidden.device) for _ in range(4)
        )
        grid = (triton.cdiv(num_tokens, constexprs["BLOCK_T"]),)
        _forward_kernel[grid](
            hidden, weight, targets, logp, entropy, mean_logp, lse,
            num_tokens, vocab, dim, 1.0 / temperature, ignore_index,
            WITH_ENTROPY=with_entropy, WITH_MEAN=with_mean_logp, **constexprs, **launch,
        )
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.temperature, ctx.ignore_index = temperature, ignore_index
        return logp, entropy if with_entropy else None, mean_logp if with_mean_logp else None

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, grad_mean_logp):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        num_tokens, dim = hidden.shape
        vocab = weight.shape[0]
        constexprs, launch = _launch_options(block_config(dim, hidden.dtype), backward=True)
        zeros = torch.zeros_like(lse)
        grads = [zeros if g is None else g.float().contiguous() for g in (grad_logp, grad_entropy, grad_mean_logp)]
        common = (hidden, weight, targets, lse, entropy, *grads)
        scalars = (num_tokens, vocab, dim, 1.0 / ctx.temperature, ctx.ignore_index)
        flags = {"WITH_ENTROPY_GRAD": grad_entropy is not None, "WITH_MEAN_GRAD": grad_mean_logp is not None}
        grad_hidden = grad_weight = None  # each kernel runs only when its gradient is needed
        if ctx.needs_input_grad[0]:
            grad_hidden = torch.zeros((num_tokens, dim), dtype=torch.float32, device=hidden.device)
            _backward_hidden_kernel[(triton.cdiv(num_tokens, constexprs["BLOCK_T"]),)](
                *common, grad_hidden, *scalars, **flags, **constexprs, **launch
            )
            grad_hidden = grad_hidden.to(hidden.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.zeros((vocab, dim), dtype=torch.float32, device=weight.device)
            _backward_weight_kernel[(triton.cdiv(vocab, constexprs["BLOCK_V"]),)](
                *common, grad_weight, *scalars, **flags, **constexprs, **launch
            )
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def check_logprob_inputs(hidden, weight, targets, temperature, ignore_index):
    """Validate the shared inputs of the fused LM-head ops (ValueError naming the argument)."""
    check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("targets", targets, ndim=1, dtypes=(torch.int32, torch.int64))
    check_same_device(hidden=hidden, weight=weight, targets=targets)
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight.shape[1] must equal hidden.shape[1] ({hidden.shape[1]}), got {tuple(weight.shape)}")
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"targets must have one entry per token ({hidden.shape[0]}), got {tuple(targets.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one vocabulary row, got shape (0, d)")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    in_use = targets != ignore_index
    if bool(((targets < 0) | (targets >= weight.shape[0]))[in_use].any()):
        bad = targets[in_use & ((targets < 0) | (targets >= weight.shape[0]))][:4].tolist()
        raise ValueError(f"targets must lie in [0, {weight.shape[0]}) or equal ignore_index={ignore_index}, got {bad}")


def fused_linear_stats(hidden, weight, targets, temperature=1.0, ignore_index=-100,
                       with_entropy=False, with_mean_logp=False):
    """``(logp, entropy | None, mean_logp | None)`` per token, fp32, from either backend.

    All outputs are 0 (and pass no gradient) at rows whose target is ``ignore_index``.
    """
    check_logprob_inputs(hidden, weight, targets, temperature, ignore_index)
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.to(torch.int64).contiguous()
    args = (hidden, weight, targets, float(temperature), int(ignore_index), bool(with_entropy), bool(with_mean_logp))
    # QWENLONG_BACKEND=cuda picks the CUDA-extension epilogue (cuBLAS tiles) where it was built
    backend = select_backend(hidden.device, has_cuda_op=cuda_backend.available())
    if backend == "triton":
        return _TritonLinearStats.apply(*args)
    return ChunkedLinearStats.apply(*args, backend == "cuda")


def linear_logprobs(hidden, weight, targets, temperature=1.0, return_entropy=False, ignore_index=-100):
    """fp32 ``log softmax(hidden @ weight.T / temperature)[target]`` per token, without the logits.

    hidden ``(T, d)``, weight ``(V, d)`` of the same float dtype, targets ``(T,)`` int. Returns
    ``logp (T,)`` or, with ``return_entropy``, ``(logp, entropy)``; both are 0 at rows whose
    target is ``ignore_index`` and differentiable with respect to hidden and weight.
    """
    logp, entropy, _ = fused_linear_stats(hidden, weight, targets, temperature, ignore_index, return_entropy)
    return (logp, entropy) if return_entropy else logp


def compile_specs() -> list[CompileSpec]:
    """Every build the launcher may pick: each kernel x input dtype x flag pair (the tiles are the same for all d).

    fp32 inputs are marked not hot: training runs bf16, and fp32 has no tensor-core path here.
    """
    scalars = {"T": "i32", "V": "i32", "D": "i32", "inv_temperature": "fp32", "ignore_index": "i32"}
    kernels = (
        ("fwd", _forward_kernel, ("logp_ptr", "entropy_ptr", "mean_logp_ptr", "lse_ptr"), ("WITH_ENTROPY", "WITH_MEAN")),
        ("bwd_hidden", _backward_hidden_kernel, _BACKWARD_FP32_ARGS + ("grad_hidden_ptr",), _BACKWARD_FLAGS),
        ("bwd_weight", _backward_weight_kernel, _BACKWARD_FP32_ARGS + ("grad_weight_ptr",), _BACKWARD_FLAGS),
    )
    specs = []
    for dtype, type_name in _TRITON_DTYPES.items():
        for kind, kernel, fp32_args, flags in kernels:
            constexprs, launch = _launch_options(block_config(4096, dtype), backward=kind != "fwd")
            signature = {"hidden_ptr": f"*{type_name}", "weight_ptr": f"*{type_name}", "targets_ptr": "*i64"}
            signature |= dict.fromkeys(fp32_args, "*fp32") | scalars | dict.fromkeys((*flags, *constexprs), "constexpr")
            for values in ((False, False), (True, False), (False, True), (True, True)):
                suffix = "_".join(f"{flag.split('_')[1].lower()}{int(v)}" for flag, v in zip(flags, values, strict=True))
                specs.append(CompileSpec(
                    name=f"logprobs_{kind}_{type_name}_{suffix}", fn=kernel, signature=signature,
                    constexprs=dict(zip(flags, values, strict=True)) | constexprs, hot=dtype != torch.float32, **launch,
                ))
    return specs
