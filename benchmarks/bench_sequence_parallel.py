"""Ulysses sequence parallelism: time per token of attention and log-probs against the SP degree P,
and the share of the all-to-all in the step.

GPU (default when CUDA is available; one GPU): P ranks are *simulated*. One rank's local work is
measured at its share of the sequence: attention forward+backward over all T tokens with H/P query
heads (and the KV heads a rank receives), log-probs forward+backward over T/P tokens. The all-to-all
cannot be measured on one GPU: its time is the bytes one rank sends divided by ``--a2a-gbps`` (give
the all-to-all bandwidth measured on the target machine, e.g. with nccl-tests).

CPU (``--device cpu``): real gloo process groups of P = 1, 2, 4 on this machine at a small size:
wall time of ``ulysses_attention`` forward+backward per token, and the time spent inside its
all-to-alls (timed around every collective, so it includes waiting for the slowest rank). The
machine's cores are shared by all ranks, so this shows the mechanism, not GPU scaling.

Both modes also print the paper estimate for the target (120K tokens, 8 GPUs, a Qwen2.5-32B layer)
from published H100 rates; its assumptions are printed with it.

``--quick``: the CPU mode at 512 tokens, P = 1, 2, one timed step.

Results: JSON + markdown under ``--out`` (``benchmarks/common.write_results``).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, environment, time_ms, write_results

# A Qwen2.5-32B decoder layer and the published H100 rates used by the paper estimate.
PAPER = {
    "tokens": 122_880, "sp": 8, "hidden": 5120, "heads": 40, "kv_heads": 8, "head_dim": 128, "intermediate": 27_648,
    "attn_fwd_tflops": 660.0, "attn_bwd_tflops": 575.0,  # FlashAttention-3, H100, bf16, causal, d=128
    "matmul_tflops": 600.0,  # ~60% of the H100 SXM dense bf16 peak (989)
    "a2a_gbps": 350.0,  # all-to-all bandwidth per GPU inside one NVLink node (assumed)
}


def a2a_bytes_per_rank(tokens: int, sp: int, heads: int, kv_heads: int, head_dim: int, elem: int = 2) -> float:
    """Bytes one rank sends per attention layer, forward + backward: q, k, v out and the output back,
    then the same volumes for their gradients; (P-1)/P of each local tensor leaves the rank."""
    if sp == 1:
        return 0.0
    kv_sent = kv_heads * sp // math.gcd(kv_heads, sp)  # KV heads after repetition for P ranks
    local = tokens // sp * head_dim * elem * (2 * heads + 2 * kv_sent)
    return 2 * local * (sp - 1) / sp


def paper_estimate(p=PAPER) -> dict:
    """Milliseconds per layer per rank (forward + backward) of attention, linear layers and all-to-all."""
    t, sp, d = p["tokens"], p["sp"], p["head_dim"]
    attn_fwd = 2 * t * t * d * p["heads"] / sp  # causal: half of 4 T^2 d per head
    params = p["hidden"] * (2 * p["heads"] * d + 2 * p["kv_heads"] * d) + 3 * p["hidden"] * p["intermediate"]
    linear = 3 * 2 * (t / sp) * params  # forward + backward (2x)
    attn_bwd = 2.5 * attn_fwd  # FlashAttention's backward does 2.5x the forward's matmul work
    ms = {
        "attention_ms": 1e3 * (attn_fwd / (p["attn_fwd_tflops"] * 1e12) + attn_bwd / (p["attn_bwd_tflops"] * 1e12)),
        "linear_ms": 1e3 * linear / (p["matmul_tflops"] * 1e12),
        "a2a_ms": 1e3 * a2a_bytes_per_rank(t, sp, p["heads"], p["kv_heads"], d) / (p["a2a_gbps"] * 1e9),
    }
    ms["a2a_share"] = ms["a2a_ms"] / sum(ms.values())
    return {"assumptions": p, **ms}


# ----------------------------------------------------------------------------- GPU (simulated ranks)
def _attention_ms(tokens: int, heads: int, kv_heads: int, head_dim: int) -> float:
    """Forward + backward of causal attention over one ``tokens``-long sequence, bf16."""
    from qwenlong.kernels import varlen_attention

    q = torch.randn(tokens, heads, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(tokens, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in "kv")
    cu = torch.tensor([0, tokens], device="cuda", dtype=torch.int32)
    grad = torch.ones_like(q)
    return time_ms(lambda: varlen_attention(q, k, v, cu, cu, tokens, tokens).backward(grad), device="cuda")


def _logprobs_ms(tokens: int, weight: torch.Tensor) -> float:
    """Forward + backward of the fused log-probs of ``tokens`` hidden states against ``weight``."""
    from qwenlong.kernels import linear_logprobs

    hidden = torch.randn(tokens, weight.shape[1], device="cuda", dtype=weight.dtype, requires_grad=True)
    targets = torch.randint(0, weight.shape[0], (tokens,), device="cuda")
    return time_ms(lambda: linear_logprobs(hidden, weight, targets).sum().backward(), device="cuda")


def run_gpu(args) -> list[dict]:
    t, h, kv, d = args.tokens, args.heads, args.kv_heads, args.head_dim
    weight = torch.randn(args.vocab, args.hidden, device="cuda", dtype=torch.bfloat16) * 0.02
    rows = []
    for sp in args.sp:
        kv_local = kv * (sp // math.gcd(kv, sp)) // sp  # KV heads a rank holds after repetition
        attn_ms, logp_ms = _attention_ms(t, h // sp, kv_local, d), _logprobs_ms(t // sp, weight)
        a2a_ms = 1e3 * a2a_bytes_per_rank(t, sp, h, kv, d) / (args.a2a_gbps * 1e9)
        rows.append({"sp": sp, "attention_ms": attn_ms, "logprobs_ms": logp_ms, "a2a_ms_at_given_bandwidth": a2a_ms,
                     "attention_us_per_token": 1e3 * attn_ms / t, "logprobs_us_per_token": 1e3 * logp_ms / t,
                     "a2a_share_of_attention_step": a2a_ms / (a2a_ms + attn_ms)})
    return rows


# ----------------------------------------------------------------------------- CPU (real gloo ranks)
def _cpu_rank(rank: int, sp: int, port: int, args, out_dir: str):
    os.environ["QWENLONG_BACKEND"] = "torch"
    torch.set_num_threads(1)
    import torch.distributed as dist

    from qwenlong.kernels import shard_packed_batch, ulysses_attention
    from qwenlong.kernels.sequence_parallel import comm

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=sp)
    a2a_seconds = [0.0]
    untimed = comm._all_to_all

    def timed(*a, **k):
        start = time.perf_counter()
        out = untimed(*a, **k)
        a2a_seconds[0] += time.perf_counter() - start
        return out

    comm._all_to_all = timed
    t, gen = args.tokens, torch.Generator().manual_seed(0)
    lengths = torch.full((args.sequences,), t // args.sequences)
    cu = torch.cat([torch.zeros(1), lengths.cumsum(0)]).int()
    qkv = {name: torch.randn(t, heads, args.head_dim, generator=gen)
           for name, heads in (("q", args.heads), ("k", args.kv_heads), ("v", args.kv_heads))}
    shard = shard_packed_batch(cu, **qkv)
    local = [shard[name].clone().requires_grad_() for name in "qkv"]

    def step():
        ulysses_attention(*local, shard.cu_seqlens, shard.max_seqlen).sum().backward()

    step()
    dist.barrier()
    a2a_seconds[0] = 0.0
    start = time.perf_counter()
    for _ in range(args.repeat):
        step()
    dist.barrier()
    step_s = (time.perf_counter() - start) / args.repeat
    if rank == 0:
        result = {"sp": sp, "step_ms": 1e3 * step_s, "a2a_ms": 1e3 * a2a_seconds[0] / args.repeat,
                  "us_per_token": 1e6 * step_s / t}
        result["a2a_share"] = result["a2a_ms"] / result["step_ms"]
        Path(out_dir, f"sp{sp}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def run_cpu(args) -> list[dict]:
    import torch.multiprocessing as mp

    multiprocessing.set_forkserver_preload(["torch", "qwenlong.kernels.sequence_parallel"])
    rows = []
    with tempfile.TemporaryDirectory() as out_dir:
        for sp in args.sp:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            mp.start_processes(_cpu_rank, args=(sp, port, args, out_dir), nprocs=sp, start_method="forkserver")
            rows.append(json.loads(Path(out_dir, f"sp{sp}.json").read_text()))
    return rows


# ----------------------------------------------------------------------------- report
def describe(gpu: bool, args) -> dict:
    if gpu:
        return {"mode": f"one GPU simulating P ranks: {args.tokens} tokens, {args.heads}/{args.kv_heads} heads, "
                        f"d={args.head_dim}, log-probs d={args.hidden} V={args.vocab}, bf16",
                "all-to-all": f"not measured: bytes one rank sends / {args.a2a_gbps} GB/s"}
    return {"mode": f"gloo on CPU ({os.cpu_count()} cores shared by all ranks): {args.tokens} tokens in "
                    f"{args.sequences} sequences, {args.heads}/{args.kv_heads} heads, d={args.head_dim}, fp32, "
                    "PyTorch attention path",
            "timing": f"mean of {args.repeat} ulysses_attention fwd+bwd steps after one warm-up step"}


def paper_note(paper: dict) -> str:
    p = paper["assumptions"]
    return (f"Paper estimate (not measured), one {p['tokens']}-token sequence on {p['sp']} GPUs, Qwen2.5-32B layer "
            f"(attention at FA3's {p['attn_fwd_tflops']:.0f}/{p['attn_bwd_tflops']:.0f} TFLOP/s, matmuls at "
            f"{p['matmul_tflops']:.0f}, all-to-all at {p['a2a_gbps']:.0f} GB/s): per layer and rank, "
            f"forward+backward, attention {paper['attention_ms']:.1f} ms, linear layers {paper['linear_ms']:.1f} ms, "
            f"all-to-all {paper['a2a_ms']:.2f} ms = {100 * paper['a2a_share']:.1f}% of the step (target < 15%).")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="CPU smoke: 512 tokens, P = 1 2, one timed step")
    parser.add_argument("--sp", type=int, nargs="+", default=None, help="SP degrees (GPU: 1 2 4 8, CPU: 1 2 4)")
    parser.add_argument("--tokens", type=int, default=None, help="packed tokens (GPU: 122880, CPU: 4096)")
    parser.add_argument("--sequences", type=int, default=4, help="CPU: equal-length sequences in the batch")
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--head-dim", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=5120, help="GPU: hidden size of the log-prob op")
    parser.add_argument("--vocab", type=int, default=152_064, help="GPU: vocabulary of the log-prob op")
    parser.add_argument("--a2a-gbps", type=float, default=PAPER["a2a_gbps"], help="GPU: all-to-all GB/s per rank")
    parser.add_argument("--repeat", type=int, default=3, help="CPU: timed steps")
    parser.add_argument("--out", default=str(RESULTS_DIR), help="results directory")
    args = parser.parse_args(argv)
    if args.quick:
        args.device, args.sp, args.tokens, args.repeat = "cpu", args.sp or [1, 2], args.tokens or 512, 1
    gpu = args.device == "cuda"
    defaults = {"sp": [1, 2, 4, 8] if gpu else [1, 2, 4], "tokens": 122_880 if gpu else 4096,
                "heads": 40 if gpu else 8, "kv_heads": 8 if gpu else 2, "head_dim": 128 if gpu else 64}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    rows = run_gpu(args) if gpu else run_cpu(args)
    paper = paper_estimate()
    write_results("sequence-parallel", "Ulysses sequence parallelism", rows, setup=describe(gpu, args),
                  out_dir=args.out, env=environment(), notes=[paper_note(paper)],
                  tables={"Paper estimate inputs (not measured)": [paper["assumptions"]]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
