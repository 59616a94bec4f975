"""OpenRLHF's actor on qwenlong kernels: :class:`QwenlongActor` (tested against OpenRLHF 0.11).

``QwenlongActor`` is an ``openrlhf.models.Actor``, so OpenRLHF's ``DeepspeedStrategy`` (which
unwraps ``Actor.model`` in ``prepare``, ``backward`` and ``optimizer_step``) and its trainers take
it as they take their own. ``forward`` returns OpenRLHF's numbers, ``log softmax(logits / T)``
of each next token (``sequences`` rolled by one), cut to the last ``action_mask.shape[1]``
positions and multiplied by ``action_mask``; with ``return_entropy`` the entropy of the same
temperature-scaled distribution in ``output.entropy``, as OpenRLHF computes it.

The difference is how: the padded batch is packed into one row without padding (positions
restarting per sample, which is how our attention finds the boundaries), the model returns its
final hidden states, and ``linear_logprobs`` turns them into per-token numbers without ever
building the ``(batch, length, vocab)`` logits. Padding positions get 0.

    actor = QwenlongActor("path/or/id", temperature=0.6, param_dtype="bf16")   # Actor's arguments
    action_log_probs, output = actor(sequences, action_mask, attention_mask, return_output=True,
                                     return_entropy=True)

OpenRLHF's own ``Actor(..., packing_samples=True)`` on a model loaded with
``attn_implementation="qwenlong"`` (after ``import qwenlong.integrations.hf_attention``) is the
other way in: our attention, OpenRLHF's logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from openrlhf.models import Actor
from transformers.utils import ModelOutput

from qwenlong.integrations.hf import apply_qwenlong, lm_head_weight
from qwenlong.kernels import linear_logprobs


@dataclass
class FusedActorOutput(ModelOutput):
    """The ``output`` of :meth:`QwenlongActor.forward`: no logits; ``entropy`` ``(batch, length - 1)`` if asked."""

    logits: None = None
    entropy: torch.Tensor | None = None


class QwenlongActor(Actor):
    """``openrlhf.models.Actor`` whose log-probs and entropies come from hidden states, never logits.

    ``pretrain_or_model``: a path (loaded by ``Actor`` with its keyword arguments: ``param_dtype``,
    ``lora_rank``, ``ds_config``, ...) or a Qwen2 / Qwen3 / Llama / Mistral HF causal LM.
    ``attention``: switch the model to the ``"qwenlong"`` varlen attention (default True); a path
    is loaded with ``attn_implementation="sdpa"`` unless given, so flash-attn is not needed.
    """

    def __init__(self, pretrain_or_model, temperature: float = 1.0, attention: bool = True, **actor_kwargs):
        if isinstance(pretrain_or_model, str):
            actor_kwargs.setdefault("attn_implementation", "sdpa")
        super().__init__(pretrain_or_model, temperature=temperature, **actor_kwargs)
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model  # LoRA
        apply_qwenlong(base, attention=attention, fused_loss=False)
        self.packing_samples = True  # forward always packs the real tokens into one row

    def forward(self, sequences: torch.LongTensor, action_mask: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, return_output=False, allgather_logits=False,
                return_logprobs=False, ring_attn_group=None, packed_seq_lens=None, return_entropy=False,
                **mm_inputs):
        """Action log-probs ``(batch, action_mask.shape[1])``, or all log-probs ``(batch, length - 1)``
        with ``return_logprobs`` and no ``action_mask``; ``(log_probs, output)`` with ``return_output``.

        ``packed_seq_lens`` is accepted and unused, as in OpenRLHF (the layout comes from
        ``attention_mask``). Raises for what needs logits, ring attention or multimodal inputs.
        """
        if ring_attn_group is not None:
            raise NotImplementedError("ring_attn_group: ring attention is not supported; qwenlong's sequence "
                                      "parallelism is Ulysses: apply_qwenlong(model, sequence_parallel_group=...) "
                                      "with token_logprobs")
        if mm_inputs:
            raise ValueError(f"QwenlongActor: multimodal inputs ({', '.join(sorted(mm_inputs))}) are not supported; "
                             "it serves the text models apply_qwenlong patches")
        if allgather_logits or (action_mask is None and not return_logprobs):
            raise ValueError("QwenlongActor never builds logits: ask for log-probs with action_mask or "
                             "return_logprobs=True (allgather_logits is not supported)")
        if return_entropy and not return_output:
            raise ValueError("return_entropy needs return_output=True (the entropy is returned in output.entropy)")
        if attention_mask is None:
            attention_mask = torch.ones_like(sequences)
        valid = attention_mask.bool()
        positions = attention_mask.long().cumsum(-1) - 1
        hidden = self.model(input_ids=sequences[valid][None], position_ids=positions[valid][None], use_cache=False,
                            return_last_hidden_state=True, return_dict=True).last_hidden_state[0]
        weight = lm_head_weight(self.model)
        if weight.dim() != 2 or weight.numel() == 0:
            raise ValueError("QwenlongActor: the LM head weight is partitioned (ZeRO-3); the fused log-probs need it "
                             "whole: use ZeRO stage 1 or 2, or Actor(packing_samples=True) with the qwenlong attention")
        hidden, targets = hidden.to(weight.dtype), torch.roll(sequences, shifts=-1, dims=1)[valid]
        # OpenRLHF's entropy is that of the temperature-scaled logits, the distribution the log-probs describe
        log_probs = linear_logprobs(hidden, weight, targets, self.temperature, return_entropy=return_entropy)
        entropy = None
        if return_entropy:
            log_probs, entropy = log_probs

        def unpack(per_token: torch.Tensor) -> torch.Tensor:
            return per_token.new_zeros(valid.shape).masked_scatter(valid, per_token)[:, :-1]

        output = FusedActorOutput(entropy=unpack(entropy) if return_entropy else None)
        log_probs = unpack(log_probs)
        if action_mask is not None:
            log_probs = log_probs[:, -action_mask.shape[1]:] * action_mask.float()
        return (log_probs, output) if return_output else log_probs
