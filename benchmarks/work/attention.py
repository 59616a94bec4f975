"""Work meter of packed varlen attention: programs launched against useful tiles, FLOPs issued against
the causal minimum, forward and backward.

A useful tile is a (query block, head) of one sequence (a (key block, kv head) in the dk/dv pass):
every program of the tile-scheduled launch is one, where the previous grid ``(blocks of the longest
sequence, heads, batch)`` also launched a program for every block a shorter sequence does not have
(it returned at once; "old grid" below). The causal minimum is what any exact kernel computes:
``4 d H sum_i n_i (n_i + 1) / 2`` forward (QK^T and PV over each document's lower triangle) and
2.5x that backward (five GEMMs: recomputed QK^T, dV, dP, dQ, dK). Both backward paths are metered: the
default deterministic one issues seven (dq's own pass recomputes QK^T and dP), so its floor is 3.5x;
``deterministic=False`` issues the five in the dk/dv kernel alone (dq added with fp32 atomics), floor 2.5x.

Counted under the interpreter (:mod:`benchmarks.work.counting`) at small shapes with the tile table the
interpreter uses (sm_80's), and given by :func:`closed_form` (the kernels' tile tables and the same
:func:`~qwenlong.kernels.attention.varlen.schedule`; equal to the count at small shapes in
``tests/test_attention_work.py``) at full size on sm_90 and sm_80, bf16, head_dim 128, 40/8 heads:

- pretraining: documents of at most 8K tokens packed to 32K;
- RL-shaped: one 64K document + 110 of 512 tokens; one 32K document + 880 of 100.

    python -m benchmarks --only work          # every meter; this one writes *-work-attention.{json,md}
"""

from __future__ import annotations

import argparse
import importlib
import sys

import numpy as np
import torch

from benchmarks.bench_attention import batch_lengths
from benchmarks.common import RESULTS_DIR, environment, write_results
from benchmarks.work.counting import count_work, require_interpreter

FULL = {"heads": 40, "kv_heads": 8, "head_dim": 128, "dtype": torch.bfloat16}
KERNEL_NAMES = {"fwd": "_attn_fwd", "dkdv": "_attn_bwd_dkdv", "dq": "_attn_bwd_dq"}
DOTS = {"fwd": 2, "dkdv": 4, "dq": 3, "dkdv_atomic": 5}  # tl.dot calls per visited block pair
# the kernels each backward path launches (config name in the tile tables, over key blocks?)
PATHS = {
    True: (("fwd", False), ("dkdv", True), ("dq", False)),  # deterministic: 7 GEMMs
    False: (("fwd", False), ("dkdv_atomic", True)),  # atomic dq in the dk/dv kernel: 5 GEMMs
}


def varlen():
    return importlib.import_module("qwenlong.kernels.attention.varlen")


def full_batches() -> dict[str, list[int]]:
    return {
        "docs <= 8K packed to 32K": batch_lengths(32 * 1024, "docs<=8K"),
        "RL: 64K + 110 x 512": [64 * 1024] + [512] * 110,
        "RL: 32K + 880 x 100": [32 * 1024] + [100] * 880,
    }


def small_batches(quick: bool = False) -> dict[str, list[int]]:
    """The full batches shrunk for the interpreter (every program costs it milliseconds): lengths / 64 and
    the RL batches' short documents 4x / 8x fewer; ``quick`` (the smoke run): lengths / 128 and 8x / 32x
    fewer. The pretraining batch is the GPU benchmark's (``bench_attention``'s "docs<=8K" at 32K)."""
    scale, fewer = (128, (8, 32)) if quick else (64, (4, 8))
    return {
        "docs <= 8K packed to 32K": [max(1, n // scale) for n in batch_lengths(32 * 1024, "docs<=8K")],
        "RL: 64K + 110 x 512": [64 * 1024 // scale] + [512 // scale] * (110 // fewer[0]),
        "RL: 32K + 880 x 100": [32 * 1024 // scale] + [max(1, 100 // scale)] * (880 // fewer[1]),
    }


def causal_minimum(lengths, heads: int, head_dim: int) -> int:
    """Forward FLOPs of exact causal attention: QK^T and PV over each document's lower triangle."""
    return sum(4 * heads * head_dim * n * (n + 1) // 2 for n in lengths)


def closed_form(lengths, heads, kv_heads, head_dim, dtype, table: int, deterministic: bool = True):
    """Programs, useful tiles, FLOPs and the old grid's programs per kernel (the configs' names: fwd, dkdv, dq;
    ``deterministic=False``: fwd, dkdv_atomic), causal, from the tile tables."""
    vl = varlen()
    lens = np.asarray(lengths, dtype=np.int64)
    window = vl.BatchPlan(lens, lens).window(-1, 0)
    configs = vl._configs(head_dim, dtype, table)
    block_d = vl._block_d(head_dim)
    out = {}
    for kernel, over_keys in PATHS[deterministic]:
        bm, bn = configs[kernel]["BLOCK_M"], configs[kernel]["BLOCK_N"]
        block, other = (bn, bm) if over_keys else (bm, bn)
        tables = vl.schedule(lens, lens, block, other, window, over_keys)
        seq, index = tables
        first = index.astype(np.int64) * block
        last = np.minimum(first + block, lens[seq]) - 1
        # causal, q_len == k_len: a query tile visits key blocks [0, last]; a key tile query blocks [first, n)
        visited = (-(-(lens[seq] - first // other * other) // other)) if over_keys else last // other + 1
        program_heads = kv_heads if over_keys else heads
        per_program_heads = heads // kv_heads if over_keys else 1
        out[kernel] = {
            "programs": tables.shape[1] * program_heads,
            "useful tiles": int(sum(-(-n // block) for n in lengths)) * program_heads,
            "old grid": (-(-max(lengths) // block)) * program_heads * len(lengths),
            "flops": int(visited.sum()) * program_heads * per_program_heads * DOTS[kernel] * 2 * bm * bn * block_d,
        }
    return out


def _inputs(lengths, heads, kv_heads, head_dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(total, heads, head_dim, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(total, kv_heads, head_dim, generator=gen).to(dtype).requires_grad_()
    v = torch.randn(total, kv_heads, head_dim, generator=gen).to(dtype).requires_grad_()
    do = torch.randn(total, heads, head_dim, generator=gen).to(dtype)
    cu = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32)
    return q, k, v, do, cu


def run(q, k, v, do, cu, deterministic: bool = True) -> None:
    """Causal forward + backward of the kernels."""
    longest = int(cu.diff().max())
    out = varlen().varlen_attention(q, k, v, cu, cu, longest, longest, causal=True, deterministic=deterministic)
    torch.autograd.grad(out, (q, k, v), do)


def count(lengths, heads, kv_heads, head_dim, dtype, deterministic: bool = True) -> dict[str, dict[str, int]]:
    """Programs and FLOPs per kernel launched, counted under the interpreter (Triton kernels only), named as
    :func:`closed_form` names them."""
    inputs = _inputs(lengths, heads, kv_heads, head_dim, dtype)
    work = count_work(run, *inputs, deterministic=deterministic, torch_ops=False)
    kernels = {KERNEL_NAMES[name.removesuffix("_atomic")]: name for name, _ in PATHS[deterministic]}
    launched = {name for name in work.by_kernel if name in KERNEL_NAMES.values()}
    if launched != set(kernels):
        raise AssertionError(f"deterministic={deterministic} launched {sorted(launched)}, expected {sorted(kernels)}")
    return {kernel: {"programs": work.by_kernel[name].programs, "flops": work.by_kernel[name].flops}
            for name, kernel in kernels.items()}  # fmt: skip


def _counted(batch, lengths, heads, kv_heads, head_dim, dtype, deterministic: bool) -> dict:
    """One backward path's work at a small shape: counted, checked against the closed form (sm_80 tiles, as the
    interpreter uses), with the formula's useful tiles and old grid added."""
    counted = count(lengths, heads, kv_heads, head_dim, dtype, deterministic)
    formula = closed_form(lengths, heads, kv_heads, head_dim, dtype, table=80, deterministic=deterministic)
    for kernel, work in counted.items():
        if work != {key: formula[kernel][key] for key in work}:
            raise AssertionError(f"closed form != count for {batch} {kernel} (deterministic={deterministic}): "
                                 f"{formula[kernel]} {work}")  # fmt: skip
    return formula


def _row(batch: str, lengths, heads, head_dim, where: str, works: dict, atomic: dict) -> dict:
    """Summary columns: programs / useful tiles and old grid, per kernel; FLOPs / causal minimum fwd and bwd;
    then the ``deterministic=False`` backward's (``atomic``) programs and FLOPs / minimum."""
    minimum = causal_minimum(lengths, heads, head_dim)
    row = {"batch": batch, "where": where, "documents": len(lengths), "tokens": sum(lengths)}
    for kernel in ("fwd", "dkdv", "dq"):
        w = works[kernel]
        row[f"{kernel} programs"] = w["programs"]
        row[f"{kernel} / useful"] = round(w["programs"] / w["useful tiles"], 3)
        if "old grid" in w:
            row[f"{kernel} old grid / useful"] = round(w["old grid"] / w["useful tiles"], 2)
    row["fwd FLOPs / min"] = round(works["fwd"]["flops"] / minimum, 3)
    row["bwd FLOPs / min"] = round((works["dkdv"]["flops"] + works["dq"]["flops"]) / (2.5 * minimum), 3)
    row["atomic bwd programs"] = atomic["dkdv_atomic"]["programs"]
    row["atomic bwd / useful"] = round(atomic["dkdv_atomic"]["programs"] / atomic["dkdv_atomic"]["useful tiles"], 3)
    row["atomic bwd FLOPs / min"] = round(atomic["dkdv_atomic"]["flops"] / (2.5 * minimum), 3)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small batches at 1/128 instead of 1/64")
    parser.add_argument("--out", default=str(RESULTS_DIR), help="results directory")
    args = parser.parse_args(argv)
    require_interpreter()
    from qwenlong.kernels.utils.interpreter import install_interpreter_fixes

    install_interpreter_fixes()
    heads, kv_heads, head_dim, dtype = 2, 1, 64, torch.bfloat16
    rows = []
    for batch, lengths in small_batches(args.quick).items():
        paths = {deterministic: _counted(batch, lengths, heads, kv_heads, head_dim, dtype, deterministic)
                 for deterministic in (True, False)}  # fmt: skip
        rows.append(_row(batch, lengths, heads, head_dim, "interpreter (sm_80 tiles)", paths[True], paths[False]))
        print(rows[-1], flush=True)
    big = []
    for table in (90, 80):
        for batch, lengths in full_batches().items():
            shape = (lengths, FULL["heads"], FULL["kv_heads"], FULL["head_dim"], FULL["dtype"], table)
            works, atomic = (closed_form(*shape, deterministic=flag) for flag in (True, False))
            big.append(_row(batch, lengths, FULL["heads"], FULL["head_dim"], f"closed form sm_{table}", works, atomic))
    notes = [
        "programs / useful: programs launched per useful (block, head) tile; 1.0 means no empty program. "
        "old grid / useful: the same for the previous (blocks of the longest sequence, heads, batch) grid.",
        "FLOPs are tl.dot operand shapes (padded tiles count in full), against the causal minimum "
        "4 d H sum n(n+1)/2 forward and 2.5x that backward; the deterministic 7-GEMM backward's floor is 1.4.",
        "atomic bwd: the deterministic=False backward, one dk/dv kernel that adds dq with fp32 atomics (5 GEMMs, "
        "floor 1.0; no dq kernel), on its own tiles (dkdv_atomic in the tile tables).",
        f"Counted: {heads}/{kv_heads} heads, head_dim {head_dim}, bf16, the full batches' lengths / "
        f"{128 if args.quick else 64} (the RL batches' short documents {'8x and 32x' if args.quick else '4x and 8x'} "
        "fewer); the closed form equals "
        "the count there (checked in this run and in tests/test_attention_work.py). At these sizes a short "
        "document fills a small part of its 128-row tile, so FLOPs / min is large; the full-size table is the "
        "one to read.",
        "Closed form: 40/8 heads, head_dim 128, bf16, causal, the kernels' tile tables for sm_90 and sm_80.",
    ]

    def shapes(batches):
        return {name: f"{len(lengths)} docs, {sum(lengths)} tokens" for name, lengths in batches.items()}

    setup = {"counted shapes": shapes(small_batches(args.quick)), "full shapes": shapes(full_batches()),
             "hook": "benchmarks/work/counting.py (Triton interpreter)"}  # fmt: skip
    write_results("work-attention", "Packed attention work meter: programs per useful tile, FLOPs / causal minimum",
                  rows, setup=setup, out_dir=args.out, env=environment(), notes=notes,
                  tables={"closed form at full size (40/8 heads, d128, bf16)": big})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
