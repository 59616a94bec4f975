"""Time the packed-attention kernels' tile choices on a GPU: one call, a table, JSON.

The tile table in ``kernels/attention/varlen.py`` (``TILES``) holds, per kernel, a (BLOCK_M, BLOCK_N,
num_warps, num_stages) that compiles without register spills; which spill-free candidate is fastest only a
timed run can tell. Each candidate below replaces one kernel's tile (the others stay as the table has them for
this GPU and Triton version) and is timed on one packed batch, forward and forward + backward (median of
``--repeats`` runs on fresh inputs, CUDA events), beside the table's own choice measured the same way; its
output and gradients are checked against the table's (a wrong tile is reported, not timed as a win).

    python tools/attention_tiles.py --out /tmp/tiles      # on a GPU: bf16, head_dim 128, 40/8 heads, 32K of docs <= 8K
    python tools/attention_tiles.py --tokens 160 --heads 2 --kv-heads 1 --head-dim 32 --repeats 1 --limit 2
                                                          # a smoke run of the plumbing (CPU, the interpreter)

Writes ``attention-tiles.json`` under ``--out`` (rows: kernel, tile, fwd / bwd ms, ratio to the table's,
max relative error). ``tools/gpu_check.sh`` runs it as its ``tiles`` step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (kernel, (BLOCK_M, BLOCK_N, num_warps, num_stages)): the open questions of the sm_90 table at head_dim 128
CANDIDATES = [
    ("fwd", (128, 128, 8, 2)),  # 3 stages take 231,424 B of shared memory, 1 KB under the limit
    ("fwd", (128, 64, 8, 3)),
    ("dkdv", (64, 128, 8, 2)),  # Triton >= 3.9's tile (16 STL in the loop with 3.6)
    ("dkdv", (32, 128, 8, 3)),
    ("dkdv_atomic", (64, 128, 8, 1)),  # the full 64-row dq beside dk, dv fits with one stage
    ("dkdv_atomic", (32, 128, 8, 3)),
    ("dq", (128, 64, 8, 3)),
    ("dq", (64, 128, 4, 2)),
]
FIELDS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")


def with_tile(varlen, kernel: str | None, tile: tuple[int, int, int, int] | None):
    """``varlen._configs`` with ``kernel``'s launch config replaced by ``tile`` (None: the table's own)."""
    base = varlen._configs

    def configs(head_dim, dtype, table):
        chosen = base(head_dim, dtype, table)
        return chosen if kernel is None else {**chosen, kernel: dict(zip(FIELDS, tile, strict=True))}

    return configs


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def run_candidate(varlen, kernel, tile, lengths, args, device, dtype, reference=None) -> dict:
    """Times and checks one candidate (``kernel`` None: the table's own tiles)."""
    from benchmarks.bench_attention import make_inputs
    from benchmarks.common import time_ms
    from qwenlong.kernels import varlen_attention

    deterministic = kernel != "dkdv_atomic"
    cu = make_inputs(lengths, 1, 1, 8, dtype, device, requires_grad=False)[3]
    longest = max(lengths)

    def fresh(seed=None):
        if seed is not None:
            torch.manual_seed(seed)
        q, k, v, _, _ = make_inputs(lengths, args.heads, args.kv_heads, args.head_dim, dtype, device)
        return q, k, v, torch.randn_like(q)

    def forward(q, k, v, do):
        return varlen_attention(q, k, v, cu, cu, longest, longest, causal=True, deterministic=deterministic)

    def fwd_bwd(q, k, v, do):
        out = forward(q, k, v, do)
        return (out, *torch.autograd.grad(out, (q, k, v), do))

    row = {"kernel": kernel or "table", "tile": list(tile) if tile else "table", "deterministic": deterministic}
    original = varlen._configs
    varlen._configs = with_tile(varlen, kernel, tile)
    try:
        results = fwd_bwd(*fresh(seed=1234))  # compiles; the check's inputs
        if reference is not None:
            row["max rel error"] = max(relative_error(got, want) for got, want in zip(results, reference, strict=True))
        with torch.no_grad():
            row["fwd ms"] = round(time_ms(forward, setup=fresh, device=device.type, repeats=args.repeats), 4)
        row["fwd+bwd ms"] = round(time_ms(fwd_bwd, setup=fresh, device=device.type, repeats=args.repeats), 4)
        row["bwd ms"] = round(row["fwd+bwd ms"] - row["fwd ms"], 4)
        row["status"] = "ok"
    except Exception as error:  # noqa: BLE001  (a tile that does not fit this GPU: say why, go on)
        row["status"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
        results = None
    finally:
        varlen._configs = original
    return row, results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32 * 1024, help="total tokens of documents <= 8K")
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per measurement (median)")
    parser.add_argument("--limit", type=int, default=len(CANDIDATES), help="time only the first N candidates")
    parser.add_argument("--budget", type=float, default=float("inf"), help="seconds after which no candidate starts")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for attention-tiles.json")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    if not gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
    from benchmarks.bench_attention import batch_lengths
    from benchmarks.common import environment
    from qwenlong.kernels.attention import varlen

    os.environ["QWENLONG_BACKEND"] = "triton"
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    lengths = batch_lengths(args.tokens, "docs<=8K")
    deadline = time.perf_counter() + args.budget
    baseline, reference = run_candidate(varlen, None, None, lengths, args, device, dtype)
    rows = [baseline]
    print(json.dumps(baseline), flush=True)
    for kernel, tile in CANDIDATES[: args.limit]:
        if time.perf_counter() > deadline:
            rows.append({"kernel": kernel, "tile": list(tile), "status": "the --budget was spent"})
            continue
        row, _ = run_candidate(varlen, kernel, tile, lengths, args, device, dtype, reference)
        for key in ("fwd ms", "bwd ms"):
            if key in row and isinstance(baseline.get(key), float):
                row[f"{key.split()[0]} vs table"] = round(row[key] / baseline[key], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    table = varlen._configs(args.head_dim, dtype, varlen.tile_table(device))
    result = {"environment": environment(), "documents": lengths, "heads": f"{args.heads}/{args.kv_heads}",
              "head_dim": args.head_dim, "dtype": str(dtype).removeprefix("torch."), "table tiles": table, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attention-tiles.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'kernel':<12} {'tile':<18} {'fwd ms':>9} {'bwd ms':>9} {'fwd x':>6} {'bwd x':>6} {'rel err':>8}  status")
    for row in rows:
        print(f"{row['kernel']:<12} {str(row['tile']):<18} {row.get('fwd ms', ''):>9} {row.get('bwd ms', ''):>9} "
              f"{row.get('fwd vs table', ''):>6} {row.get('bwd vs table', ''):>6} "
              f"{row.get('max rel error', 0.0):>8.1e}  {row['status']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
