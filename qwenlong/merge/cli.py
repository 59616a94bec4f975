"""``qwenlong merge``: merge fine-tuned models into a base model, streaming over safetensors.

Example (QwenLong-L1.5: the memory-agent expert and the stage-3 policy, over their common base)::

    qwenlong merge --method sce --base BASE --models STAGE3 MEMORY_EXPERT --out MERGED --select-topk 0.1
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from qwenlong.config import ConfigError
from qwenlong.merge import METHODS
from qwenlong.merge.streaming import INDEX_FILE, SINGLE_FILE

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5_000_000_000, ``"512MiB"`` -> 536_870_912, ``"1000"`` -> 1000 bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"expected a size like 5GB, 512MiB or 1000, got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=METHODS, default="sce")
    parser.add_argument("--base", required=True, help="base model folder (safetensors); config and tokenizer "
                                                      "files are copied from it (not its README.md and "
                                                      "qwenlong.json: the merged folder gets its own card)")
    parser.add_argument("--models", nargs="+", required=True, help="fine-tuned model folders to merge into the base")
    parser.add_argument("--out", required=True, help="output folder (written as <out>.partial, then renamed)")
    parser.add_argument("--select-topk", type=float, default=0.1,
                        help="SCE: fraction of each tensor's positions, by variance across the models, whose deltas "
                             "are kept (1 keeps all; default 0.1, our choice: the L1.5 report does not state it)")
    parser.add_argument("--max-shard-size", type=parse_size, default="5GB", help="largest output shard")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar over the tensors")


def _model_folder(flag: str, folder: str) -> None:
    """``folder`` holds a safetensors model (``model.safetensors`` or a sharded index)."""
    path = Path(folder)
    if not path.is_dir():
        raise ConfigError(f"{flag}: {folder} {'is not a directory' if path.exists() else 'does not exist'}")
    if not ((path / SINGLE_FILE).is_file() or (path / INDEX_FILE).is_file()):
        raise ConfigError(f"{flag}: {folder} holds no model ({SINGLE_FILE} or {INDEX_FILE})")


def check_arguments(args: argparse.Namespace) -> None:
    """The arguments' mistakes, each named, before anything is read or written."""
    if not 0.0 < args.select_topk <= 1.0:  # NaN fails too
        raise ConfigError(f"--select-topk: expected a fraction in (0, 1], got {args.select_topk}")
    if args.max_shard_size < 1:
        raise ConfigError(f"--max-shard-size: expected at least 1 byte, got {args.max_shard_size}")
    _model_folder("--base", args.base)
    for folder in args.models:
        _model_folder("--models", folder)
    out = Path(args.out)
    if out.resolve() in {Path(p).resolve() for p in (args.base, *args.models)}:
        raise ConfigError(f"--out: {args.out} is one of the input models")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {args.out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise ConfigError(f"--out: {args.out} exists and is not empty (pass --overwrite to replace it)")


def run(args: argparse.Namespace) -> int:
    from qwenlong.merge import sce_merge_checkpoints

    check_arguments(args)
    summary = sce_merge_checkpoints(args.base, args.models, args.out, select_topk=args.select_topk,
                                    max_shard_bytes=args.max_shard_size, overwrite=args.overwrite,
                                    progress=not args.no_progress)
    print(f"merged {summary['tensors']} tensors of {len(args.models)} models into {args.out} "
          f"({summary['shards']} shard(s), {summary['bytes'] / 1e6:.1f} MB, {summary['seconds']:.1f} s)")
    return 0
