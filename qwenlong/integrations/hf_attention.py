"""``varlen_attention`` as a transformers attention implementation named ``"qwenlong"``.

After ``import qwenlong.integrations.hf_attention`` (or :func:`register`),
``AutoModelForCausalLM.from_config(cfg, attn_implementation="qwenlong")`` runs Qwen2, Qwen3,
Llama and other models that dispatch through ``AttentionInterface``. Inputs are handled as
transformers' flash-attention path does:

- padded batches: the 2-D ``attention_mask`` (1 = token, 0 = padding) is turned into
  ``cu_seqlens`` and the tokens are packed (queries take the mask's last ``q_len`` columns,
  i.e. left padding when decoding with a cache); padded query rows return 0;
- packed batches: ``cu_seq_lens_q/k`` and ``max_length_q/k`` kwargs when given (as from
  ``DataCollatorWithFlattening``), else ``position_ids`` that restart mark new sequences;
- otherwise each batch row is one sequence (bottom-right causal alignment covers decoding).

The mask builder registered beside it is transformers' own flash-attention one, which hands
the attention function the 2-D padding mask (or ``None``) instead of a 4-D matrix.

Two names, one function: ``"qwenlong"`` runs the deterministic backward (bitwise reproducible and
packing-invariant), ``"qwenlong_atomic"`` the faster one that adds dq with fp32 atomics
(``varlen_attention(deterministic=False)``, as flash-attn's default backward; see docs/attention.md).
The forward is the same.
"""

from __future__ import annotations

import functools

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from qwenlong.kernels.attention import varlen_attention

NAME = "qwenlong"
ATOMIC_NAME = "qwenlong_atomic"


def _cu_seqlens(lengths: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def _row_layout(batch: int, length: int, device) -> tuple[torch.Tensor, int]:
    return torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=device), length


def position_layout(position_ids: torch.Tensor, batch: int, length: int) -> tuple[torch.Tensor, int]:
    """Sequences start at each row start and wherever the position stops increasing."""
    positions = position_ids.expand(batch, length).reshape(-1)
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[1:] = positions[1:] <= positions[:-1]
    starts[::length] = True
    cu_seqlens = torch.cat([starts.nonzero().flatten(), torch.tensor([positions.numel()], device=positions.device)])
    cu_seqlens = cu_seqlens.to(torch.int32)
    return cu_seqlens, int(cu_seqlens.diff().max())


def refuse_unsupported(name: str, dropout: float, softcap: float | None, s_aux: torch.Tensor | None) -> None:
    """What ``varlen_attention`` does not compute is refused by name, never dropped: attention dropout, logit
    softcapping (Gemma 2/3) and attention sinks (``s_aux``, gpt-oss)."""
    if dropout:
        raise ValueError(f"dropout must be 0: attention dropout is not supported by '{name}', got {dropout}")
    if softcap:
        raise ValueError(f"softcap is not supported by '{name}', got {softcap}")
    if s_aux is not None:
        raise ValueError(f"s_aux (attention sinks) is not supported by '{name}'")


def attention_dtype(query: torch.Tensor, value: torch.Tensor) -> torch.dtype:
    """The one dtype q, k and v are run in: under autocast, rotary leaves q/k in fp32 while v comes in the
    autocast dtype, which is taken; else v's."""
    device_type = query.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else value.dtype


def qwenlong_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    s_aux: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    *,
    deterministic: bool = True,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query ``(batch, heads, q_len, d)``, key/value ``(batch, kv_heads, kv_len, d)`` ->
    ``(batch, q_len, heads, d)`` and no attention weights. ``deterministic``: which backward
    ``varlen_attention`` runs (``"qwenlong_atomic"`` registers this function with False)."""
    refuse_unsupported(NAME, dropout, softcap, s_aux)
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"attention_mask must be a 2-D padding mask for '{NAME}' (its mask builder gives one), "
            f"got shape {tuple(attention_mask.shape)}"
        )
    batch, heads, q_len, head_dim = query.shape
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    window = (sliding_window - 1, sliding_window - 1) if sliding_window else (-1, -1)  # as transformers' FA path
    dtype = attention_dtype(query, value)
    q, k, v = (x.transpose(1, 2).to(dtype) for x in (query, key, value))  # (batch, length, heads, d)

    if attention_mask is not None:
        k, v = k[:, : attention_mask.shape[1]], v[:, : attention_mask.shape[1]]  # a static cache may be longer
        kv_mask = attention_mask.bool()
        q_mask = kv_mask[:, -q_len:]
        q_index, k_index = q_mask.flatten().nonzero().flatten(), kv_mask.flatten().nonzero().flatten()
        q_lens, k_lens = q_mask.sum(1), kv_mask.sum(1)
        packed = varlen_attention(
            q.reshape(-1, heads, head_dim)[q_index],
            k.reshape(-1, *k.shape[2:])[k_index],
            v.reshape(-1, *v.shape[2:])[k_index],
            _cu_seqlens(q_lens),
            _cu_seqlens(k_lens),
            int(q_lens.max()),
            int(k_lens.max()),
            softmax_scale=scaling,
            causal=causal,
            window_size=window,
            deterministic=deterministic,
        )
        out = packed.new_zeros(batch * q_len, heads, head_dim).index_copy(0, q_index, packed)
        return out.view(batch, q_len, heads, head_dim), None

    kv_len = k.shape[1]
    if cu_seq_lens_q is not None and cu_seq_lens_k is not None:
        cu_q, cu_k = cu_seq_lens_q.to(torch.int32), cu_seq_lens_k.to(torch.int32)
        max_q, max_k = int(max_length_q), int(max_length_k)
    elif position_ids is not None and position_ids.dim() == 2 and q_len == kv_len:
        cu_q, max_q = position_layout(position_ids.to(q.device), batch, q_len)
        cu_k, max_k = cu_q, max_q
    else:
        cu_q, max_q = _row_layout(batch, q_len, q.device)
        cu_k, max_k = _row_layout(batch, kv_len, q.device)
    out = varlen_attention(
        q.reshape(-1, heads, head_dim),
        k.reshape(-1, *k.shape[2:]),
        v.reshape(-1, *v.shape[2:]),
        cu_q,
        cu_k,
        max_q,
        max_k,
        softmax_scale=scaling,
        causal=causal,
        window_size=window,
        deterministic=deterministic,
    )
    return out.view(batch, q_len, heads, head_dim), None


qwenlong_atomic_attention_forward = functools.partial(qwenlong_attention_forward, deterministic=False)


def register() -> None:
    """Register both attention functions and their mask builder as ``"qwenlong"`` and
    ``"qwenlong_atomic"`` (idempotent)."""
    for name, forward in ((NAME, qwenlong_attention_forward), (ATOMIC_NAME, qwenlong_atomic_attention_forward)):
        AttentionInterface.register(name, forward)
        AttentionMaskInterface.register(name, flash_attention_mask)


register()
