"""``qwenlong env`` / ``python -m qwenlong.env``: versions and available backends."""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import os
import platform
import sys

PACKAGES = ("qwenlong", "torch", "triton", "numpy", "transformers", "deepspeed", "vllm", "tokenizers",
            "liger-kernel", "cut-cross-entropy", "flash-attn")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def collect() -> dict:
    """A dict of versions, devices and backends (what :func:`main` prints)."""
    import torch

    info: dict = {"python": platform.python_version(), "platform": platform.platform(),
                  "versions": {p: _version(p) for p in PACKAGES}}
    cuda = torch.cuda.is_available()
    info["torch_cuda"] = torch.version.cuda
    info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []

    from qwenlong import _C
    from qwenlong.kernels import backend

    has_triton = backend.triton_available()
    interpreter_ok = False
    if has_triton:
        try:
            import triton.runtime.interpreter  # noqa: F401

            interpreter_ok = True
        except ImportError:
            pass
    info["backends"] = {
        "triton_gpu": {"available": has_triton and cuda,
                       "why": None if has_triton and cuda else ("no CUDA GPU" if has_triton else "triton missing")},
        "triton_interpreter": {"available": interpreter_ok, "active": backend.interpreter_enabled(),
                               "why": None if interpreter_ok else "triton interpreter not importable"},
        "cuda_extension": {"available": _C.cuda is not None, "why": _C.cuda_error},
        "cpp_extension": {"available": _C.host is not None, "why": _C.host_error},
        "cpu_torch": {"available": True, "why": None},
    }
    info["backend_override"] = os.environ.get(backend.ENV_VAR, "auto")
    return info


def format_report(info: dict) -> str:
    lines = [f"qwenlong {info['versions']['qwenlong'] or '(not installed)'}",
             f"python   {info['python']} on {info['platform']}"]
    for name, version in info["versions"].items():
        if name != "qwenlong":
            lines.append(f"  {name:<18} {version or '-'}")
    lines.append(f"torch CUDA build: {info['torch_cuda'] or 'no (CPU build)'}")
    lines.append(f"GPUs: {', '.join(info['gpus']) or 'none'}")
    lines.append("backends:")
    labels = {"triton_gpu": "Triton on GPU", "triton_interpreter": "Triton interpreter",
              "cuda_extension": "CUDA extension (qwenlong._C._cuda)",
              "cpp_extension": "C++ extension (qwenlong._C._host)", "cpu_torch": "CPU path (PyTorch)"}
    for key, label in labels.items():
        entry = info["backends"][key]
        state = "yes" if entry["available"] else "no"
        if entry.get("active"):
            state += " (active: TRITON_INTERPRET=1)"
        why = f"  [{entry['why']}]" if entry.get("why") and not entry["available"] else ""
        lines.append(f"  {label:<36} {state}{why}")
    lines.append(f"QWENLONG_BACKEND: {info['backend_override']}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run(args: argparse.Namespace) -> int:
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwenlong.env", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
