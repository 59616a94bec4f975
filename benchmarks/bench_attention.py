"""Packed variable-length attention: forward and backward speed and peak memory against the baselines.

GPU (default; one command, under 8 minutes on one H100/H200): bf16, causal, 40 query heads, 8 kv
heads, head_dim 128, at 8K, 32K and 128K total tokens as one document ("single") or documents of at
most 8K tokens ("docs<=8K"), and the two RL-shaped batches ("rl-64k": one 64K document + 110 of 512
tokens; "rl-32k": one 32K + 880 of 100). Variants: our Triton kernels (``varlen_attention``, with
its deterministic default and with ``deterministic=False``, the atomic-dq backward comparable to
FlashAttention's default one), FlashAttention 3 (``flash_attn_interface``) and 2 (``flash_attn``)
varlen where installed, PyTorch SDPA with the flash and the cuDNN backends (SDPA has no packed form:
one call per document, the way a padding-free trainer without varlen kernels would run it),
FlexAttention with a document-causal block mask (mask build time reported apart; the first call per
shape compiles), and a naive materialized attention up to 8K tokens. Forward and forward+backward
are timed on fresh inputs (median; the number of timed runs adapts to the run time, 3 to
``--repeats``), backward = their difference. TFLOP/s count useful causal FLOPs only: forward ``4 d H
sum n(n+1)/2``, backward 2.5x that. ``--budget`` (seconds, default 420) stops measuring new rows
when spent (they say so): shapes run most informative first (docs<=8K at 32K, the RL batches, then
the rest).

CPU (no GPU): our blockwise PyTorch path against naive materialized attention and SDPA
(whatever CPU kernel it picks, one call per document), fp32, 4/2 heads, head_dim 64, at
total lengths 1K..8K: median fwd+bwd time and the peak extra memory of one fwd+bwd
(``benchmarks.common.PeakMemory``). CPU times are noisy on a shared machine; the memory
column is the point of this mode. ``--quick``: docs<=8K only, at 512 tokens and one timed run on
CPU, at 8K tokens on a GPU.

Results: JSON + markdown + a plot (TFLOP/s, or tokens/s on CPU, and peak memory vs total length)
under ``--out``.

    python -m benchmarks.bench_attention            # the GPU run (or the CPU mode without a GPU)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.common import (
    NOT_AVAILABLE,
    OOM,
    RESULTS_DIR,
    PeakMemory,
    environment,
    memory_method,
    time_ms,
    write_results,
)

HEADS, KV_HEADS, HEAD_DIM = 40, 8, 128
TOTALS = (8 * 1024, 32 * 1024, 128 * 1024)
NAIVE_MAX_TOKENS = 8 * 1024  # bf16 scores of 40 heads at 8K tokens: 5 GiB per T x T temporary
LONGEST_DOC = 8 * 1024  # "docs<=8K": a pretraining batch of documents up to 8K tokens
RL_BATCHES = {"rl-64k": [64 * 1024] + [512] * 110, "rl-32k": [32 * 1024] + [100] * 880}
LAYOUTS = ("docs<=8K", "single", *RL_BATCHES)
TARGET_SECONDS = 1.0  # timed runs per measurement: about this long in all, at least 3


def batch_lengths(total: int, layout: str, seed: int = 0) -> list[int]:
    """Document lengths of a layout: one document, documents of 64 tokens to min(8K, total / 4), or an RL
    batch (whose total is its own)."""
    if layout in RL_BATCHES:
        return list(RL_BATCHES[layout])
    if layout == "single":
        return [total]
    gen = torch.Generator().manual_seed(seed)
    lengths, left = [], total
    longest = max(65, min(LONGEST_DOC, total // 4))
    while left > 0:
        n = min(left, int(torch.randint(64, longest + 1, (1,), generator=gen)))
        lengths.append(n)
        left -= n
    return lengths


def causal_flops(lengths: list[int], heads: int, head_dim: int) -> float:
    """Forward FLOPs of causal attention: QK^T and PV over the lower triangle of each document."""
    return sum(4.0 * heads * head_dim * n * (n + 1) / 2 for n in lengths)


def make_inputs(lengths, heads, kv_heads, head_dim, dtype, device, requires_grad=True):
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q = torch.randn(total, heads, head_dim, dtype=dtype, device=device, requires_grad=requires_grad)
    k = torch.randn(total, kv_heads, head_dim, dtype=dtype, device=device, requires_grad=requires_grad)
    v = torch.randn(total, kv_heads, head_dim, dtype=dtype, device=device, requires_grad=requires_grad)
    return q, k, v, cu, max(lengths)


# ----------------------------------------------------------------------------- variants
# each returns run(q, k, v, cu, max_len) -> out (total, heads, head_dim), or None when unavailable


def ours(deterministic: bool = True):
    """Our varlen attention; ``deterministic=False`` runs the 5-GEMM backward that adds dq with fp32 atomics,
    the comparable path to FlashAttention's backward (non-deterministic by default)."""
    from qwenlong.kernels import varlen_attention

    return lambda q, k, v, cu, m: varlen_attention(q, k, v, cu, cu, m, m, causal=True, deterministic=deterministic)


def sdpa_per_document(backend):
    """SDPA on each document in turn ``(1, heads, n, d)``; ``backend`` an SDPBackend name or None."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = getattr(SDPBackend, backend) if backend else None

    def run(q, k, v, cu, m):
        outs = []
        bounds = cu.tolist()
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            qs, ks, vs = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))
            if chosen is None:
                outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True))
            else:
                with sdpa_kernel(chosen):
                    outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True))
        return torch.cat([o[0].transpose(0, 1) for o in outs])

    return run


def flex_document_mask():
    """FlexAttention over the packed sequence with a document-causal ``mask_mod``; returns (run, mask builder)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    compiled = torch.compile(flex_attention)

    def build_mask(cu, total):
        doc = torch.zeros(total, dtype=torch.int32, device=cu.device)
        doc[cu[1:-1].long()] = 1
        doc = doc.cumsum(0)

        def document_causal(b, h, q_idx, kv_idx):
            return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

        return create_block_mask(document_causal, None, None, total, total, device=cu.device)

    def run(q, k, v, cu, m, block_mask):
        qs, ks, vs = (t.transpose(0, 1)[None] for t in (q, k, v))
        return compiled(qs, ks, vs, block_mask=block_mask, enable_gqa=True)[0].transpose(0, 1)

    return run, build_mask


def flash_attn():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return lambda q, k, v, cu, m: flash_attn_varlen_func(q, k, v, cu, cu, m, m, causal=True)


def flash_attn_3():
    """FlashAttention 3 (Hopper) varlen; some releases return ``(out, lse)``."""
    try:
        from flash_attn_interface import flash_attn_varlen_func
    except ImportError:
        return None

    def run(q, k, v, cu, m):
        out = flash_attn_varlen_func(q, k, v, cu, cu, m, m, causal=True)
        return out[0] if isinstance(out, tuple) else out

    return run


def naive():
    from qwenlong.kernels.attention import attention_reference

    return lambda q, k, v, cu, m: attention_reference(q, k, v, cu, cu, causal=True, dtype=q.dtype)[0]


def gpu_variants() -> dict:
    """What the GPU run measures, in this order (once --budget is spent, no further row starts)."""
    return {"qwenlong (Triton)": ours(), "qwenlong (Triton, deterministic=False)": ours(deterministic=False),
            "FlashAttention 3 varlen": flash_attn_3(), "FlashAttention 2 varlen": flash_attn(),
            "SDPA cuDNN (per doc)": sdpa_per_document("CUDNN_ATTENTION"),
            "SDPA flash (per doc)": sdpa_per_document("FLASH_ATTENTION"),
            "FlexAttention (doc mask)": flex_document_mask(), "naive (materialized)": naive()}


# ----------------------------------------------------------------------------- measurement
def _repeats(seconds_per_run: float, most: int) -> int:
    """Timed runs for about TARGET_SECONDS in all: at least 3, at most ``most``."""
    return max(min(3, most), min(most, int(TARGET_SECONDS / max(seconds_per_run, 1e-6))))


def measure(run, lengths: list[int], heads: int, kv_heads: int, head_dim: int, dtype, device: str, repeats: int,
            forward: bool) -> dict:
    """Peak extra memory of one fwd+bwd, then median fwd+bwd (and forward-only when asked, backward as the
    difference) times on fresh inputs."""
    flops = causal_flops(lengths, heads, head_dim)
    total = sum(lengths)

    cu = make_inputs(lengths, 1, 1, 8, dtype, device, requires_grad=False)[3]

    def fresh():  # fresh q, k, v; one cu_seqlens for every run, as a model's layers share one
        q, k, v, _, m = make_inputs(lengths, heads, kv_heads, head_dim, dtype, device)
        return q, k, v, cu, m, torch.randn_like(q)

    def fwd_bwd(q, k, v, cu, m, do):
        torch.autograd.grad(run(q, k, v, cu, m), (q, k, v), do)

    @torch.no_grad()
    def fwd(q, k, v, cu, m, do):
        run(q, k, v, cu, m)

    row = {}
    begin = time.perf_counter()
    fwd_bwd(*fresh())  # warm-up: compilation and lazy initialisation are not the op's memory
    inputs = fresh()
    if device == "cuda":
        torch.cuda.synchronize()
    one_run = time.perf_counter() - begin  # an upper bound on one fwd+bwd, compile included
    with PeakMemory(device) as peak:
        fwd_bwd(*inputs)
    del inputs
    row["peak MiB"] = peak.mib
    if device == "cuda":  # a second, compiled run sizes the number of timed runs
        one_run = time_ms(fwd_bwd, setup=fresh, device=device, warmup=0, repeats=1) * 1e-3
    ms = time_ms(fwd_bwd, setup=fresh, device=device, warmup=0, repeats=_repeats(one_run, repeats))
    row |= {"fwd+bwd ms": round(ms, 3), "fwd+bwd tokens/s": round(total / (ms * 1e-3))}
    if forward:
        fwd_ms = time_ms(fwd, setup=fresh, device=device, repeats=_repeats(one_run / 3.5, repeats))
        bwd_ms = max(ms - fwd_ms, 1e-6)
        row |= {"fwd ms": round(fwd_ms, 3), "bwd ms": round(bwd_ms, 3),
                "fwd TFLOP/s": round(flops / (fwd_ms * 1e-3) / 1e12, 1),
                "bwd TFLOP/s": round(2.5 * flops / (bwd_ms * 1e-3) / 1e12, 1)}
    if device == "cuda":
        row["fwd+bwd TFLOP/s"] = round(3.5 * flops / (ms * 1e-3) / 1e12, 1)
    return row


def shapes(totals, layouts) -> list[tuple[str, list[int]]]:
    """(layout, lengths) to measure, most informative first: docs<=8K at 32K, the RL batches, the rest."""
    out = [(layout, batch_lengths(total, layout)) for layout in layouts if layout in RL_BATCHES
           for total in totals[:1]]  # fmt: skip
    out += [(layout, batch_lengths(total, layout)) for total in totals for layout in layouts
            if layout not in RL_BATCHES]  # fmt: skip
    return sorted(out, key=lambda shape: shape[0] != "docs<=8K" or sum(shape[1]) != 32 * 1024)  # stable


def failure_reason(exc: BaseException) -> str:
    """``Type: first line of the message`` (100 characters at most), or the type alone when there is no message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:100]}" if lines else type(exc).__name__


def bench(variants: dict, totals, layouts, heads: int, kv_heads: int, head_dim: int, dtype, device: str,
          repeats: int, budget: float = float("inf")) -> list[dict]:
    rows = []
    deadline = time.perf_counter() + budget
    for layout, lengths in shapes(totals, layouts):
        total = sum(lengths)
        for name, variant in variants.items():
            row = {"variant": name, "layout": layout, "total tokens": total, "documents": len(lengths)}
            rows.append(row)
            if variant is None or (name.startswith("naive") and total > NAIVE_MAX_TOKENS):
                row["status"] = NOT_AVAILABLE
                continue
            if time.perf_counter() > deadline:
                row["status"] = f"{NOT_AVAILABLE}: the --budget of {budget:.0f} s was spent"
                continue
            run = variant
            try:
                if isinstance(variant, tuple):  # FlexAttention: build the block mask first, timed apart
                    flex, build_mask = variant
                    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device)
                    start = time.perf_counter()
                    block_mask = build_mask(cu, total)
                    torch.cuda.synchronize()
                    row["mask build ms"] = round((time.perf_counter() - start) * 1e3, 2)
                    run = lambda q, k, v, cu, m, flex=flex, block_mask=block_mask: flex(q, k, v, cu, m, block_mask)
                row |= measure(run, lengths, heads, kv_heads, head_dim, dtype, device, repeats,
                               forward=device == "cuda")
                row["status"] = "ok"
            except torch.OutOfMemoryError:
                row["status"] = OOM
            except Exception as exc:  # noqa: BLE001  the row's status, never the end of the benchmark: an SDPA
                # backend that does not support this GPU or shape, a peer whose API moved (TypeError), a Triton
                # kernel that does not fit (OutOfResources, no RuntimeError), an assert with no message
                row["status"] = f"{NOT_AVAILABLE}: {failure_reason(exc)}"
            if device == "cuda":
                torch.cuda.empty_cache()
            print(row, flush=True)
    return rows


CPU_HEADS, CPU_KV_HEADS, CPU_HEAD_DIM = 4, 2, 64


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke: docs<=8K only, GPU 8K, CPU 512 x 1 run")
    parser.add_argument("--totals", type=int, nargs="+", help="total tokens (GPU: 8K 32K 128K, CPU: 1K..8K)")
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, help=f"GPU: all of {LAYOUTS}; CPU: docs<=8K single")
    parser.add_argument("--repeats", type=int, default=None, help="most timed runs (GPU 20, CPU 3)")
    parser.add_argument("--budget", type=float, default=420.0, help="GPU: seconds after which no new row starts")
    parser.add_argument("--out", default=str(RESULTS_DIR), help="results directory")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    if gpu:
        variants = gpu_variants()
        shape, dtype, device = (HEADS, KV_HEADS, HEAD_DIM), torch.bfloat16, "cuda"
        totals, repeats, layouts = args.totals or list(TOTALS), args.repeats or 20, args.layouts or list(LAYOUTS)
        if args.quick:
            totals, repeats, layouts = args.totals or [8192], 5, ["docs<=8K"]
    else:
        os.environ["QWENLONG_BACKEND"] = "torch"  # the blockwise CPU path, not the Triton interpreter
        variants = {"qwenlong blockwise (torch)": ours(), "SDPA CPU default (per doc)": sdpa_per_document(None),
                    "naive (materialized)": naive()}
        shape, dtype, device = (CPU_HEADS, CPU_KV_HEADS, CPU_HEAD_DIM), torch.float32, "cpu"
        totals, repeats = args.totals or [1024, 2048, 4096, 8192], args.repeats or 3
        layouts = args.layouts or ["docs<=8K", "single"]
        if args.quick:
            totals, repeats, layouts = args.totals or [512], 1, ["docs<=8K"]
    torch.manual_seed(0)
    rows = bench(variants, totals, layouts, *shape, dtype, device, repeats, budget=args.budget if gpu else float("inf"))
    setup = {"dtype": str(dtype).removeprefix("torch."), "causal": True, "heads": f"{shape[0]}/{shape[1]}",
             "head_dim": shape[2], "layouts": "docs<=8K: documents of 64 tokens to min(8K, total/4); single: one "
             "document; rl-64k: 64K + 110 x 512; rl-32k: 32K + 880 x 100",
             "timing": f"median of {min(3, repeats)} to {repeats} runs (about {TARGET_SECONDS:.0f} s in all) on fresh "
             "inputs after warm-up",
             "peak memory": memory_method(device) + " (one fwd+bwd)"}
    notes = ["TFLOP/s count useful causal FLOPs: forward 4 H d sum n_i(n_i+1)/2, backward 2.5x that, fwd+bwd 3.5x; "
             "backward time = fwd+bwd - fwd",
             "cu_seqlens: one tensor per shape shared by every run, as by a model's layers (our tile table is "
             "built from it once, in the warm-up)",
             "FlashAttention's varlen backward adds dq with atomics (deterministic=False is its default): compare its "
             "backward with our deterministic=False row; our default (deterministic=True) runs 7 GEMMs instead of 5 "
             "and is bitwise reproducible"] if gpu else []
    metrics = ["fwd TFLOP/s", "bwd TFLOP/s", "peak MiB"] if gpu else ["fwd+bwd tokens/s", "peak MiB"]
    write_results("attention", "Packed varlen attention", rows, setup=setup, out_dir=args.out, env=environment(),
                  notes=notes, plot={"x": "total tokens", "series": ["variant", "layout"], "metrics": metrics})
    return 0


if __name__ == "__main__":
    sys.exit(main())
