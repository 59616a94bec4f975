"""Packed variable-length attention: forward and forward+backward speed and peak memory against
the baselines.

GPU (default): total lengths 8K, 32K and 128K tokens, either packed documents of mixed
lengths or one long document; 40 query heads, 8 kv heads, head_dim 128, bf16, causal. In
one run: our Triton kernels (``varlen_attention``), PyTorch SDPA with the flash backend
and with the cuDNN backend (SDPA has no packed form: one call per document, the way a
padding-free trainer without varlen kernels would run it), FlexAttention with a document
mask (mask build time reported apart), ``flash_attn_varlen_func`` when flash-attn imports,
and a naive materialized attention where its ``T x T`` scores fit. Times are medians over
fresh inputs (``benchmarks.common.time_ms``); TFLOP/s count the causal half only (forward 2
matmuls, backward 2.5x the forward). A baseline that cannot run is reported "not available"
(import or backend missing) or "OOM".

CPU (no GPU): our blockwise PyTorch path against naive materialized attention and SDPA
(whatever CPU kernel it picks, one call per document), fp32, 4/2 heads, head_dim 64, at
total lengths 1K..8K: median fwd+bwd time and the peak extra memory of one fwd+bwd
(``benchmarks.common.PeakMemory``). CPU times are noisy on a shared machine; the memory
column is the point of this mode. ``--quick``: packed only, at 512 tokens and one timed run on
CPU, at 8K tokens and five timed runs on a GPU.

Results: JSON + markdown + a plot (tokens/s and peak memory vs total length) under ``--out``.
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
    document_lengths,
    environment,
    memory_method,
    time_ms,
    write_results,
)

HEADS, KV_HEADS, HEAD_DIM = 40, 8, 128
TOTALS = (8 * 1024, 32 * 1024, 128 * 1024)
NAIVE_MAX_TOKENS = 8 * 1024  # bf16 scores of 40 heads at 8K tokens: 5 GiB per T x T temporary


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


def ours():
    from qwenlong.kernels import varlen_attention

    return lambda q, k, v, cu, m: varlen_attention(q, k, v, cu, cu, m, m, causal=True)


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


def naive():
    from qwenlong.kernels.attention import attention_reference

    return lambda q, k, v, cu, m: attention_reference(q, k, v, cu, cu, causal=True, dtype=q.dtype)[0]


# ----------------------------------------------------------------------------- measurement
def measure(run, lengths: list[int], heads: int, kv_heads: int, head_dim: int, dtype, device: str, repeats: int,
            forward: bool) -> dict:
    """Peak extra memory of one fwd+bwd, then median fwd+bwd (and forward-only when asked) times on fresh inputs."""
    flops = causal_flops(lengths, heads, head_dim)
    total = sum(lengths)

    def fresh():
        q, k, v, cu, m = make_inputs(lengths, heads, kv_heads, head_dim, dtype, device)
        return q, k, v, cu, m, torch.randn_like(q)

    def fwd_bwd(q, k, v, cu, m, do):
        torch.autograd.grad(run(q, k, v, cu, m), (q, k, v), do)

    @torch.no_grad()
    def fwd(q, k, v, cu, m, do):
        run(q, k, v, cu, m)

    row = {}
    fwd_bwd(*fresh())  # warm-up: compilation and lazy initialisation are not the op's memory
    inputs = fresh()
    with PeakMemory(device) as peak:
        fwd_bwd(*inputs)
    del inputs
    row["peak MiB"] = peak.mib
    if forward:
        ms = time_ms(fwd, setup=fresh, device=device, repeats=repeats)
        row |= {"fwd ms": round(ms, 3), "fwd TFLOP/s": round(flops / (ms * 1e-3) / 1e12, 1)}
    ms = time_ms(fwd_bwd, setup=fresh, device=device, warmup=0, repeats=repeats)
    row |= {"fwd+bwd ms": round(ms, 3), "fwd+bwd tokens/s": round(total / (ms * 1e-3))}
    if device == "cuda":
        row["fwd+bwd TFLOP/s"] = round(3.5 * flops / (ms * 1e-3) / 1e12, 1)
    return row


def bench(variants: dict, totals, layouts, heads: int, kv_heads: int, head_dim: int, dtype, device: str,
          repeats: int) -> list[dict]:
    rows = []
    for total in totals:
        for layout in layouts:
            lengths = document_lengths(total, layout)
            for name, variant in variants.items():
                row = {"variant": name, "layout": layout, "total tokens": total, "documents": len(lengths)}
                rows.append(row)
                if variant is None or (name.startswith("naive") and total > NAIVE_MAX_TOKENS):
                    row["status"] = NOT_AVAILABLE
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
                except RuntimeError as exc:  # e.g. an SDPA backend that does not support this GPU or shape
                    row["status"] = f"{NOT_AVAILABLE}: {str(exc).splitlines()[0][:100]}"
                if device == "cuda":
                    torch.cuda.empty_cache()
                print(row, flush=True)
    return rows


CPU_HEADS, CPU_KV_HEADS, CPU_HEAD_DIM = 4, 2, 64


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke: packed only, GPU 8K x 5 runs, CPU 512 x 1")
    parser.add_argument("--totals", type=int, nargs="+", help="total tokens (GPU: 8K 32K 128K, CPU: 1K..8K)")
    parser.add_argument("--layouts", nargs="+", default=["packed", "single"], choices=["packed", "single"])
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (GPU 20, CPU 3)")
    parser.add_argument("--out", default=str(RESULTS_DIR), help="results directory")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    if gpu:
        variants = {"qwenlong (Triton)": ours(), "SDPA flash (per doc)": sdpa_per_document("FLASH_ATTENTION"),
                    "SDPA cuDNN (per doc)": sdpa_per_document("CUDNN_ATTENTION"),
                    "FlexAttention (doc mask)": flex_document_mask(), "flash-attn varlen": flash_attn(),
                    "naive (materialized)": naive()}
        shape, dtype, device = (HEADS, KV_HEADS, HEAD_DIM), torch.bfloat16, "cuda"
        totals, repeats = args.totals or list(TOTALS), args.repeats or 20
        if args.quick:
            totals, repeats, args.layouts = args.totals or [8192], 5, ["packed"]
    else:
        os.environ["QWENLONG_BACKEND"] = "torch"  # the blockwise CPU path, not the Triton interpreter
        variants = {"qwenlong blockwise (torch)": ours(), "SDPA CPU default (per doc)": sdpa_per_document(None),
                    "naive (materialized)": naive()}
        shape, dtype, device = (CPU_HEADS, CPU_KV_HEADS, CPU_HEAD_DIM), torch.float32, "cpu"
        totals, repeats = args.totals or [1024, 2048, 4096, 8192], args.repeats or 3
        if args.quick:
            totals, repeats, args.layouts = args.totals or [512], 1, ["packed"]
    torch.manual_seed(0)
    rows = bench(variants, totals, args.layouts, *shape, dtype, device, repeats)
    setup = {"dtype": str(dtype).removeprefix("torch."), "causal": True, "heads": f"{shape[0]}/{shape[1]}",
             "head_dim": shape[2], "layouts": "packed: documents of mixed lengths (64 tokens to a quarter of the "
             "total); single: one document", "timing": f"median of {repeats} runs on fresh inputs after warm-up runs",
             "peak memory": memory_method(device) + " (one fwd+bwd)"}
    notes = ["TFLOP/s count the causal half: forward 4 H d sum n_i(n_i+1)/2, fwd+bwd 3.5x that"] if gpu else []
    write_results("attention", "Packed varlen attention", rows, setup=setup, out_dir=args.out, env=environment(),
                  notes=notes, plot={"x": "total tokens", "series": ["variant", "layout"],
                                     "metrics": ["fwd+bwd tokens/s", "peak MiB"]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
