"""The ``qwenlong`` command. Each subcommand names a module providing ``add_arguments(parser)``
and a runner ``(args) -> int`` (``run`` unless named); modules load only when chosen."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

# subcommand -> (module, runner, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "env": ("qwenlong.env", "run", "print versions and which backends are available"),
    "plan": ("qwenlong.plan.cli", "run", "per-GPU memory, verdict and time per step of a config, before renting GPUs"),
    "data-bins": ("qwenlong.pipeline.data_bins_command", "run",
                  "pre-infer the base model on training data, bin each source by pass@k, draw equally from each bin"),
    "pipeline": ("qwenlong.pipeline.commands", "run_pipeline_command",
                 "warm-up SFT -> phased RL with retrospective sampling -> evaluation"),
    "sft": ("qwenlong.pipeline.commands", "run_sft_command", "warm-up SFT only"),
    "rl": ("qwenlong.pipeline.commands", "run_rl_command", "the RL phases only"),
    "export": ("qwenlong.pipeline.export", "run",
               "write a run's trained policy (any checkpoint) as a HF model folder: safetensors, tokenizer, card"),
    "eval": ("qwenlong.pipeline.eval_command", "run", "evaluate a model on the DocQA benchmarks (or synthetic data)"),
    "merge": ("qwenlong.merge.cli", "run", "merge fine-tuned models into a base model (SCE), one tensor at a time"),
    "serve-judge": ("qwenlong.rewards.judge.server", "run",
                    "serve a local HF model as an OpenAI-compatible judge endpoint"),
    "bench": ("benchmarks.__main__", "run", "run the benchmarks (from a source checkout), write results and plots"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwenlong", description="Long-context reasoning RL toolkit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, _, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _checkout_on_path() -> None:
    """``benchmarks/`` sits beside the package in a source checkout and is not installed: make it importable."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "__main__.py").is_file():
        raise SystemExit("qwenlong bench: the benchmarks ship with the source checkout, not the installed package; "
                         "run it from an editable install (pip install -e .)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv or ["--help"])  # prints help / the error for unknown commands
        return 2
    module_name, runner, help_text = COMMANDS[argv[0]]
    if module_name.startswith("benchmarks."):
        _checkout_on_path()
    module = importlib.import_module(module_name)
    sub = argparse.ArgumentParser(prog=f"qwenlong {argv[0]}", description=help_text)
    module.add_arguments(sub)
    args = sub.parse_intermixed_args(argv[1:])
    try:
        return int(getattr(module, runner)(args) or 0)
    except KeyboardInterrupt:
        # Ctrl-C is the user's choice, not a crash: one line, the shell's status for SIGINT
        hint = (" (checkpoints so far are kept: the same command with --resume continues from the newest)"
                if argv[0] in ("pipeline", "sft", "rl") else "")
        print(f"qwenlong {argv[0]}: interrupted{hint}", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError) as error:
        # a bad config, data file or run folder is the user's to fix: one line naming it (the key path, the
        # file and row), exit status 2 as for bad arguments; any other error keeps its traceback
        from qwenlong.config import ConfigError
        from qwenlong.data import DataError
        from qwenlong.state.checkpoint import CheckpointError

        if not isinstance(error, (ConfigError, DataError, CheckpointError)):
            raise
        print(f"qwenlong {argv[0]}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
