"""``qwenlong plan``: will a run fit, and how long will a step take (no GPU, no download)."""

from __future__ import annotations

import argparse

from qwenlong.plan.hardware import GPUS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML preset, e.g. configs/qwenlong-l1-32b.yaml")
    parser.add_argument("--gpus", type=int, default=None,
                        help="devices in the run (default: 1 on cpu, else one node of 8 or distributed.sp_size "
                             "if larger)")
    parser.add_argument("--gpu", default="h100-80gb", choices=[*GPUS, "cpu"], help="device kind")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")


def default_gpus(sp_size: int, gpu: str) -> int:
    return 1 if gpu == "cpu" else max(8, sp_size)


def run(args: argparse.Namespace) -> int:
    """Print the plan; exit status 0 when the run fits, 1 when it does not. A mistake in the arguments or the
    config raises ``ConfigError`` naming it, which ``qwenlong`` prints in one line with exit status 2, so a
    script can tell an error from a verdict."""
    from qwenlong.config import load_config
    from qwenlong.plan.memory import check_world
    from qwenlong.plan.report import format_plan, make_plan

    cfg = load_config(args.config, args.overrides)
    gpus = args.gpus if args.gpus is not None else default_gpus(cfg.distributed.sp_size, args.gpu)
    check_world(gpus, cfg.distributed.sp_size, argument="--gpus")
    plan = make_plan(cfg, gpus, args.gpu)
    print(format_plan(plan))
    return 0 if plan.fits else 1
