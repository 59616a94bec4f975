"""qwenlong.kernels: drop-in fused ops for long-context training. torch + triton only.

Every public op picks its path from the tensors it is given, in one place (:mod:`.backend`): Triton
on CUDA tensors, the CUDA extension where one exists, and a memory-efficient PyTorch
implementation on CPU tensors. Under ``TRITON_INTERPRET=1`` (set it before importing this package:
Triton reads it when a kernel is defined) CPU tensors run the Triton kernels in the interpreter.
"""

from __future__ import annotations

if __name__ == "kernels":
    # Imported by the top-level name "kernels": Python started in a qwenlong checkout, whose root (on sys.path)
    # holds this folder, and something asked for the package of that name (transformers imports one). This
    # folder is only ever qwenlong.kernels: the name goes to the installed package, or where there is none, to
    # an empty namespace (what a folder without __init__.py would give; transformers reads it as "not installed").
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys
    import types as _types

    _checkout = _os.path.dirname(_os.path.dirname(_os.path.realpath(__file__)))
    _elsewhere = [entry for entry in _sys.path if _os.path.realpath(entry or _os.getcwd()) != _checkout]
    _spec = _machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None:
        _sys.modules["kernels"] = _types.ModuleType("kernels", "An empty namespace: see qwenlong.kernels")
        _sys.modules["kernels"].__path__ = []
    else:  # the import statement returns what sys.modules holds for the name once this file has run
        _sys.modules["kernels"] = _util.module_from_spec(_spec)
        _spec.loader.exec_module(_sys.modules["kernels"])
else:
    from . import backend, sequence_parallel
    from .attention import flash_attn_varlen_func, varlen_attention
    from .logprobs import grpo_loss, linear_cross_entropy, linear_logprobs
    from .packing import (
        balance_and_pack,
        balance_partitions,
        build_cu_seqlens,
        build_position_ids,
        pack_by_token_budget,
    )
    from .rotary import apply_rotary_packed
    from .sequence_parallel import (
        ShardedBatch,
        gather_per_token,
        new_sequence_parallel_groups,
        next_token_labels,
        shard_packed_batch,
        sp_grpo_loss,
        sp_linear_logprobs,
        ulysses_attention,
    )

    __all__ = [
        "ShardedBatch",
        "apply_rotary_packed",
        "backend",
        "balance_and_pack",
        "balance_partitions",
        "build_cu_seqlens",
        "build_position_ids",
        "flash_attn_varlen_func",
        "gather_per_token",
        "grpo_loss",
        "linear_cross_entropy",
        "linear_logprobs",
        "new_sequence_parallel_groups",
        "next_token_labels",
        "pack_by_token_budget",
        "sequence_parallel",
        "shard_packed_batch",
        "sp_grpo_loss",
        "sp_linear_logprobs",
        "ulysses_attention",
        "varlen_attention",
    ]
