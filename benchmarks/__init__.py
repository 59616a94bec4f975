"""Benchmarks of the qwenlong kernels and training stack against the baselines users run today.

``python -m benchmarks`` (or ``qwenlong bench``) runs them all; see :mod:`benchmarks.__main__`.
Shared pieces (environment record, timing, memory, results files, plots) live in
:mod:`benchmarks.common`; results in ``benchmarks/results/<card>-<date>-<bench>.{json,md,png}``.
"""
