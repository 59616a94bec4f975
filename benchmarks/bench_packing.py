"""Packing and balancing: C++ (qwenlong._C.host) speed against the Python reference, and quality.

Speed: wall time of the public API (input conversion and the Python lists it returns
included) on long-tailed sequence lengths; the Python reference runs on a smaller size.
Quality: micro-batch count against the bound ``ceil(sum / budget)`` and the heaviest rank
against the perfect share ``ceil(sum / k)`` (for the attention cost, against sum(L^2) / k).

    python benchmarks/bench_packing.py            # 1,000,000 lengths, reference on 20,000
    python benchmarks/bench_packing.py --quick    # 100,000 lengths, reference on 2,000

Writes benchmarks/results/packing_cpu.json and .md (``--out`` to change the stem).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np

from qwenlong import _C
from qwenlong.kernels.packing import api, reference

RESULTS = Path(__file__).resolve().parent / "results"


def rollout_lengths(n: int, max_len: int, seed: int = 0) -> np.ndarray:
    """Long-tailed lengths like RL rollouts: log-normal around 2k tokens, clipped to [16, max_len]."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(mean=math.log(2000), sigma=1.0, size=n), 16, max_len).astype(np.int64)


def best_time(fn, repeats: int) -> tuple[float, float, object]:
    """Best wall time and best CPU time of this process (the work is single-threaded, so CPU
    time equals wall time on an idle machine and stays honest on a busy one)."""
    best_wall, best_cpu, result = float("inf"), float("inf"), None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        best_cpu = min(best_cpu, time.process_time() - cpu)
        best_wall = min(best_wall, time.perf_counter() - wall)
    return best_wall, best_cpu, result


def packing_quality(micro_batches, lengths, budget: int) -> dict:
    lower_bound = math.ceil(int(lengths.sum()) / budget)
    return {"micro_batches": len(micro_batches), "lower_bound": lower_bound,
            "excess_pct": 100.0 * (len(micro_batches) - lower_bound) / lower_bound}


def balance_quality(groups, weights) -> dict:
    totals = [float(weights[g].sum()) if g else 0.0 for g in groups]
    perfect = math.ceil(float(weights.sum()) / len(groups))
    return {"heaviest": max(totals), "lightest": min(totals), "perfect_share": perfect,
            "imbalance_pct": 100.0 * (max(totals) - perfect) / perfect}


def run(n: int, n_reference: int, k: int, budget: int, max_len: int, repeats: int) -> dict:
    if _C.host is None:
        raise SystemExit(f"qwenlong._C._host is not built: {_C.host_error}")
    lengths = rollout_lengths(n, max_len)
    rows = []

    def case(name, call, ref_call, quality):
        wall, cpu, result = best_time(lambda: call(lengths), repeats)
        small = lengths[:n_reference]
        _, cpp_small, _ = best_time(lambda: call(small), repeats)
        _, ref_small, _ = best_time(lambda: ref_call(small), 1)
        rows.append({"op": name, "n": n, "cpp_wall_s": wall, "cpp_cpu_s": cpu, "n_reference": n_reference,
                     "cpp_small_s": cpp_small, "reference_small_s": ref_small,
                     "speedup": ref_small / cpp_small, **quality(result)})

    tokens = lengths.astype(np.float64)
    case("pack_by_token_budget", lambda x: api.pack_by_token_budget(x, budget),
         lambda x: reference.pack_by_token_budget(x.tolist(), budget),
         lambda mbs: packing_quality(mbs, lengths, budget))
    for cost in ("tokens", "attention"):
        weights = api.partition_costs(lengths, cost)
        case(f"balance_partitions k={k} cost={cost}", lambda x, c=cost: api.balance_partitions(x, k, cost=c),
             lambda x, c=cost: reference.balance_partitions(api.partition_costs(x, c).tolist(), k),
             lambda groups, w=weights: balance_quality(groups, w))

    def pack_and_balance_quality(ranks):
        groups = [[i for mb in rank for i in mb] for rank in ranks]
        return {**balance_quality(groups, tokens), "micro_batches_per_rank": len(ranks[0]),
                "micro_batches_lower_bound": math.ceil(int(lengths.sum()) / (k * budget))}

    case(f"balance_and_pack k={k}", lambda x: api.balance_and_pack(x, k, budget),
         lambda x: reference.balance_and_pack(x.tolist(), x.astype(np.float64).tolist(), k, budget, True),
         pack_and_balance_quality)
    return {"config": {"n": n, "n_reference": n_reference, "k": k, "budget": budget, "max_len": max_len,
                       "lengths": "lognormal(log 2000, 1) clipped to [16, max_len]", "repeats": repeats},
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "python": platform.python_version()},
            "rows": rows}


def to_markdown(report: dict) -> str:
    c = report["config"]
    lines = [f"# Packing and balancing (CPU, {report['machine']['cores']} cores)", "",
             f"{c['n']:,} lengths ({c['lengths']}, max_len {c['max_len']}), budget {c['budget']}, k {c['k']}; "
             f"best of {c['repeats']}. Python reference on the first {c['n_reference']:,}.", "",
             "CPU seconds of the process (wall time in brackets; other jobs shared the cores).", "",
             "| op | C++ time (n) | C++ / reference, CPU (small n) | quality |", "|---|---|---|---|"]
    for r in report["rows"]:
        if "excess_pct" in r:
            quality = f"{r['micro_batches']} micro-batches, bound {r['lower_bound']} (+{r['excess_pct']:.3f}%)"
        else:
            quality = (f"heaviest rank {r['heaviest']:.0f} vs perfect share {r['perfect_share']} "
                       f"(+{r['imbalance_pct']:.2e}%)")
            if "micro_batches_per_rank" in r:
                quality += f"; {r['micro_batches_per_rank']} micro-batches/rank, bound {r['micro_batches_lower_bound']}"
        lines.append(f"| {r['op']} | {r['cpp_cpu_s'] * 1e3:.0f} ms ({r['cpp_wall_s'] * 1e3:.0f} ms) | "
                     f"{r['cpp_small_s'] * 1e3:.1f} ms / "
                     f"{r['reference_small_s'] * 1e3:.0f} ms ({r['speedup']:.0f}x) | {quality} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100k lengths instead of 1M")
    parser.add_argument("--k", type=int, default=8, help="data-parallel ranks")
    parser.add_argument("--budget", type=int, default=65536, help="tokens per micro-batch")
    parser.add_argument("--max-len", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="packing_cpu", help="file stem under benchmarks/results/")
    args = parser.parse_args(argv)
    n, n_reference = (100_000, 2_000) if args.quick else (1_000_000, 20_000)
    report = run(n, n_reference, args.k, args.budget, args.max_len, args.repeats)
    markdown = to_markdown(report)
    print(markdown)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"{args.out}.md").write_text(markdown)
    return report


if __name__ == "__main__":
    main()
