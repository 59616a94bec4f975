"""Attention over packed variable-length sequences: Triton kernels, a blockwise PyTorch path, a reference."""

from .compile_specs import compile_specs
from .flash_compat import flash_attn_varlen_func
from .reference import attention_reference
from .varlen import varlen_attention

__all__ = ["attention_reference", "compile_specs", "flash_attn_varlen_func", "varlen_attention"]
