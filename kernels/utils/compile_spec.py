"""How a Triton kernel declares the builds the offline compile report makes of it.

A kernel module exposes ``compile_specs() -> list[CompileSpec]``: one entry per
(kernel, dtype, constexpr config) its launcher or autotuner may pick. ``tools/compile_report.py``
compiles each with ``triton.compile`` for the targets it is meant for (sm_90 and sm_80 unless
it says otherwise; no GPU needed) and reads registers, spills, shared memory and matrix
instructions from the cubin.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CompileSpec:
    """One ahead-of-time build of a ``@triton.jit`` function.

    ``signature`` maps every argument name to a Triton type string (``"*bf16"``, ``"i32"``,
    ``"fp32"``, or ``"constexpr"``); ``constexprs`` gives the value of each constexpr.
    ``hot`` marks kernels on a training step's critical path: spills there fail CI.
    ``archs`` are the compute capabilities whose launcher picks this config (a launcher with a
    tile table per GPU generation declares one spec per distinct config).
    ``aligned`` names the arguments a launch usually passes 16-byte aligned (pointers) or
    divisible by 16 (integers): the Triton JIT specializes on that at launch (vectorized and
    pipelined loads depend on it), so the report compiles with the same hint.
    """

    name: str
    fn: object
    signature: dict[str, str]
    constexprs: dict[str, object] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    hot: bool = True
    archs: tuple[int, ...] = (90, 80)
    aligned: tuple[str, ...] = ()

    def __post_init__(self):
        unknown = [name for name in self.aligned if self.signature.get(name, "constexpr") == "constexpr"]
        if unknown:
            raise ValueError(f"aligned must name non-constexpr arguments of {self.name}'s signature, got {unknown}")
