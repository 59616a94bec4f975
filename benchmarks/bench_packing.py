"""Packing and balancing: C++ (qwenlong._C.host) speed against the Python reference, and quality.

Speed: wall time of the public API (input conversion and the Python lists it returns
included) on long-tailed sequence lengths; the Python reference runs on a smaller size.
Quality: micro-batch count against the bound ``ceil(sum / budget)`` and the heaviest rank
against the perfect share ``ceil(sum / k)`` (for the attention cost, against sum(L^2) / k).

    python -m benchmarks.bench_packing            # 1,000,000 lengths, reference on 20,000
    python -m benchmarks.bench_packing --quick    # 100,000 lengths, reference on 2,000

Results: JSON + markdown under ``--out`` (``benchmarks/common.write_results``).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from benchmarks.common import RESULTS_DIR, environment, write_results
from qwenlong import _C
from qwenlong.kernels.packing import api, reference


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


def run(n: int, n_reference: int, k: int, budget: int, max_len: int, repeats: int) -> list[dict]:
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
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100k lengths instead of 1M")
    parser.add_argument("--k", type=int, default=8, help="data-parallel ranks")
    parser.add_argument("--budget", type=int, default=65536, help="tokens per micro-batch")
    parser.add_argument("--max-len", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS_DIR), help="results directory")
    args = parser.parse_args(argv)
    n, n_reference = (100_000, 2_000) if args.quick else (1_000_000, 20_000)
    rows = run(n, n_reference, args.k, args.budget, args.max_len, args.repeats)
    setup = {"lengths": f"{n:,} lengths, lognormal(log 2000, 1) clipped to [16, {args.max_len}]",
             "budget": f"{args.budget} tokens per micro-batch", "k": f"{args.k} ranks",
             "reference": f"the Python reference on the first {n_reference:,} lengths",
             "timing": f"best of {args.repeats}; cpp_cpu_s is CPU time of the process (the work is "
                       "single-threaded), cpp_wall_s wall time (other jobs may share the cores)"}
    notes = ["quality: micro_batches vs lower_bound ceil(sum / budget); heaviest rank vs perfect_share ceil(sum / k)"]
    write_results("packing", "Packing and balancing (C++ vs Python reference)", rows, setup=setup, out_dir=args.out,
                  env=environment(), notes=notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
