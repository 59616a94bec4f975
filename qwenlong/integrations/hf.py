"""Patch a loaded Hugging Face causal LM to train on qwenlong kernels, in the style of Liger-Kernel.

    model = AutoModelForCausalLM.from_pretrained(...)
    apply_qwenlong(model)                      # attention -> "qwenlong", fused LM-head loss
    out = model(input_ids=ids, position_ids=pos, labels=labels)
    out.loss.backward()                        # out.logits is None: no (tokens x vocab) tensor was made

What changes (on this model instance only; Liger patches the classes instead):

- ``attention=True``: the model's attention runs ``varlen_attention`` (transformers
  implementation ``"qwenlong"``, see :mod:`.hf_attention`): packed rows whose ``position_ids``
  restart per sequence, ``cu_seq_lens_*`` kwargs, or padded batches with an ``attention_mask``.
- ``fused_loss=True``: a forward given ``labels`` (or pre-shifted ``shift_labels``) computes
  transformers' causal-LM loss, ``sum of -log p(label) / num_items_in_batch`` (the mean over
  non-ignored labels when not given), through ``linear_cross_entropy`` on the final hidden
  states and returns ``logits=None``. Without labels the forward is the original one, so
  ``generate`` is unchanged.
- Always: ``model(..., return_last_hidden_state=True)`` returns the final hidden states (after
  the last norm) without the LM head; :func:`token_logprobs` builds per-token log-probs (and
  entropies) on it with ``linear_logprobs``. Going through ``model(...)`` keeps DDP/FSDP
  wrappers in the loop.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput

from qwenlong.kernels import linear_cross_entropy, linear_logprobs
from qwenlong.trainers.packed import IGNORE_INDEX, lm_head_weight

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_ORIGINAL_FORWARD = "_qwenlong_original_forward"


@dataclass
class FusedCausalLMOutput(ModelOutput):
    """Output of a patched forward in fused mode: never any logits.

    loss: the causal-LM loss when labels were given; last_hidden_state: ``(batch, length, d)``
    when asked for with ``return_last_hidden_state=True``; cache / hidden_states / attentions
    as the backbone returned them.
    """

    loss: torch.Tensor | None = None
    logits: None = None
    last_hidden_state: torch.Tensor | None = None
    cache: object | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


def _check_supported(model: torch.nn.Module) -> None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model: apply_qwenlong supports causal LMs of type {SUPPORTED_MODEL_TYPES}, "
                         f"got {type(model).__name__} with model_type {model_type!r}")
    if model.get_output_embeddings() is None:
        raise ValueError(f"model: {type(model).__name__} has no LM head; pass a *ForCausalLM model")
    lm_head_weight(model)  # raises for a biased head, which the fused ops cannot express


def _shifted_labels(labels: torch.Tensor | None, shift_labels: torch.Tensor | None) -> torch.Tensor:
    """Targets aligned with the hidden states: position t predicts label t + 1 (as transformers shifts)."""
    if shift_labels is not None:
        return shift_labels
    return torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def _causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, num_items_in_batch):
    """transformers' ``ForCausalLMLoss`` (sum over labels / ``num_items_in_batch``, else mean) without logits."""
    hidden = hidden.reshape(-1, hidden.shape[-1]).to(weight.dtype)
    targets = targets.reshape(-1).to(hidden.device)
    if num_items_in_batch is None:
        return linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE_INDEX, reduction="mean")
    total = linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / torch.as_tensor(num_items_in_batch, device=total.device)


def _patched_forward(original_forward, fused_loss: bool):
    def forward(self, *args, labels=None, shift_labels=None, num_items_in_batch=None, return_last_hidden_state=False,
                **kwargs):
        wants_loss = fused_loss and (labels is not None or shift_labels is not None)
        if not (wants_loss or return_last_hidden_state):
            extra = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            return original_forward(*args, **{k: v for k, v in extra.items() if v is not None}, **kwargs)
        if len(args) > 5:
            raise ValueError("labels and later arguments must be passed by keyword to a qwenlong-patched forward")
        kwargs.pop("logits_to_keep", None)  # no logits are made in this mode
        outputs = getattr(self, self.base_model_prefix)(*args, **kwargs)
        hidden = outputs.last_hidden_state
        loss = None
        if wants_loss:
            loss = _causal_lm_loss(hidden, lm_head_weight(self), _shifted_labels(labels, shift_labels),
                                   num_items_in_batch)
        elif labels is not None or shift_labels is not None:  # fused_loss=False: the original loss on logits
            logits = self.get_output_embeddings()(hidden)
            loss = self.loss_function(logits=logits, labels=labels, shift_labels=shift_labels,
                                      vocab_size=logits.shape[-1], num_items_in_batch=num_items_in_batch)
        return FusedCausalLMOutput(
            loss=loss, last_hidden_state=hidden, cache=getattr(outputs, "cache", None),
            hidden_states=outputs.hidden_states, attentions=outputs.attentions,
        )

    return forward


def apply_qwenlong(model: torch.nn.Module, *, attention: bool = True, fused_loss: bool = True,
                   sequence_parallel_group=None) -> torch.nn.Module:
    """Patch ``model`` (a loaded Qwen2 / Qwen3 / Llama / Mistral ``*ForCausalLM``) in place; returns it.

    Applying twice re-patches from the original forward. ``sequence_parallel_group`` is not
    supported here: a sequence-parallel rank must receive its shard of the packed tokens and the
    whole batch's ``cu_seqlens``, which a plain HF forward call does not carry; use
    :class:`qwenlong.models.SequenceParallelCausalLM` with ``shard_packed_batch`` and ``sp_grpo_loss``.
    """
    if sequence_parallel_group is not None:
        raise NotImplementedError(
            "apply_qwenlong(sequence_parallel_group=...): a plain HF forward has no way to pass each rank's "
            "token shard with the whole batch's cu_seqlens; wrap the model in "
            "qwenlong.models.SequenceParallelCausalLM and compute the loss with qwenlong.kernels.sp_grpo_loss")
    _check_supported(model)
    if attention:
        from qwenlong.integrations import hf_attention

        model.set_attn_implementation(hf_attention.NAME)
    original = getattr(model, _ORIGINAL_FORWARD, model.forward)
    setattr(model, _ORIGINAL_FORWARD, original)
    # keep the class forward's signature: generate() validates its model kwargs against it
    forward = functools.wraps(type(model).forward)(_patched_forward(original, fused_loss))
    model.forward = types.MethodType(forward, model)
    return model


def _as_rows(x: torch.Tensor | None) -> torch.Tensor | None:
    """A packed ``(length,)`` row as a batch of one; ``(batch, length)`` and None unchanged."""
    return x if x is None or x.dim() == 2 else x[None]


def token_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor | None,
                   targets: torch.Tensor, temperature: float = 1.0, *, attention_mask: torch.Tensor | None = None,
                   return_entropy: bool = False, ignore_index: int = IGNORE_INDEX):
    """Per-token ``log softmax(logits / temperature)[target]`` of a patched model, without logits.

    ``input_ids``, ``position_ids`` and ``targets`` are ``(batch, length)`` or one packed row
    ``(length,)`` (positions restarting at 0 for each sequence); ``targets[t]`` is the token that
    position ``t`` predicts, ``ignore_index`` where none (log-prob and entropy 0 there).
    Returns fp32 log-probs shaped like ``targets`` [and the entropies].
    """
    if not hasattr(getattr(model, "module", model), _ORIGINAL_FORWARD):
        raise ValueError("model: call apply_qwenlong(model) before token_logprobs")
    if targets.shape != input_ids.shape:
        raise ValueError(f"targets must have the shape of input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(targets.shape)}")
    hidden = model(input_ids=_as_rows(input_ids), position_ids=_as_rows(position_ids),
                   attention_mask=_as_rows(attention_mask),
                   use_cache=False, return_last_hidden_state=True).last_hidden_state
    weight = lm_head_weight(getattr(model, "module", model))
    result = linear_logprobs(hidden.reshape(-1, hidden.shape[-1]).to(weight.dtype), weight, targets.reshape(-1),
                             temperature, return_entropy=return_entropy, ignore_index=ignore_index)
    if return_entropy:
        return tuple(x.view(targets.shape) for x in result)
    return result.view(targets.shape)
