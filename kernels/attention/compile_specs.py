"""The builds of the varlen attention kernels that ``tools/compile_report.py`` compiles ahead of time.

One :class:`CompileSpec` per (kernel, dtype, head_dim) config the launchers in :mod:`.varlen`
may pick, for the tile table of each GPU generation that picks it.
"""

from __future__ import annotations

import torch

from ..utils.compile_spec import CompileSpec
from .varlen import (
    DELTA_BLOCK_M,
    TILES,
    _attn_bwd_delta,
    _attn_bwd_dkdv,
    _attn_bwd_dq,
    _attn_fwd,
    _block_d,
    _configs,
    _dot_precision,
)

DTYPES = ((torch.bfloat16, "bf16"), (torch.float16, "fp16"), (torch.float32, "fp32"))
HEAD_DIMS = (64, 96, 128, 256)


def compile_specs() -> list[CompileSpec]:
    """Every (kernel, dtype, head_dim) build the launchers may pick on sm_90 and sm_80, for the compile report.

    A config both tile tables share is one spec for both targets. Pointers and the token/head
    strides (multiples of head_dim, so of 16 here) are declared aligned, as the Triton JIT
    specializes them at launch: without that hint the loads are neither vectorized nor pipelined.
    """
    specs = []
    for dtype, ty in DTYPES:
        hot = dtype != torch.float32  # training runs bf16/fp16; fp32 is the exact-but-slow path
        for head_dim in HEAD_DIMS:
            by_table = {table: _configs(head_dim, dtype, table) for table in sorted(TILES, reverse=True)}
            shared = {"HEAD_DIM": head_dim, "BLOCK_D": _block_d(head_dim)}
            dot = {"DOT_PRECISION": _dot_precision(dtype)}
            for name, fn, pointers, flags in (
                ("fwd", _attn_fwd, ("Q", "K", "V", "Out"), {}),
                # deterministic: DQ (q's dtype) is passed but unused; atomic: an fp32 accumulator
                ("dkdv", _attn_bwd_dkdv, ("Q", "K", "V", "DO", "DK", "DV", "DQ"), {"ATOMIC_DQ": False}),
                ("dq", _attn_bwd_dq, ("Q", "K", "V", "DO", "DQ"), {}),
                ("dkdv_atomic", _attn_bwd_dkdv, ("Q", "K", "V", "DO", "DK", "DV"), {"ATOMIC_DQ": True}),
            ):
                archs_of_config = {}
                for table, cfgs in by_table.items():
                    archs_of_config.setdefault(tuple(cfgs[name].items()), []).append(table)
                for config, archs in archs_of_config.items():
                    cfg = dict(config)
                    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
                    constexprs = {**shared, **cfg, **dot, **flags}
                    signature = _signature(fn, pointers, ty, constexprs)
                    specs.append(
                        CompileSpec(
                            name=f"attention_{name}_{ty}_d{head_dim}",
                            fn=fn,
                            signature=signature,
                            constexprs=constexprs,
                            num_warps=warps,
                            num_stages=stages,
                            hot=hot,
                            archs=tuple(archs),
                            aligned=_aligned(signature),
                        )
                    )
            constexprs = {**shared, "BLOCK_M": DELTA_BLOCK_M}
            signature = _signature(_attn_bwd_delta, ("Out", "DO"), ty, constexprs)
            specs.append(
                CompileSpec(
                    name=f"attention_delta_{ty}_d{head_dim}",
                    fn=_attn_bwd_delta,
                    signature=signature,
                    constexprs=constexprs,
                    num_warps=4,
                    num_stages=1,
                    hot=False,
                    aligned=_aligned(signature),
                )
            )
    return specs


def _aligned(signature: dict[str, str]) -> tuple[str, ...]:
    """Pointers and token/head strides (multiples of head_dim); lse/delta rows are strided by total_q."""
    return tuple(
        name
        for name, ty in signature.items()
        if ty.startswith("*") or (name.startswith("stride_") and name not in ("stride_lh", "stride_dh"))
    )


def _signature(fn, data_pointers, ty: str, constexprs: dict) -> dict[str, str]:
    """Triton type strings for ``fn``'s arguments: data pointers in ``ty``, lse/delta (and any other DQ) fp32,
    tile tables i32."""
    types = {}
    for name in fn.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name in data_pointers:
            types[name] = f"*{ty}"
        elif name in ("Lse", "Delta", "DQ"):  # DQ when not a data pointer: the atomic path's fp32 buffer
            types[name] = "*fp32"
        elif name.startswith("cu_seqlens") or name in ("TileSeq", "TileBlock"):
            types[name] = "*i32"
        elif name in ("qk_scale", "softmax_scale"):
            types[name] = "fp32"
        else:
            types[name] = "i32"
    return types
