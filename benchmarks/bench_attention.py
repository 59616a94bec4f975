"""Packed variable-length attention: forward and forward+backward speed against the baselines.

GPU (default): total lengths 8K, 32K and 128K tokens, either packed documents of mixed
lengths or one long document; 40 query heads, 8 kv heads, head_dim 128, bf16, causal. In
one run: our Triton kernels (``varlen_attention``), PyTorch SDPA with the flash backend
and with the cuDNN backend (SDPA has no packed form: one call per document, the way a
padding-free trainer without varlen kernels would run it), FlexAttention with a document
mask (mask build time reported apart), ``flash_attn_varlen_func`` when flash-attn imports,
and a naive materialized attention where its ``T x T`` scores fit. Times are medians of
``triton.testing.do_bench``; TFLOP/s count the causal half only (forward 2 matmuls, backward
2.5x the forward). A baseline that cannot run is reported "not available" (import or
backend missing) or "OOM".

CPU (``--quick``): our blockwise PyTorch path against naive materialized attention and
SDPA (whatever CPU kernel it picks, one call per document) on small batches, fp32. Each
variant runs in a fresh subprocess, which reports its median fwd+bwd time and its peak
resident set (``VmHWM``) minus its resident set before the op. CPU times are noisy on a
shared machine; the memory column is the point of this mode.

Results: a markdown table on stdout and JSON + markdown under ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"
HEADS, KV_HEADS, HEAD_DIM = 40, 8, 128
TOTALS = (8 * 1024, 32 * 1024, 128 * 1024)
NAIVE_MAX_TOKENS = 8 * 1024  # bf16 scores of 40 heads at 8K tokens: 5 GiB per T x T temporary


def document_lengths(total: int, layout: str, seed: int = 0) -> list[int]:
    """``packed``: mixed lengths (64 tokens to 1/4 of the total) filling ``total``; ``single``: one document."""
    if layout == "single":
        return [total]
    gen = torch.Generator().manual_seed(seed)
    lengths, left = [], total
    while left > 0:
        n = min(left, int(torch.randint(64, max(65, total // 4), (1,), generator=gen)))
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


# ----------------------------------------------------------------------------- GPU
def _tflops(flops: float, ms) -> float | str:
    return round(flops / (ms * 1e-3) / 1e12, 1) if isinstance(ms, float) else ms


def _time_gpu(run, q, k, v, cu, m, extra=()):
    from triton.testing import do_bench

    do = torch.randn_like(q)

    def fwd():
        return run(q, k, v, cu, m, *extra)

    def fwd_bwd():
        torch.autograd.grad(fwd(), (q, k, v), do)

    with torch.no_grad():
        fwd_ms = do_bench(fwd, warmup=25, rep=100)
    return fwd_ms, do_bench(fwd_bwd, warmup=25, rep=100)


def bench_gpu(totals, layouts) -> list[dict]:
    variants = {
        "qwenlong (Triton)": ours(),
        "SDPA flash (per doc)": sdpa_per_document("FLASH_ATTENTION"),
        "SDPA cuDNN (per doc)": sdpa_per_document("CUDNN_ATTENTION"),
        "FlexAttention (doc mask)": flex_document_mask(),
        "flash-attn varlen": flash_attn(),
        "naive (materialized)": naive(),
    }
    rows = []
    for total in totals:
        for layout in layouts:
            lengths = document_lengths(total, layout)
            q, k, v, cu, m = make_inputs(lengths, HEADS, KV_HEADS, HEAD_DIM, torch.bfloat16, "cuda")
            flops = causal_flops(lengths, HEADS, HEAD_DIM)
            for name, variant in variants.items():
                row = {"variant": name, "total tokens": total, "layout": layout, "documents": len(lengths)}
                rows.append(row)
                if variant is None or (name.startswith("naive") and total > NAIVE_MAX_TOKENS):
                    row["fwd ms"] = row["fwd+bwd ms"] = "not available"
                    continue
                run, extra = variant, ()
                try:
                    if isinstance(variant, tuple):  # FlexAttention: build the block mask first, timed apart
                        run, build_mask = variant
                        torch.cuda.synchronize()
                        start = time.perf_counter()
                        extra = (build_mask(cu, total),)
                        torch.cuda.synchronize()
                        row["mask build ms"] = round((time.perf_counter() - start) * 1e3, 2)
                    fwd_ms, fwd_bwd_ms = _time_gpu(run, q, k, v, cu, m, extra)
                    row["fwd ms"], row["fwd+bwd ms"] = round(fwd_ms, 3), round(fwd_bwd_ms, 3)
                except torch.cuda.OutOfMemoryError:
                    row["fwd ms"] = row["fwd+bwd ms"] = "OOM"
                except RuntimeError as exc:  # e.g. an SDPA backend that does not support this GPU or shape
                    row["fwd ms"] = row["fwd+bwd ms"] = "not available"
                    row["note"] = str(exc).splitlines()[0][:120]
                torch.cuda.empty_cache()
                row["fwd TFLOP/s"] = _tflops(flops, row["fwd ms"])
                row["fwd+bwd TFLOP/s"] = _tflops(3.5 * flops, row["fwd+bwd ms"])
                if isinstance(row["fwd+bwd ms"], float):
                    row["fwd+bwd tokens/s"] = round(total / (row["fwd+bwd ms"] * 1e-3))
            del q, k, v
    return rows


# ----------------------------------------------------------------------------- CPU (--quick)
QUICK_HEADS, QUICK_KV_HEADS, QUICK_HEAD_DIM = 4, 2, 64
QUICK_CASES = {"packed 2K": [512, 1024, 256, 256], "single 4K": [4096]}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _cpu_child(variant: str, case: str, repeats: int = 3) -> None:
    """In a fresh process: median fwd+bwd time and peak extra resident memory of one variant."""
    os.environ["QWENLONG_BACKEND"] = "torch"
    torch.manual_seed(0)
    lengths = QUICK_CASES[case]
    q, k, v, cu, m = make_inputs(lengths, QUICK_HEADS, QUICK_KV_HEADS, QUICK_HEAD_DIM, torch.float32, "cpu")
    do = torch.randn_like(q)
    run = {"qwenlong blockwise (torch)": ours, "SDPA CPU default (per doc)": lambda: sdpa_per_document(None),
           "naive (materialized)": naive}[variant]()  # fmt: skip
    before = _rss_kib("VmRSS")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.autograd.grad(run(q, k, v, cu, m), (q, k, v), do)
        times.append(time.perf_counter() - start)
    peak = _rss_kib("VmHWM")
    print(json.dumps({"fwd+bwd ms": round(sorted(times)[len(times) // 2] * 1e3, 1),
                      "peak extra MiB": round((peak - before) / 1024, 1)}))  # fmt: skip


def bench_cpu_quick() -> list[dict]:
    rows = []
    for case, lengths in QUICK_CASES.items():
        for variant in ("qwenlong blockwise (torch)", "SDPA CPU default (per doc)", "naive (materialized)"):
            result = subprocess.run(
                [sys.executable, "-m", "benchmarks.bench_attention", "--cpu-child", variant, case],
                capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, check=True,
            )  # fmt: skip
            row = {"variant": variant, "case": case, "documents": len(lengths), "total tokens": sum(lengths)}
            row.update(json.loads(result.stdout.strip().splitlines()[-1]))
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- output
def markdown(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_results(rows: list[dict], card: str, setup: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"{card.replace(' ', '_')}-{datetime.date.today().isoformat()}-attention"
    payload = {"card": card, "torch": torch.__version__, **setup, "rows": rows}
    (RESULTS / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    header = f"# Packed varlen attention on {card}\n\n" + "".join(f"- {k}: {v}\n" for k, v in setup.items())
    (RESULTS / f"{stem}.md").write_text(header + "\n" + markdown(rows) + "\n")
    return RESULTS / f"{stem}.md"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU: blockwise path vs naive/SDPA on small sizes")
    parser.add_argument("--totals", type=int, nargs="+", default=list(TOTALS), help="GPU: total tokens")
    parser.add_argument("--layouts", nargs="+", default=["packed", "single"], choices=["packed", "single"])
    parser.add_argument("--cpu-child", nargs=2, metavar=("VARIANT", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cpu_child:
        _cpu_child(*args.cpu_child)
        return 0
    if args.quick or not torch.cuda.is_available():
        rows = bench_cpu_quick()
        setup = {"mode": "CPU quick, fp32, causal", "heads": f"{QUICK_HEADS}/{QUICK_KV_HEADS}",
                 "head_dim": QUICK_HEAD_DIM, "threads": torch.get_num_threads()}  # fmt: skip
        card = "cpu"
    else:
        rows = bench_gpu(args.totals, args.layouts)
        setup = {"mode": "GPU, bf16, causal", "heads": f"{HEADS}/{KV_HEADS}", "head_dim": HEAD_DIM}
        card = torch.cuda.get_device_name()
    print(markdown(rows))
    print(f"\nwritten: {write_results(rows, card, setup)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
