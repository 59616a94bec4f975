"""Scoring time of hostile responses: the hybrid reward's rules on degenerate answers up to 200 KB.

Each response is scored through ``HybridReward.score`` (rules only), pinned to one core, after a
warm-up call (imports and lazy tables are not counted); the time is the best of ``--repeats`` CPU
times. The budget is 0.5 s for any 200 KB response; the random rows mix the hostile pieces at random.

    python -m benchmarks.bench_reward_hostile            # every case, both rule sets, 20 random responses
    python -m benchmarks.bench_reward_hostile --quick    # 5 random responses

Results: JSON + markdown under ``--out`` (``benchmarks/common.write_results``).
"""

from __future__ import annotations

import argparse
import os
import random
import time

from benchmarks.common import RESULTS_DIR, environment, write_results
from qwenlong.rewards import HybridReward, RewardItem, RuleConfig

BUDGET_S = 0.5


def said(answer: str) -> str:
    """A well-formed response (thinking, then the answer sentence) whose answer is ``answer``."""
    return f"<think>\nreading\n</think>\n\nTherefore, the answer is {answer}."


# name: (data source, response, gold). Each scores 0 under both rule sets, in bounded time and without an
# exception (tests/test_rewards_hostile.py checks that); this benchmark times them.
HOSTILE_CASES = {
    "5,000 digits": ("docmath", said("7" * 5000), "12"),
    '"2"*4200 + "e999"': ("docmath", said("2" * 4200 + "e999"), "12"),
    '" _x"*10000 (30 KB)': ("musique", said(" _x" * 10000), "Paris"),
    '" _x"*30000 (90 KB)': ("musique", said(" _x" * 30000), "Paris"),
    '" _x"*66000 (200 KB)': ("musique", said(" _x" * 66000), "Paris"),
    "\\boxed{ nested 20,000 deep": ("musique", said("\\boxed{" * 20000 + "Lyon" + "}" * 20000), "Paris"),
    "20,000 digits": ("docmath", said("9" * 20000), "12"),
    "\\boxed{\\binom{10000000}{5000000}}": ("docmath", said("\\boxed{\\binom{10000000}{5000000}}"), "12"),
    "$99999!$ = \\frac{1}{2}": ("docmath", said("$99999!$ = \\frac{1}{2}"), "12"),
    '"111,"*50000 (200 KB)': ("docmath", said("111," * 50000), "12"),
    "10^ digits (200 KB)": ("docmath", said("1" * 100 + " x 10^" + "10" * 100000), "12"),
    '"1." + "1"*200000 + "e1234" (200 KB)': ("docmath", said("1." + "1" * 200000 + "e1234"), "12"),
    '"1" + " "*200000 + "/" (200 KB)': ("docmath", said("1" + " " * 200000 + "/"), "12"),
    '"\\boxed{}"*25000 + "{}"*50000': ("hotpotqa", said("\\boxed{}" * 25000 + "{" + "{}" * 50000), "Paris"),
    '" the answer is"*14000': ("hotpotqa", "<think>x</think>" + " the answer is" * 14000, "Paris"),
}
# The timed rows: the hostile cases, then plain text of the same size for comparison (it may score 1).
CASES = {**HOSTILE_CASES, "plain text 200 KB": ("hotpotqa", said("Paris London " * 16000), "Paris")}
_PIECES = [" _x", "_", "__", "\\boxed{", "\\text{", "}", "{", "1", "11,", "9" * 40, ".", "e", "x 10^", "/", " ", "\n",
           "the answer is ", "**", "`", "’s", "—", "Paris", "$", "=", "\\frac{1}{2}", "or ", ", "]


def random_response(rng: random.Random, size: int) -> str:
    """A thinking block, then ``size`` characters of hostile pieces (some repeated 10 or 300 times) at random."""
    out, length = [], 0
    while length < size:
        piece = rng.choice(_PIECES) * rng.choice([1, 1, 1, 10, 300])
        out.append(piece)
        length += len(piece)
    return "<think>x</think>" + "".join(out)[:size]


def cpu_seconds(reward: HybridReward, item: RewardItem, repeats: int) -> float:
    reward.score([item])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        reward.score([item])
        best = min(best, time.process_time() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 random responses instead of 20")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS_DIR), help="results directory")
    args = parser.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    configs = {"default": RuleConfig(), "release": RuleConfig.faithful()}
    rows = []
    for name, (source, response, gold) in CASES.items():
        item = RewardItem(source, response, gold, "q")
        times = {label: cpu_seconds(HybridReward(rule_config=config), item, args.repeats)
                 for label, config in configs.items()}
        rows.append({"response": name, "kb": round(len(response.encode()) / 1000, 1),
                     **{f"{label}_s": seconds for label, seconds in times.items()}})
    rng = random.Random(0)
    for source, gold in (("hotpotqa", "Paris"), ("docmath", "12"), ("long_toc_choices", "B")):
        worst = dict.fromkeys(configs, 0.0)
        for _ in range(5 if args.quick else 20):
            item = RewardItem(source, random_response(rng, 200_000), gold, "q")
            for label, config in configs.items():
                worst[label] = max(worst[label], cpu_seconds(HybridReward(rule_config=config), item, 1))
        rows.append({"response": f"random mix, {source} (worst of {5 if args.quick else 20})", "kb": 200.0,
                     **{f"{label}_s": seconds for label, seconds in worst.items()}})
    slowest = max(max(row["default_s"], row["release_s"]) for row in rows)
    setup = {"scoring": "HybridReward(rule_config=...).score([item]), rules only, one response",
             "timing": f"CPU seconds, best of {args.repeats} after a warm-up call, pinned to one core",
             "budget": f"{BUDGET_S} s for any 200 KB response"}
    notes = [f"slowest response: {slowest:.3f} s ({'within' if slowest < BUDGET_S else 'OVER'} the budget)",
             "before the fix (commit 629fada, same machine, one core): 5,000 digits and 4,200 digits + e999 raised "
             "ValueError (int digit limit); 30 KB of ' _x' 1.9 s, 90 KB > 20 s; \\boxed{ nested 20,000 deep 20.7 s; "
             "20,000 digits > 20 s; \\binom{10000000}{5000000} > 20 s; '111,'*50000 > 20 s (each killed at 20 s)"]
    write_results("reward-hostile", "Scoring time of hostile responses", rows, setup=setup, out_dir=args.out,
                  env=environment(), notes=notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
