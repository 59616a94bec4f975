"""Fused LM-head cross-entropy / log-probs: time and peak memory against materialized logits.

GPU (default): forward and forward+backward time and peak extra memory of the mean token
cross-entropy for T in {8K, 32K, 120K}, d in {3584, 5120}, V = 152,064, bf16, in one run:
plain PyTorch on materialized logits (the way HF models compute the loss), our chunked
PyTorch path, our Triton kernels, Liger-Kernel's fused linear cross-entropy and Cut
Cross-Entropy when they import ("not available" otherwise). An out-of-memory run is recorded
as "OOM", never estimated.

CPU (``--device cpu``): peak extra memory of the fused (chunked) path against the
materialized logits at T = 16K (``--quick``: 2K), V = 152,064, d = 128, fp32. Each variant
runs in a fresh subprocess and reports its peak resident set (``VmHWM``) minus its resident
set just before the op. The materialized variant is the leanest possible one: the logits
tensor plus a row-chunked log-softmax (HF's loss would also allocate a second T x V copy),
so the ratio is a lower bound.

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

VOCAB = 152_064
RESULTS = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------- variants
def materialized_cross_entropy(hidden, weight, targets):
    """HF-style: full logits in the model dtype, upcast to fp32, then cross-entropy."""
    return F.cross_entropy((hidden @ weight.T).float(), targets)


def lean_materialized_cross_entropy(hidden, weight, targets, rows=128):
    """Smallest footprint a materialized approach can have: the logits, then log-softmax by rows."""
    logits = hidden @ weight.T
    total = logits.new_zeros((), dtype=torch.float32)
    for start in range(0, logits.shape[0], rows):
        block = logits[start : start + rows].float()
        total += (torch.logsumexp(block, dim=-1) - block.gather(1, targets[start : start + rows, None])[:, 0]).sum()
    return total / targets.numel()


def ours(backend):
    def run(hidden, weight, targets):
        from qwenlong.kernels import linear_cross_entropy

        os.environ["QWENLONG_BACKEND"] = backend
        return linear_cross_entropy(hidden, weight, targets)

    return run


def liger():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    loss_fn = LigerFusedLinearCrossEntropyLoss()

    def run(hidden, weight, targets):
        out = loss_fn(weight, hidden, targets)
        return out[0] if isinstance(out, tuple) else out

    return run


def cut_cross_entropy():
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError:
        return None
    return lambda hidden, weight, targets: linear_cross_entropy(hidden, weight, targets)


def gpu_variants():
    return {
        "materialized (HF)": materialized_cross_entropy,
        "chunked torch (ours)": ours("torch"),
        "fused triton (ours)": ours("triton"),
        "liger fused linear CE": liger(),
        "cut cross-entropy": cut_cross_entropy(),
    }


# ----------------------------------------------------------------------------- GPU
def make_inputs(tokens, dim, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hidden = (torch.randn(tokens, dim, generator=gen) * 0.5).to(device, dtype).requires_grad_()
    weight = (torch.randn(VOCAB, dim, generator=gen) / dim**0.5).to(device, dtype).requires_grad_()
    targets = torch.randint(0, VOCAB, (tokens,), generator=gen).to(device)
    return hidden, weight, targets


def time_cuda(fn, repeats):
    fn()  # warm-up (compiles kernels)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return sorted(times)[len(times) // 2]


def measure_gpu(run, tokens, dim, repeats):
    hidden, weight, targets = make_inputs(tokens, dim, torch.bfloat16, "cuda")
    row = {}
    for mode in ("forward", "forward+backward"):
        def step(backward=mode == "forward+backward"):
            hidden.grad = weight.grad = None
            loss = run(hidden, weight, targets)
            if backward:
                loss.backward()

        try:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            row[f"{mode} peak extra GiB"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)
            row[f"{mode} ms"] = round(time_cuda(step, repeats), 2)
        except torch.cuda.OutOfMemoryError:
            row[f"{mode} peak extra GiB"] = row[f"{mode} ms"] = "OOM"
        hidden.grad = weight.grad = None
        torch.cuda.empty_cache()
    return row


def run_gpu(args):
    rows = []
    sizes = [(8192, 3584)] if args.quick else [(t, d) for t in (8192, 32768, 122880) for d in (3584, 5120)]
    for name, run in gpu_variants().items():
        for tokens, dim in sizes:
            row = {"variant": name, "T": tokens, "d": dim, "V": VOCAB, "dtype": "bf16"}
            row |= measure_gpu(run, tokens, dim, args.repeats) if run is not None else {"status": "not available"}
            rows.append(row)
            print(row, flush=True)
    return {"device": torch.cuda.get_device_name(), "rows": rows}


# ----------------------------------------------------------------------------- CPU memory
def _rss_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_child(variant, tokens, dim):
    """Run one variant in this (fresh) process and print its peak extra memory as JSON."""
    import qwenlong.kernels.logprobs  # noqa: F401  (imports are not the op's memory)

    torch.manual_seed(0)
    hidden = torch.randn(tokens, dim) * 0.5
    weight = torch.randn(VOCAB, dim) / dim**0.5
    targets = torch.randint(0, VOCAB, (tokens,))
    backward = variant.endswith("+backward")
    hidden.requires_grad_(backward)
    weight.requires_grad_(backward)
    run = lean_materialized_cross_entropy if variant.startswith("materialized") else ours("torch")
    before = _rss_kib("VmRSS")
    start = time.perf_counter()
    loss = run(hidden, weight, targets)
    if backward:
        loss.backward()
    seconds = time.perf_counter() - start
    peak = _rss_kib("VmHWM")
    print(json.dumps({"variant": variant, "peak_extra_mib": round((peak - before) / 1024, 1),
                      "seconds": round(seconds, 1), "loss": float(loss)}))


def run_cpu(args):
    tokens = 2048 if args.quick else 16384
    dim = 128
    rows = []
    for variant in ("materialized logits (lean)", "fused chunked (ours)", "fused chunked (ours) +backward"):
        cmd = [sys.executable, __file__, "--cpu-child", variant, "--tokens", str(tokens), "--dim", str(dim)]
        env = os.environ | {"TRITON_INTERPRET": "0"}
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        row = {"T": tokens, "d": dim, "V": VOCAB, "dtype": "fp32"} | json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(row, flush=True)
    by_name = {row["variant"]: row for row in rows}
    logits_mib = tokens * VOCAB * 4 / 2**20
    ratio = by_name["materialized logits (lean)"]["peak_extra_mib"] / by_name["fused chunked (ours)"]["peak_extra_mib"]
    return {"device": "cpu", "logits_tensor_mib": round(logits_mib, 1), "forward_memory_ratio": round(ratio, 1),
            "rows": rows}


# ----------------------------------------------------------------------------- output
def markdown(result):
    rows = result["rows"]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = [f"device: {result['device']}", "", "| " + " | ".join(columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    extra = {k: v for k, v in result.items() if k not in ("rows", "device")}
    if extra:
        lines += ["", ", ".join(f"{k}: {v}" for k, v in extra.items())]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="one small size only")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--cpu-child", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dim", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cpu_child:
        cpu_child(args.cpu_child, args.tokens, args.dim)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: use --device cpu")
    result = run_cpu(args) if args.device == "cpu" else run_gpu(args)
    table = markdown(result)
    print(table)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    kind = "quick" if args.quick else "memory" if args.device == "cpu" else "speed"
    stem = f"{args.device}-{datetime.date.today().isoformat()}-logprobs-{kind}"
    (args.out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out_dir / f"{stem}.md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
