"""Time the Triton kernels' tile choices on a GPU: one call, a table, JSON.

The tile tables (``TILES`` in ``kernels/attention/varlen.py``, ``block_config`` in
``kernels/logprobs/linear_logprobs.py``) hold launch configs that compile without register spills; which
spill-free candidate is fastest only a timed run can tell. Each candidate below replaces part of one kernel's
config (the rest stays as the table has it for this GPU and Triton version) and is timed, forward and forward +
backward (median of ``--repeats`` runs on fresh inputs, CUDA events), beside the table's own choice measured
the same way; its outputs and gradients are checked against the table's (a wrong tile is reported, not timed
as a win).

- attention: bf16, head_dim 128, 40/8 heads, causal, 32K tokens of documents <= 8K;
- lm-head: ``linear_logprobs`` with entropy, bf16, d = 5120, V = 152,064, 8K valid rows (on the Triton path).

    python tools/tile_sweep.py --out /tmp/tiles                         # on a GPU: both sweeps
    python tools/tile_sweep.py --smoke --limit 1 --out /tmp/tiles       # the plumbing at tiny sizes (interpreter)

Writes ``tile-sweep.json`` under ``--out`` (per sweep: the table's config and rows of candidate, fwd / bwd ms,
ratio to the table's, max relative error). ``tools/gpu_check.sh`` runs it as its ``tiles`` step.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ATTENTION_FIELDS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
# (kernel, (BLOCK_M, BLOCK_N, num_warps, num_stages)): the open questions of the sm_90 table at head_dim 128
ATTENTION_CANDIDATES = [
    ("fwd", (128, 128, 8, 2)),  # 3 stages take 231,424 B of shared memory, 1 KB under the limit
    ("fwd", (128, 64, 8, 3)),
    ("dkdv", (64, 128, 8, 2)),  # Triton >= 3.9's tile (16 STL in the loop with 3.6)
    ("dkdv", (32, 128, 8, 3)),
    ("dkdv_atomic", (64, 128, 8, 1)),  # the full 64-row dq beside dk, dv fits with one stage
    ("dkdv_atomic", (32, 128, 8, 3)),
    ("dq", (128, 64, 8, 3)),
    ("dq", (64, 128, 4, 2)),
]
# block_config overrides: the logits kernels' reduction step (BLOCK_D) and pipelining, their row tile, the
# gradient GEMMs' shape; at 188 TFLOP/s on an H200 (2.4x under the CUDA extension) the Triton path has room
LM_HEAD_CANDIDATES = [
    {"BLOCK_D": 64},
    {"BLOCK_D": 64, "forward_stages": 2, "backward_stages": 2},
    {"forward_stages": 4},
    {"backward_stages": 3},
    {"BLOCK_T": 64, "num_warps": 4},
    {"BLOCK_K": 32, "gemm_stages": 4},
    {"BLOCK_M": 64, "gemm_stages": 4},
]


@dataclass
class Sweep:
    """One kernel family: its candidates, how one is applied, and the problem it is timed on."""

    name: str
    candidates: list
    apply: Callable  # candidate -> context manager that puts it in force
    table: Callable  # () -> the table's config (JSON)
    make_inputs: Callable  # (seed=None) -> (args, upstream): inputs requiring grad and the output gradient, fresh
    # ones each call unless a seed is given (the check's: the same for the table and every candidate)
    forward: Callable  # *args -> output tensor(s)
    describe: Callable  # candidate -> a short label


@contextlib.contextmanager
def _replaced(module, name: str, value):
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


def attention_sweep(args, device: torch.device, dtype: torch.dtype) -> Sweep:
    from benchmarks.bench_attention import batch_lengths, make_inputs
    from qwenlong.kernels import varlen_attention
    from qwenlong.kernels.attention import varlen

    tokens, heads, kv_heads, head_dim = (160, 2, 1, 32) if args.smoke else (32 * 1024, 40, 8, 128)
    lengths = batch_lengths(tokens, "docs<=8K")
    cu = make_inputs(lengths, 1, 1, 8, dtype, device, requires_grad=False)[3]
    longest, base = max(lengths), varlen._configs
    current = {"deterministic": True}

    def apply(candidate):
        kernel, tile = candidate
        current["deterministic"] = kernel != "dkdv_atomic"
        tiles = (lambda d, t, table: {**base(d, t, table), kernel: dict(zip(ATTENTION_FIELDS, tile, strict=True))})
        return _replaced(varlen, "_configs", tiles)

    def fresh(seed=None):
        if seed is not None:
            torch.manual_seed(seed)
        q, k, v, _, _ = make_inputs(lengths, heads, kv_heads, head_dim, dtype, device)
        return (q, k, v), torch.randn_like(q)

    def forward(q, k, v):
        return varlen_attention(q, k, v, cu, cu, longest, longest, causal=True,
                                deterministic=current["deterministic"])

    return Sweep("attention", ATTENTION_CANDIDATES, apply, lambda: base(head_dim, dtype, varlen.tile_table(device)),
                 fresh, forward, lambda c: f"{c[0]} {list(c[1])}")


def lm_head_sweep(args, device: torch.device, dtype: torch.dtype) -> Sweep:
    from benchmarks.bench_logprobs import DIM, VOCAB, make_inputs
    from qwenlong.kernels import linear_logprobs

    kernels = importlib.import_module("qwenlong.kernels.logprobs.linear_logprobs")
    tokens, dim, vocab = (96, 32, 700) if args.smoke else (8192, DIM, VOCAB)
    base = kernels._config_for
    seeds = iter(range(1, 1 << 30))

    def apply(overrides):
        return _replaced(kernels, "_config_for", lambda hidden: {**base(hidden), **overrides})

    def fresh(seed=None):
        seed = next(seeds) if seed is None else seed
        hidden, weight, targets = make_inputs(tokens, dim, vocab, dtype, device.type, True, seed=seed, peaked=True)
        upstream = torch.randn(tokens, device=device, generator=torch.Generator(device=device).manual_seed(seed))
        return (hidden, weight, targets), upstream

    def forward(hidden, weight, targets):
        logp, entropy = linear_logprobs(hidden, weight, targets, return_entropy=True)
        return logp - 0.01 * entropy

    def table():
        return base(torch.empty(1, dim, dtype=dtype, device=device))

    return Sweep("lm-head", LM_HEAD_CANDIDATES, apply, table, fresh, forward, lambda c: json.dumps(c))


SWEEPS = {"attention": attention_sweep, "lm-head": lm_head_sweep}
CHECK_SEED = 1234


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def measure(sweep: Sweep, candidate, device: torch.device, repeats: int, reference=None) -> tuple[dict, list | None]:
    """Times and checks one candidate (None: the table's own config)."""
    from benchmarks.common import time_ms

    def fwd(inputs, upstream):
        with torch.no_grad():
            sweep.forward(*inputs)

    def fwd_bwd(inputs, upstream):
        out = sweep.forward(*inputs)
        differentiable = [x for x in inputs if x.requires_grad]
        return [out, *torch.autograd.grad(out, differentiable, upstream)]

    row = {"sweep": sweep.name, "candidate": "table" if candidate is None else sweep.describe(candidate)}
    try:
        with sweep.apply(candidate) if candidate is not None else contextlib.nullcontext():
            results = fwd_bwd(*sweep.make_inputs(seed=CHECK_SEED))  # compiles; the check's inputs
            if reference is not None:
                row["max rel error"] = max(relative_error(g, w) for g, w in zip(results, reference, strict=True))
            row["fwd ms"] = round(time_ms(fwd, setup=sweep.make_inputs, device=device.type, repeats=repeats), 4)
            both = time_ms(fwd_bwd, setup=sweep.make_inputs, device=device.type, repeats=repeats)
            row["bwd ms"] = round(both - row["fwd ms"], 4)
        row["status"] = "ok"
    except Exception as error:  # noqa: BLE001  (a config that does not fit this GPU: say why, go on)
        row["status"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
        results = None
    return row, results


def run_sweep(sweep: Sweep, device: torch.device, repeats: int, limit: int, deadline: float) -> list[dict]:
    baseline, reference = measure(sweep, None, device, repeats)
    rows = [baseline]
    print(json.dumps(baseline), flush=True)
    for candidate in sweep.candidates[:limit]:
        if time.perf_counter() > deadline:
            rows.append({"sweep": sweep.name, "candidate": sweep.describe(candidate),
                         "status": "the --budget was spent"})
            continue
        row, _ = measure(sweep, candidate, device, repeats, reference)
        for key in ("fwd ms", "bwd ms"):
            if key in row and isinstance(baseline.get(key), float) and baseline[key] > 0:
                row[f"{key.split()[0]} vs table"] = round(row[key] / baseline[key], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(SWEEPS), default=list(SWEEPS))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: the plumbing, e.g. under the interpreter")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per measurement (median)")
    parser.add_argument("--limit", type=int, default=1 << 30, help="time only the first N candidates of each sweep")
    parser.add_argument("--budget", type=float, default=float("inf"),
                        help="seconds for all sweeps: each gets an equal share of what is left when it starts")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for tile-sweep.json")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    if not gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
    from benchmarks.common import environment

    os.environ["QWENLONG_BACKEND"] = "triton"
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    repeats = 1 if args.smoke else args.repeats
    result = {"environment": environment(), "dtype": str(dtype).removeprefix("torch."), "sweeps": {}}
    end = time.perf_counter() + args.budget
    for index, name in enumerate(args.only):
        share = (end - time.perf_counter()) / (len(args.only) - index)
        sweep = SWEEPS[name](args, device, dtype)
        rows = run_sweep(sweep, device, repeats, args.limit, time.perf_counter() + share)
        result["sweeps"][name] = {"table": sweep.table(), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tile-sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    header = ("sweep", "candidate", "fwd ms", "bwd ms", "fwd x", "bwd x", "rel err")
    print("{:<10} {:<58} {:>9} {:>9} {:>6} {:>6} {:>8}  status".format(*header))
    for sweep in result["sweeps"].values():
        for row in sweep["rows"]:
            print(f"{row['sweep']:<10} {row['candidate']:<58} {row.get('fwd ms', ''):>9} {row.get('bwd ms', ''):>9} "
                  f"{row.get('fwd vs table', ''):>6} {row.get('bwd vs table', ''):>6} "
                  f"{row.get('max rel error', 0.0):>8.1e}  {row['status']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
