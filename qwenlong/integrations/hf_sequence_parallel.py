"""Ulysses sequence parallelism for Hugging Face causal LMs (Qwen2, Qwen3, Llama, ...): the one module.

Each rank of a sequence-parallel group runs the model on its contiguous shard of one packed row
(positions restarting at 0 per sequence, so rotary embeddings see true positions). Every attention
layer goes through ``ulysses_attention`` (registered with transformers as ``"qwenlong_ulysses"``):
it trades the token shard for a head shard (all-to-all), attends whole sequences with
``varlen_attention`` and trades back; everything else in a decoder layer is per token and runs on the
shard unchanged. The attention needs three keyword arguments that the model forwards to its
attention layers: ``sp_group`` and the *whole* padded row's ``cu_seq_lens_q`` / ``max_length_q``
(transformers' flash-attention names). Two entry points pass them:

- ``SequenceParallelCausalLM(model, group)`` (what qwenlong's trainers use): its forward takes one
  rank's shard and returns the final hidden states, never logits; the loss comes from the fused
  ``sp_grpo_loss`` / ``sp_linear_logprobs`` against ``lm_head_weight``::

      model = SequenceParallelCausalLM(AutoModelForCausalLM.from_config(config), sp_group)
      shard = shard_packed_batch(cu_seqlens, sp_group, input_ids=ids, position_ids=pos, labels=labels, ...)
      hidden = model(shard["input_ids"], shard["position_ids"], shard.cu_seqlens, shard.max_seqlen)
      loss, metrics = sp_grpo_loss(hidden, model.lm_head_weight, shard["labels"], ..., sp_group=sp_group)

- ``apply_qwenlong(model, sequence_parallel_group=group)`` (``qwenlong.integrations.hf``), to call the
  model the HF way inside another framework's loop::

      inputs = shard_for_sequence_parallel(input_ids, group, position_ids=pos, labels=labels)
      out = model(**inputs)       # this rank's (1, L) input_ids / position_ids / shift_labels + the row's layout
      out.loss.backward()         # the whole row's loss, the same number on every rank; out.logits is None

  Labels are shifted on the whole row before sharding (``shift_labels``, as transformers names
  pre-shifted labels): a rank's last token predicts the first token of the next rank's shard.
  Without ``cu_seq_lens_q`` the ranks all-gather their ``position_ids`` (one small collective per
  forward) and read the layout from where positions restart, which is how verl's Ulysses path
  calls a model (padded shards of input ids and position ids only).

Parameters are replicated over the SP group and receive partial gradients on each rank: sum them over
the SP and data-parallel ranks (a sum all-reduce; with DDP's mean, scale by the world size). No mask
builder is registered under the attention's name, so transformers hands it no mask.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from transformers import AttentionInterface

from qwenlong.integrations.hf_attention import attention_dtype, position_layout, refuse_unsupported
from qwenlong.kernels import (
    build_position_ids,
    next_token_labels,
    shard_packed_batch,
    sp_linear_logprobs,
    ulysses_attention,
)
from qwenlong.kernels.sequence_parallel import all_gather_tokens

ATTENTION_NAME = "qwenlong_ulysses"


def ulysses_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
):
    """transformers attention function: ``(1, heads, local_tokens, d)`` in, ``(1, local_tokens, heads, d)`` out."""
    if attention_mask is not None:
        raise ValueError("ulysses attention takes packed sequences described by cu_seqlens, not an attention_mask")
    refuse_unsupported(ATTENTION_NAME, dropout, softcap, s_aux)
    if query.shape[0] != 1:
        raise ValueError(f"packed sequences must come as a batch of one, got query shape {tuple(query.shape)}")
    if "sp_group" not in kwargs or "cu_seq_lens_q" not in kwargs:
        raise ValueError("ulysses attention needs sp_group and cu_seq_lens_q: call a model patched by "
                         "apply_qwenlong(model, sequence_parallel_group=...) or wrapped in SequenceParallelCausalLM")
    window = (sliding_window - 1, sliding_window - 1) if sliding_window else (-1, -1)  # as hf_attention
    dtype = attention_dtype(query, value)
    q, k, v = (t[0].transpose(0, 1).to(dtype) for t in (query, key, value))  # (local_tokens, heads, d)
    out = ulysses_attention(
        q, k, v, kwargs["cu_seq_lens_q"], kwargs["max_length_q"], kwargs["sp_group"],
        causal=kwargs.get("is_causal", getattr(module, "is_causal", True)), softmax_scale=scaling, window_size=window,
    )
    return out.unsqueeze(0), None


AttentionInterface.register(ATTENTION_NAME, ulysses_attention_forward)


class SequenceParallelCausalLM(nn.Module):
    """An HF causal LM whose forward takes one rank's token shard and returns its final hidden states.

    Switches the wrapped model's attention to ``"qwenlong_ulysses"``; to generate with it, switch back
    (``model.set_attn_implementation("sdpa")``).
    """

    def __init__(self, model: nn.Module, group=None):
        super().__init__()
        model.set_attn_implementation(ATTENTION_NAME)
        self.model = model
        self.group = group

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The ``(vocab, hidden)`` weight the fused log-prob / loss ops multiply the hidden states with."""
        return self.model.get_output_embeddings().weight

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
    ) -> torch.Tensor:
        """``input_ids``/``position_ids``: this rank's shard ``(local_tokens,)``; ``cu_seqlens``/``max_seqlen``:
        the whole padded batch. Returns hidden states ``(local_tokens, hidden_size)`` after the final norm."""
        if input_ids.dim() != 1 or position_ids.shape != input_ids.shape:
            raise ValueError(f"input_ids and position_ids must both be (local_tokens,), got "
                             f"{tuple(input_ids.shape)} and {tuple(position_ids.shape)}")
        outputs = self.model.base_model(
            input_ids=input_ids[None], position_ids=position_ids[None], use_cache=False,
            sp_group=self.group, cu_seq_lens_q=cu_seqlens, max_length_q=max_seqlen, return_dict=True,
        )
        return outputs.last_hidden_state[0]



def _packed_row(name: str, x: torch.Tensor | None) -> torch.Tensor | None:
    """A packed row ``(T,)`` or ``(1, T)`` as ``(T,)``."""
    if x is None or x.dim() == 1:
        return x
    if x.dim() != 2 or x.shape[0] != 1:
        raise ValueError(f"{name} must be one packed row, (total_tokens,) or (1, total_tokens), got {tuple(x.shape)}")
    return x[0]


def _packed_layout(input_ids, position_ids, cu_seqlens):
    """``(input_ids, position_ids, cu_seqlens)`` of one packed row, positions and ``cu_seqlens`` each built
    from the other where missing."""
    input_ids, position_ids = _packed_row("input_ids", input_ids), _packed_row("position_ids", position_ids)
    if cu_seqlens is None:
        if position_ids is None:
            raise ValueError("position_ids or cu_seqlens is needed to tell where the packed sequences start")
        cu_seqlens, _ = position_layout(position_ids[None], 1, position_ids.numel())
    elif position_ids is None:
        position_ids = build_position_ids(cu_seqlens.diff(), device=input_ids.device)
    return input_ids, position_ids, cu_seqlens


def shard_for_sequence_parallel(input_ids: torch.Tensor, group, *, position_ids: torch.Tensor | None = None,
                                cu_seqlens: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                                ignore_index: int = -100) -> dict:
    """This rank's keyword arguments for a sequence-parallel patched model, from one whole packed row.

    ``input_ids`` (and ``position_ids`` / ``labels``): ``(T,)`` or ``(1, T)``; the sequences are
    given by ``cu_seqlens`` or by ``position_ids`` restarting at 0 (either builds the other).
    ``labels`` are HF's unshifted labels (``ignore_index`` where no loss); each token's label is
    taken from the next token of the same sequence *before* sharding. The row is padded to a
    multiple of the group size with a sequence of its own that no loss sees.

    Returns ``input_ids``, ``position_ids`` [, ``shift_labels``] ``(1, T_pad / P)`` and the whole
    padded row's ``cu_seq_lens_q`` / ``max_length_q``.
    """
    input_ids, position_ids, cu_seqlens = _packed_layout(input_ids, position_ids, cu_seqlens)
    per_token = {"input_ids": input_ids, "position_ids": position_ids}
    if labels is not None:
        per_token["labels"] = next_token_labels(_packed_row("labels", labels), cu_seqlens, ignore_index)
    shard = shard_packed_batch(cu_seqlens, group, ignore_index=ignore_index, **per_token)
    inputs = {"input_ids": shard["input_ids"][None], "position_ids": shard["position_ids"][None],
              "cu_seq_lens_q": shard.cu_seqlens, "max_length_q": shard.max_seqlen}
    if labels is not None:
        inputs["shift_labels"] = shard["labels"][None]
    return inputs


def _local_tokens(args: tuple, kwargs: dict) -> int:
    tokens = kwargs.get("input_ids", args[0] if args else None)
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    if tokens is None or tokens.dim() < 2 or tokens.shape[0] != 1:
        shape = None if tokens is None else tuple(tokens.shape)
        raise ValueError(f"input_ids must be this rank's shard of one packed row, (1, local_tokens), got {shape}")
    return tokens.shape[1]


def sequence_parallel_kwargs(group, args: tuple, kwargs: dict) -> dict:
    """Check one rank's call of a sequence-parallel model; return the keyword arguments for its backbone
    (with ``sp_group`` and the row's ``cu_seq_lens_q`` / ``max_length_q`` that the attention layers read)."""
    if kwargs.get("attention_mask") is not None:
        raise ValueError("attention_mask: a sequence-parallel model takes one packed row described by position_ids "
                         "or cu_seq_lens_q, not a padding mask")
    if len(args) > 1:
        raise ValueError("the arguments after input_ids must be passed by keyword to a sequence-parallel model")
    local = _local_tokens(args, kwargs)
    positions = kwargs.get("position_ids")
    if positions is None or positions.shape != (1, local):
        raise ValueError(f"position_ids must be this rank's shard of the row's positions, shaped (1, {local}), "
                         f"got {None if positions is None else tuple(positions.shape)}")
    world = dist.get_world_size(group)
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None:
        cu_seqlens, max_seqlen = _layout_from_positions(positions[0], group)
    else:
        if int(cu_seqlens[-1]) != world * local:
            raise ValueError(f"cu_seq_lens_q covers {int(cu_seqlens[-1])} tokens, but this rank's shard has {local} "
                             f"tokens x {world} ranks = {world * local}: pass each rank's equal shard of the "
                             f"padded row (shard_for_sequence_parallel)")
        max_seqlen = kwargs.get("max_length_q")
        if max_seqlen is None:
            max_seqlen = int(cu_seqlens.diff().max())
    return {**kwargs, "sp_group": group, "cu_seq_lens_q": cu_seqlens, "max_length_q": int(max_seqlen)}


def _layout_from_positions(positions: torch.Tensor, group) -> tuple[torch.Tensor, int]:
    """The whole row's ``cu_seqlens`` from every rank's position ids (sequences start where positions restart)."""
    lengths = all_gather_tokens(torch.tensor([positions.numel()], device=positions.device), group)
    if not (lengths == lengths[0]).all():
        raise ValueError(f"input_ids: every rank's shard must have the same length, got {lengths.tolist()}")
    row = all_gather_tokens(positions.contiguous(), group)
    return position_layout(row[None], 1, row.numel())


def sequence_parallel_token_logprobs(model: torch.nn.Module, weight: torch.Tensor, group, input_ids, position_ids,
                                     targets, temperature: float, return_entropy: bool, ignore_index: int):
    """Per-token log-probs [and entropies] of a whole packed row, the same on every rank.

    Each rank runs the model on its shard; only the fp32 per-token results are all-gathered
    (differentiable: each rank back-propagates into its own shard).
    """
    input_ids, position_ids, cu_seqlens = _packed_layout(input_ids, position_ids, None)
    shard = shard_packed_batch(cu_seqlens, group, ignore_index=ignore_index, input_ids=input_ids,
                               position_ids=position_ids, labels=_packed_row("targets", targets))
    hidden = model(input_ids=shard["input_ids"][None], position_ids=shard["position_ids"][None],
                   cu_seq_lens_q=shard.cu_seqlens, max_length_q=shard.max_seqlen, use_cache=False,
                   return_last_hidden_state=True, return_dict=True).last_hidden_state[0]
    result = sp_linear_logprobs(hidden.to(weight.dtype), weight, shard["labels"], group, num_tokens=shard.num_tokens,
                                temperature=temperature, return_entropy=return_entropy, ignore_index=ignore_index)
    if return_entropy:
        return tuple(x.view(targets.shape) for x in result)
    return result.view(targets.shape)
