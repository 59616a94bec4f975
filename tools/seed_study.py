"""Seed-to-seed spread of the tiny pipeline: run it at several seeds, tabulate accuracy per stage and the gains.

Seed s sets both the training seed (model init, SFT order, RL sampling) and the synthetic data
seed (documents, facts, held-out items), so the spread covers everything a rerun could change.
Each run's own paired intervals (report.md) cover the held-out items only; this covers the rest.

    python tools/seed_study.py --config configs/tiny.yaml --seeds 0 1 2 --jobs 3 \\
        --runs-dir /tmp/seed-study --out benchmarks/results/tiny-pipeline-seeds-cpu-2026-11-26

writes ``<out>.json`` and ``<out>.md``. Extra ``key=value`` overrides go to every run. Wall times
are each run's own (``pipeline.json``); with ``--jobs > 1`` (one torch thread each) or other load
on the machine they are longer than a run alone: say so with ``--note``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def run_seed(config: str, seed: int, runs_dir: Path, overrides: list[str], threads: int | None) -> dict:
    out = runs_dir / f"seed{seed}"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, "-m", "qwenlong", "pipeline", "--config", config, f"seed={seed}",
               f"data.synthetic.seed={seed}", *overrides, f"output.dir={out}"]
    if (out / "pipeline.json").exists():  # a run of an interrupted study: read it when finished, else resume it
        command.append("--resume")
    if not (out / "report.md").exists():
        with open(runs_dir / f"seed{seed}.log", "a") as log:
            subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, check=True)
    state = json.loads((out / "pipeline.json").read_text())
    return {"seed": seed, "wall_s": state["wall_time_s"],
            "accuracy": {label: result["average"] for label, result in state["evals"].items()},
            "gains": json.loads((out / "gains.json").read_text())}


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def summarize(runs: list[dict]) -> dict:
    """Mean, sample std, min and max over seeds of each stage's accuracy and each gain (percent, points)."""
    labels = list(runs[0]["accuracy"])
    pairs = [(g["from"], g["to"]) for g in runs[0]["gains"]]

    def gain(run: dict, pair: tuple[str, str]) -> dict:
        return next(g for g in run["gains"] if (g["from"], g["to"]) == pair)

    return {"accuracy": {label: spread([r["accuracy"][label] for r in runs]) for label in labels},
            "gains": [{"from": a, "to": b, **spread([gain(r, (a, b))["gain"] for r in runs]),
                       "max_p_value": max(gain(r, (a, b))["p_value"] for r in runs),
                       "min_ci_low": min(gain(r, (a, b))["ci_low"] for r in runs)} for a, b in pairs]}


def to_markdown(study: dict) -> str:
    runs, summary = study["runs"], study["summary"]
    labels = list(summary["accuracy"])
    lines = [f"# Tiny pipeline seed study ({study['date']}, {study['machine']})", "",
             f"Config: `{' '.join([study['config'], *study['overrides']])}`; seeds {study['seeds']} "
             f"(training and data seed); {study['jobs']} run(s) at a time. {study['note']}", "",
             "## Held-out accuracy (%) per seed", "", "| seed | " + " | ".join(labels) + " | wall (min) |",
             "|---|" + "---|" * (len(labels) + 1)]
    lines += [f"| {r['seed']} | " + " | ".join(f"{r['accuracy'][label]:.1f}" for label in labels) +
              f" | {r['wall_s'] / 60:.1f} |" for r in runs]
    lines += ["| mean +- std | " + " | ".join(f"{summary['accuracy'][label]['mean']:.1f} +- "
                                             f"{summary['accuracy'][label]['std']:.1f}" for label in labels) + " | |",
              "", "## Gains (points): paired within each run, spread across seeds", "",
              "| from | to | " + " | ".join(f"seed {r['seed']}: gain [95% interval], p" for r in runs) +
              " | mean +- std over seeds | min over seeds |", "|---|---|" + "---|" * (len(runs) + 2)]
    for index, g in enumerate(summary["gains"]):
        cells = [f"{r['gains'][index]['gain']:+.1f} [{r['gains'][index]['ci_low']:+.1f}, "
                 f"{r['gains'][index]['ci_high']:+.1f}], {r['gains'][index]['p_value']:.2g}" for r in runs]
        lines.append(f"| {g['from']} | {g['to']} | " + " | ".join(cells) +
                     f" | {g['mean']:+.1f} +- {g['std']:.1f} | {g['min']:+.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each then gets one torch thread)")
    parser.add_argument("--runs-dir", type=Path, required=True, help="where the run folders go (not committed)")
    parser.add_argument("--out", type=Path, required=True, help="path prefix of the .json and .md results")
    parser.add_argument("--note", default="", help="conditions of the measurement (other load on the machine)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for every run")
    args = parser.parse_args()
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    threads = 1 if args.jobs > 1 else None
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda s: run_seed(args.config, s, args.runs_dir, args.overrides, threads), args.seeds))
    study = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU only",
             "config": args.config, "overrides": args.overrides, "seeds": args.seeds, "jobs": args.jobs,
             "note": args.note, "runs": runs, "summary": summarize(runs)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(study, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(to_markdown(study))
    print(to_markdown(study))


if __name__ == "__main__":
    main()
