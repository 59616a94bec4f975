"""The builds of the fused LM-head kernels that ``tools/compile_report.py`` compiles ahead of time.

One spec per kernel x input dtype x constexpr flag combination the launcher in
:mod:`.linear_logprobs` may pick, per tile table where they differ (tiles depend on dtype and GPU
generation only: the same for every d >= 32).
fp32 inputs are marked not hot: training runs bf16, and fp32 has no tensor-core path here.
"""

from __future__ import annotations

import itertools

import torch

from ..utils.compile_spec import CompileSpec
from .linear_logprobs import (
    COMBINE_BLOCK,
    _combine_kernel,
    _dlogits_kernel,
    _forward_kernel,
    _grad_hidden_kernel,
    _grad_weight_kernel,
    block_config,
    gemm_reads_by_descriptor,
    launch_options,
)

TRITON_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
TILE_TABLES = (90, 80)  # sm_90, and every other GPU (kernels.backend.tile_table)
# kernel -> (launch kind, argument types other than the hidden/weight pointers and constexprs, constexpr flags)
_INDEX = {"order_ptr": "*i64", "num_valid_ptr": "*i64"}
_KERNELS = {
    "fwd": (_forward_kernel, "forward", {"targets_ptr": "*i64"} | _INDEX | dict.fromkeys(
        ("partial_ptr", "logits_ptr"), "*fp32")
        | dict.fromkeys(("token_start", "partial_stride", "logits_rows", "logits_stride", "V", "D", "split_cols",
                         "num_splits"), "i32")
        | {"inv_temperature": "fp32"},
        ("WITH_ENTROPY", "WITH_MEAN", "STORE_LOGITS")),
    "dlogits": (_dlogits_kernel, "dlogits", {"targets_ptr": "*i64"} | _INDEX | dict.fromkeys(
        ("lse_ptr", "entropy_ptr", "grad_logp_ptr", "grad_entropy_ptr", "grad_mean_ptr", "logits_ptr"), "*fp32")
        | {"dlogits_ptr": "*{dtype}", "token_start": "i32", "vocab_start": "i32", "V": "i32", "D": "i32",
           "inv_temperature": "fp32", "chunk_stride": "i32", "logits_stride": "i32"},
        ("WITH_ENTROPY_GRAD", "WITH_MEAN_GRAD", "FROM_LOGITS")),
    # out_ptr: the gradient in the input dtype (the last step's store; the other steps store fp32 partial sums)
    "grad_hidden": (_grad_hidden_kernel, "gemm", {"dlogits_ptr": "*{dtype}", "weight_ptr": "*{dtype}"} | _INDEX
                    | {"sum_ptr": "*fp32", "out_ptr": "*{dtype}", "token_start": "i32", "vocab_start": "i32",
                       "num_cols": "i32", "D": "i32", "chunk_stride": "i32", "chunk_rows": "i32"},
                    ("ACCUMULATE", "FINAL")),
    "grad_weight": (_grad_weight_kernel, "gemm", {"dlogits_ptr": "*{dtype}", "hidden_ptr": "*{dtype}"} | _INDEX
                    | {"sum_ptr": "*fp32", "out_ptr": "*{dtype}", "token_start": "i32", "num_cols": "i32",
                       "D": "i32", "chunk_stride": "i32", "chunk_rows": "i32"}, ("ACCUMULATE",)),
}


# at d = 5120 and chunk strides of 8192 the JIT sees these integers divisible by 16 (pointers: 16-byte aligned);
# slices are whole vocabulary tiles
_ALIGNED = ("D", "chunk_stride", "split_cols")


def compile_specs() -> list[CompileSpec]:
    """Every build the launcher may pick: each kernel x input dtype x flag combination, one spec per config the
    tile tables give it (a config both tables share is one spec for both targets)."""
    specs = []
    for dtype, type_name in TRITON_DTYPES.items():
        for kind, (kernel, launch_kind, types, flags) in _KERNELS.items():
            constexprs, _ = _launch(kernel, block_config(4096, dtype, 90), launch_kind, dtype)
            given = {"hidden_ptr": f"*{type_name}", "weight_ptr": f"*{type_name}"}
            given |= {name: kind_.format(dtype=type_name) for name, kind_ in types.items()}
            given |= dict.fromkeys((*flags, *constexprs), "constexpr")
            signature = {name: given[name] for name in kernel.arg_names}  # in the kernel's argument order
            for values in itertools.product((False, True), repeat=len(flags)):
                flag_values = dict(zip(flags, values, strict=True))
                launched_as = "forward_keep_logits" if flag_values.get("STORE_LOGITS") else launch_kind
                archs_of_config = {}
                for table in TILE_TABLES:
                    constexprs, launch = _launch(kernel, block_config(4096, dtype, table), launched_as, dtype)
                    archs_of_config.setdefault(repr((constexprs, launch)), (constexprs, launch, []))[2].append(table)
                suffix = "_".join(f"{flag.removeprefix('WITH_').split('_')[0].lower()}{int(v)}"
                                  for flag, v in zip(flags, values, strict=True))
                for constexprs, launch, archs in archs_of_config.values():
                    specs.append(CompileSpec(
                        name=f"logprobs_{kind}_{type_name}_{suffix}", fn=kernel, signature=signature,
                        constexprs=flag_values | constexprs, hot=dtype != torch.float32, archs=tuple(archs),
                        aligned=tuple(name for name in signature if name in _ALIGNED or signature[name].startswith("*")),
                        **launch,
                    ))
    specs += [_combine_spec(with_entropy, with_mean) for with_entropy, with_mean in itertools.product((False, True),
                                                                                                     repeat=2)]
    return specs


def _launch(kernel, config: dict, kind: str, dtype: torch.dtype) -> tuple[dict, dict]:
    """:func:`launch_options`, plus ``DESCRIBED`` where the kernel takes it, as the launcher sets it for an aligned
    d = 4096 weight."""
    constexprs, launch = launch_options(config, kind)
    if "DESCRIBED" in kernel.arg_names:
        constexprs["DESCRIBED"] = gemm_reads_by_descriptor(torch.empty((1, 4096), dtype=dtype, device="meta"), config)
    return constexprs, launch


def _combine_spec(with_entropy: bool, with_mean: bool) -> CompileSpec:
    """The forward's slice merge: per-row fp32 arithmetic, no MMA, one build for every input dtype (launched
    with the JIT's default warps and stages)."""
    types = _INDEX | dict.fromkeys(("partial_ptr", "logp_ptr", "entropy_ptr", "mean_logp_ptr", "lse_ptr"), "*fp32")
    types |= dict.fromkeys(("token_start", "partial_stride", "num_splits", "V"), "i32")
    types |= dict.fromkeys(("WITH_ENTROPY", "WITH_MEAN", "BLOCK"), "constexpr")
    signature = {name: types[name] for name in _combine_kernel.arg_names}
    return CompileSpec(
        name=f"logprobs_combine_entropy{int(with_entropy)}_mean{int(with_mean)}", fn=_combine_kernel,
        signature=signature, constexprs={"WITH_ENTROPY": with_entropy, "WITH_MEAN": with_mean, "BLOCK": COMBINE_BLOCK},
        hot=False, aligned=tuple(name for name in signature if name in _ALIGNED or signature[name].startswith("*")),
    )
