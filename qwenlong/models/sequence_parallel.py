"""Run a Hugging Face causal LM (Qwen2, Qwen3, Llama, ...) with Ulysses sequence parallelism.

Each rank feeds its contiguous shard of the packed tokens (from ``shard_packed_batch``) with
the matching shard of position ids, so rotary embeddings see true positions. Every attention
layer goes through ``ulysses_attention`` (transformers attention ``"qwenlong_ulysses"``, defined in
:mod:`qwenlong.integrations.hf_ulysses`); everything else in a decoder layer is per token and runs on the
shard unchanged. The model returns the final hidden states of the shard, never logits: the
loss comes from the fused ``sp_grpo_loss`` / ``sp_linear_logprobs`` against the LM-head weight.

    model = SequenceParallelCausalLM(AutoModelForCausalLM.from_config(config), sp_group)
    shard = shard_packed_batch(cu_seqlens, sp_group, input_ids=ids, position_ids=pos, labels=labels, ...)
    hidden = model(shard["input_ids"], shard["position_ids"], shard.cu_seqlens, shard.max_seqlen)
    loss, metrics = sp_grpo_loss(hidden, model.lm_head_weight, shard["labels"], ..., sp_group=sp_group)

To call an HF model the HF way instead (``model(**inputs).loss``, ``shift_labels``, ``token_logprobs``),
patch it with ``qwenlong.integrations.hf.apply_qwenlong(model, sequence_parallel_group=sp_group)``.

Parameters are replicated over the SP group and receive partial gradients on each rank: sum
them over the SP and data-parallel ranks (a sum all-reduce; with DDP's mean, scale by the world size).
"""

from __future__ import annotations

import torch
from torch import nn

from qwenlong.integrations.hf_ulysses import ATTENTION_NAME, ulysses_attention_forward

__all__ = ["ATTENTION_NAME", "SequenceParallelCausalLM", "ulysses_attention_forward"]


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
            sp_group=self.group, cu_seq_lens_q=cu_seqlens, max_length_q=max_seqlen,
        )
        return outputs.last_hidden_state[0]
