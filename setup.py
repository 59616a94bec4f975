"""Builds the extension package ``qwenlong._C``.

- ``qwenlong._C._host``: C++ (pybind11), always built. Sources: ``csrc/host/*.cpp``.
- ``qwenlong._C._cuda``: CUDA ops (torch CUDA extension), built when a CUDA toolkit and a
  CUDA build of torch are importable in the build environment. Sources: ``csrc/cuda/``.

``QWENLONG_BUILD_CUDA=1`` forces the CUDA part (the build fails loudly if it cannot be
built), ``QWENLONG_BUILD_CUDA=0`` skips it, unset means "build it when possible". The CUDA
part needs the installed torch, so install with ``pip install --no-build-isolation .``
when you want it. ``TORCH_CUDA_ARCH_LIST`` picks the architectures (default ``8.0;9.0``);
``MAX_JOBS`` bounds parallel compile jobs (default 4).
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _say(message: str) -> None:
    print(f"[qwenlong build] {message}", file=sys.stderr, flush=True)


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _host_extension():
    from pybind11.setup_helpers import Pybind11Extension

    return Pybind11Extension(
        "qwenlong._C._host",
        _sources("csrc/host/*.cpp"),
        include_dirs=[os.path.join(ROOT, "csrc", "host")],
        extra_compile_args=["-O3"],
        cxx_std=17,
    )


def _cuda_extension():
    """The CUDA extension, or None with the reason printed. Raises when forced and impossible."""
    mode = os.environ.get("QWENLONG_BUILD_CUDA", "auto").strip().lower()
    if mode in ("0", "false", "off", "no"):
        _say("CUDA part: skipped (QWENLONG_BUILD_CUDA=0)")
        return None
    forced = mode in ("1", "true", "on", "yes")
    reason = None
    sources = _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension
    except ImportError:
        torch = None
        reason = "torch is not importable in the build environment (use --no-build-isolation)"
    if reason is None and torch.version.cuda is None:
        reason = f"torch {torch.__version__} is a CPU build"
    if reason is None and CUDA_HOME is None:
        reason = "no CUDA toolkit found (set CUDA_HOME)"
    if reason is None and not sources:
        reason = "no CUDA sources in csrc/cuda"
    if reason is not None:
        if forced:
            raise RuntimeError(f"QWENLONG_BUILD_CUDA=1 but the CUDA part cannot be built: {reason}")
        _say(f"CUDA part: skipped ({reason})")
        return None
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    os.environ.setdefault("MAX_JOBS", "4")
    _say(f"CUDA part: building for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} "
         f"with torch {torch.__version__} (CUDA {torch.version.cuda}) and {CUDA_HOME}")
    return CUDAExtension(
        "qwenlong._C._cuda",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc", "cuda")],
        extra_compile_args={"cxx": ["-O3", "-std=c++20"], "nvcc": ["-O3", "-std=c++20", "--use_fast_math",
                                                                    "-lineinfo"]},
    )


def _build_ext_class(use_torch: bool):
    if use_torch:
        from torch.utils.cpp_extension import BuildExtension

        return BuildExtension.with_options(use_ninja=True)
    from pybind11.setup_helpers import build_ext

    return build_ext


extensions = [_host_extension()]
_say(f"C++ part: building qwenlong._C._host from {len(extensions[0].sources)} sources")
cuda_extension = _cuda_extension()
if cuda_extension is not None:
    extensions.append(cuda_extension)

setup(ext_modules=extensions, cmdclass={"build_ext": _build_ext_class(cuda_extension is not None)})
