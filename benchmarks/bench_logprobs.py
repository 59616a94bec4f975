"""Fused LM-head cross-entropy / log-probs: time and peak memory against materialized logits.

GPU (default): forward and forward+backward time and peak extra memory of the mean token
cross-entropy for T in {8K, 32K, 120K}, d in {3584, 5120}, V = 152,064, bf16, in one run:
plain PyTorch on materialized logits (the way HF models compute the loss), our chunked
PyTorch path, our Triton kernels, Liger-Kernel's fused linear cross-entropy and Cut
Cross-Entropy when they import ("not available" otherwise). An out-of-memory run is recorded
as "OOM", never estimated.

CPU (``--device cpu``): peak extra memory (``benchmarks.common.PeakMemory``) of the fused
(chunked) path against the materialized logits at T = 2K, 4K and 16K, V = 152,064, d = 128,
fp32 (with backward up to ``--backward-max-tokens``), one run each (its seconds reported
too). The materialized variant is the leanest possible one: the logits tensor plus a
row-chunked log-softmax (HF's loss would also allocate a second T x V copy), so the ratio is
a lower bound. ``--quick``: T = 256 and 512, V = 32,768.

Results: JSON + markdown + a plot (peak memory and tokens/s vs T) under ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
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

VOCAB = 152_064


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


# ----------------------------------------------------------------------------- measurement
def make_inputs(tokens, dim, vocab, dtype, device, requires_grad, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hidden = (torch.randn(tokens, dim, generator=gen) * 0.5).to(device, dtype).requires_grad_(requires_grad)
    weight = (torch.randn(vocab, dim, generator=gen) / dim**0.5).to(device, dtype).requires_grad_(requires_grad)
    targets = torch.randint(0, vocab, (tokens,), generator=gen).to(device)
    return hidden, weight, targets


def measure_gpu(run, tokens, dim, repeats, backward: bool) -> tuple[float, float]:
    """Peak extra MiB of one run, then the median ms over fresh inputs (forward, or forward+backward)."""
    seeds = itertools.count(1)

    def fresh():
        return make_inputs(tokens, dim, VOCAB, torch.bfloat16, "cuda", backward, seed=next(seeds))

    def step(hidden, weight, targets):
        loss = run(hidden, weight, targets)
        if backward:
            loss.backward()

    step(*fresh())  # warm-up: kernel compilation
    inputs = fresh()
    with PeakMemory("cuda") as peak:
        step(*inputs)
    del inputs
    return peak.mib, round(time_ms(step, setup=fresh, device="cuda", warmup=0, repeats=repeats), 2)


def run_gpu(args) -> list[dict]:
    rows = []
    sizes = [(8192, 3584)] if args.quick else [(t, d) for t in (8192, 32768, 122880) for d in (3584, 5120)]
    for name, run in gpu_variants().items():
        for tokens, dim in sizes:
            row = {"variant": name, "T": tokens, "d": dim, "V": VOCAB, "dtype": "bf16"}
            for mode in ("forward", "forward+backward"):
                if run is None:
                    row["status"] = NOT_AVAILABLE
                    break
                try:
                    row[f"{mode} peak MiB"], row[f"{mode} ms"] = measure_gpu(run, tokens, dim, args.repeats,
                                                                             backward=mode != "forward")
                except torch.OutOfMemoryError:
                    row[f"{mode} peak MiB"] = row[f"{mode} ms"] = OOM
                torch.cuda.empty_cache()
            if isinstance(row.get("forward+backward ms"), float):
                row["forward+backward tokens/s"] = round(tokens / (row["forward+backward ms"] * 1e-3))
            rows.append(row)
            print(row, flush=True)
    return rows


def run_cpu(args) -> list[dict]:
    """One run per variant and T, in this process: peak extra memory and seconds."""
    os.environ["QWENLONG_BACKEND"] = "torch"
    import qwenlong.kernels.logprobs  # noqa: F401  (imports are not the op's memory)

    vocab, dim = (32_768 if args.quick else VOCAB), 128
    rows = []
    for tokens in args.tokens or ([256, 512] if args.quick else [2048, 4096, 16384]):
        for variant in ("materialized logits (lean)", "fused chunked (ours)", "fused chunked (ours) +backward"):
            backward = variant.endswith("+backward")
            if backward and tokens > args.backward_max_tokens:
                continue
            run = lean_materialized_cross_entropy if variant.startswith("materialized") else ours("torch")
            hidden, weight, targets = make_inputs(tokens, dim, vocab, torch.float32, "cpu", backward)
            with PeakMemory("cpu") as peak:
                start = time.perf_counter()
                loss = run(hidden, weight, targets)
                if backward:
                    loss.backward()
                seconds = time.perf_counter() - start
            del hidden, weight
            row = {"variant": variant, "T": tokens, "d": dim, "V": vocab, "dtype": "fp32", "peak MiB": peak.mib,
                   "seconds": round(seconds, 2), "tokens/s": round(tokens / seconds), "loss": round(float(loss), 5),
                   "logits tensor MiB": round(tokens * vocab * 4 / 2**20, 1)}
            rows.append(row)
            print(row, flush=True)
    return rows


def forward_memory_ratios(rows: list[dict]) -> list[str]:
    """Materialized over fused peak memory (forward) per T, as notes."""
    by_key = {(row["variant"], row["T"]): row["peak MiB"] for row in rows}
    return [f"T={t}: materialized / fused forward peak memory = "
            f"{by_key[('materialized logits (lean)', t)] / by_key[('fused chunked (ours)', t)]:.1f}x"
            for t in sorted({row["T"] for row in rows})]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="GPU: one size; CPU: T 256/512, V 32K")
    parser.add_argument("--tokens", type=int, nargs="+", help="CPU: the T values")
    parser.add_argument("--backward-max-tokens", type=int, default=4096, help="CPU: largest T run with backward")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS_DIR), help="results directory")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: use --device cpu")
    if args.device == "cpu":
        rows = run_cpu(args)
        notes = forward_memory_ratios(rows)
        plot = {"x": "T", "series": ["variant"], "metrics": ["peak MiB", "tokens/s"]}
        setup = {"mode": "memory: one run per variant and T", "peak memory": memory_method("cpu")}
    else:
        rows = run_gpu(args)
        notes = []
        plot = {"x": "T", "series": ["variant", "d"], "metrics": ["forward+backward tokens/s",
                                                                 "forward+backward peak MiB"]}
        setup = {"mode": "speed and memory", "timing": f"median of {args.repeats} runs on fresh inputs after a "
                 "warm-up", "peak memory": memory_method("cuda")}
    bench = "logprobs-memory" if args.device == "cpu" else "logprobs"
    write_results(bench, "Fused LM-head cross-entropy", rows, setup=setup, out_dir=args.out, env=environment(),
                  notes=notes, plot=plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
