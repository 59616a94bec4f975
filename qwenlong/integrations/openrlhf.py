"""OpenRLHF's actor log-prob computation on qwenlong kernels: :class:`QwenlongActor`.

OpenRLHF is not a dependency (too heavy to install alongside this package), so nothing here
imports it. ``QwenlongActor.forward`` has the signature of ``openrlhf.models.Actor.forward``
and returns the same numbers: ``log softmax(logits / temperature)`` of each next token
(``sequences`` rolled by one), cut to the last ``action_mask.shape[1]`` positions and
multiplied by ``action_mask``; with ``return_entropy`` the entropy of the untempered
distribution, as OpenRLHF computes it, in ``output.entropy``.

The difference is how: the padded batch is packed into one row without padding (positions
restarting per sample, which is how our attention finds the boundaries), the model returns its
final hidden states, and ``linear_logprobs`` turns them into per-token numbers without ever
building the ``(batch, length, vocab)`` logits. Padding positions get 0.

    actor = QwenlongActor(hf_model, temperature=1.0)
    action_log_probs, output = actor(sequences, action_mask, attention_mask, return_output=True,
                                     return_entropy=True)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput

from qwenlong.integrations.hf import apply_qwenlong, lm_head_weight
from qwenlong.kernels import linear_logprobs


@dataclass
class FusedActorOutput(ModelOutput):
    """The ``output`` of :meth:`QwenlongActor.forward`: no logits; ``entropy`` ``(batch, length - 1)`` if asked."""

    logits: None = None
    entropy: torch.Tensor | None = None


class QwenlongActor(torch.nn.Module):
    """``openrlhf.models.Actor`` for log-probs: wraps a Qwen2 / Qwen3 / Llama / Mistral HF causal LM.

    ``attention``: switch the model to the ``"qwenlong"`` varlen attention (default True).
    """

    def __init__(self, model: torch.nn.Module, temperature: float = 1.0, attention: bool = True):
        super().__init__()
        self.model = apply_qwenlong(model, attention=attention, fused_loss=False)
        self.temperature = temperature

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        self.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs=gradient_checkpointing_kwargs or {"use_reentrant": False})

    def gradient_checkpointing_disable(self):
        self.model.gradient_checkpointing_disable()

    def forward(self, sequences: torch.LongTensor, action_mask: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, return_output=False, allgather_logits=False,
                return_logprobs=False, ring_attn_group=None, packed_seq_lens=None, return_entropy=False):
        """Action log-probs ``(batch, action_mask.shape[1])``, or all log-probs ``(batch, length - 1)``
        with ``return_logprobs`` and no ``action_mask``; ``(log_probs, output)`` with ``return_output``.

        ``packed_seq_lens`` is accepted and unused, as in OpenRLHF (the layout comes from
        ``attention_mask``). Raises for what needs logits or ring attention.
        """
        if ring_attn_group is not None:
            raise NotImplementedError("ring_attn_group: ring attention is not supported; qwenlong's sequence "
                                      "parallelism is Ulysses: apply_qwenlong(model, sequence_parallel_group=...) "
                                      "with token_logprobs")
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
                            return_last_hidden_state=True).last_hidden_state[0]
        weight = lm_head_weight(self.model)
        hidden, targets = hidden.to(weight.dtype), torch.roll(sequences, shifts=-1, dims=1)[valid]
        # OpenRLHF's entropy is that of the untempered logits: one pass gives both only at temperature 1
        same_pass = return_entropy and self.temperature == 1.0
        log_probs = linear_logprobs(hidden, weight, targets, self.temperature, return_entropy=same_pass)
        if same_pass:
            log_probs, entropy = log_probs
        elif return_entropy:
            entropy = linear_logprobs(hidden, weight, targets, 1.0, return_entropy=True)[1]

        def unpack(per_token: torch.Tensor) -> torch.Tensor:
            return per_token.new_zeros(valid.shape).masked_scatter(valid, per_token)[:, :-1]

        output = FusedActorOutput(entropy=unpack(entropy) if return_entropy else None)
        log_probs = unpack(log_probs)
        if action_mask is not None:
            log_probs = log_probs[:, -action_mask.shape[1]:] * action_mask.float()
        return (log_probs, output) if return_output else log_probs
