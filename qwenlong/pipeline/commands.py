"""``qwenlong pipeline | sft | rl``: run the recipe or one stage of it from a YAML config."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML preset, e.g. configs/tiny.yaml")
    parser.add_argument("--resume", action="store_true", help="continue the run in output.dir")
    parser.add_argument("--no-plan-check", action="store_true",
                        help="start even when `qwenlong plan` says the run cannot fit on these devices")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted config overrides, e.g. rl.phases.0.steps=5 output.dir=runs/x")


def _load(args: argparse.Namespace):
    from qwenlong.config import load_config

    cfg = load_config(args.config, args.overrides)
    if not args.no_plan_check:
        from qwenlong.plan.preflight import preflight

        verdict = preflight(cfg)
        if verdict is not None:
            raise SystemExit(f"qwenlong plan: {verdict}\n(--no-plan-check starts it anyway)")
    return cfg


def run_pipeline_command(args: argparse.Namespace) -> int:
    from qwenlong.pipeline.run import run_pipeline

    run = run_pipeline(_load(args), resume=args.resume)
    if run.ctx.is_main:  # rank 0 wrote it
        print(f"report: {run.dir / 'report.md'}")
    return 0


def run_sft_command(args: argparse.Namespace) -> int:
    from qwenlong.pipeline.run import run_sft

    run = run_sft(_load(args), resume=args.resume)
    if run.ctx.is_main:  # where its checkpoints, exports and evaluations are
        print(f"run folder: {run.dir} (checkpoints/, export/, eval/)")
    return 0


def run_rl_command(args: argparse.Namespace) -> int:
    from qwenlong.pipeline.run import run_rl

    run = run_rl(_load(args), resume=args.resume)
    if run.ctx.is_main:  # where its checkpoints, exports and evaluations are
        print(f"run folder: {run.dir} (checkpoints/, export/, eval/)")
    return 0
