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
- ``sequence_parallel_group=group``: each rank of the group runs its token shard of one packed
  row (Ulysses attention); the loss and :func:`token_logprobs` are the whole row's:

      apply_qwenlong(model, sequence_parallel_group=sp_group)
      out = model(**shard_for_sequence_parallel(ids, sp_group, position_ids=pos, labels=labels))
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers.utils import ModelOutput

from qwenlong.integrations import hf_attention, hf_sequence_parallel
from qwenlong.integrations.hf_sequence_parallel import shard_for_sequence_parallel
from qwenlong.kernels import linear_cross_entropy, linear_logprobs
from qwenlong.kernels.sequence_parallel import all_reduce_sum, global_token_count, kv_head_repeats

__all__ = ["FusedCausalLMOutput", "apply_qwenlong", "lm_head_weight", "shard_for_sequence_parallel",
           "token_logprobs"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe")
IGNORE_INDEX = -100
_ORIGINAL_FORWARD = "_qwenlong_original_forward"
_SEQUENCE_PARALLEL_GROUP = "_qwenlong_sequence_parallel_group"


def lm_head_weight(model: torch.nn.Module) -> torch.Tensor:
    """The ``(V, d)`` weight the fused losses multiply hidden states with."""
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError("model: LM heads with a bias are not supported by the fused losses")
    return head.weight


@dataclass
class FusedCausalLMOutput(ModelOutput):
    """Output of a patched forward in fused mode: never any logits.

    loss: the causal-LM loss when labels were given; last_hidden_state: ``(batch, length, d)``
    when asked for with ``return_last_hidden_state=True``; cache / hidden_states / attentions
    as the backbone returned them. With ``return_dict=False`` (per call or in the config) the
    forward returns its ``to_tuple()`` instead, as transformers does: loss first when there is one.
    A forward given labels refuses ``output_router_logits=True`` (see :func:`check_no_router_loss`).
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
    check_no_router_loss(model)


def check_no_router_loss(model: torch.nn.Module) -> None:
    """Raise when a Mixture-of-Experts model asks for its router's load-balancing loss.

    The fused losses (and the trainers, which run the decoder and the LM head themselves) compute the
    causal-LM loss alone; transformers adds ``router_aux_loss_coef x`` the load-balancing loss only when
    ``output_router_logits`` is set (off by default, and off in the released Qwen3 MoE configs), so a
    model that sets it would silently train without that term.
    """
    if getattr(getattr(model, "config", None), "output_router_logits", False):
        raise ValueError(f"model: {type(model).__name__} sets output_router_logits=True, but the fused loss does not "
                         "add the router's load-balancing loss; set config.output_router_logits=False")


def _check_sequence_parallel(model: torch.nn.Module, group, attention: bool, fused_loss: bool) -> None:
    if not (attention and fused_loss):
        raise ValueError(f"sequence_parallel_group needs attention=True and fused_loss=True (Ulysses attention and "
                         f"the whole row's loss), got attention={attention}, fused_loss={fused_loss}")
    config = model.config
    heads = config.num_attention_heads
    kv_head_repeats(heads, getattr(config, "num_key_value_heads", None) or heads, dist.get_world_size(group))


def _shifted_labels(labels: torch.Tensor | None, shift_labels: torch.Tensor | None) -> torch.Tensor:
    """Targets aligned with the hidden states: position t predicts label t + 1 (as transformers shifts)."""
    if shift_labels is not None:
        return shift_labels
    return torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def _causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, num_items_in_batch,
                    sequence_parallel_group=None):
    """transformers' ``ForCausalLMLoss`` (sum over labels / ``num_items_in_batch``, else mean) without logits.

    Under sequence parallelism each rank holds a shard of the row: the sum and the label count
    (unless ``num_items_in_batch``, then the whole row's count) are taken over the group.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1]).to(weight.dtype)
    targets = targets.reshape(-1).to(hidden.device)
    total = linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    if num_items_in_batch is None:
        has_label = targets != IGNORE_INDEX
        num_items_in_batch = (has_label.sum() if sequence_parallel_group is None
                              else global_token_count(has_label, sequence_parallel_group))
    share = total / torch.as_tensor(num_items_in_batch, device=total.device)
    return share if sequence_parallel_group is None else all_reduce_sum(share, sequence_parallel_group)


def _check_no_router_loss_in_call(model: torch.nn.Module, kwargs: dict) -> None:
    """The per-call form of :func:`check_no_router_loss`: ``output_router_logits=True`` passed to a forward given
    labels makes transformers add the router's load-balancing loss, which our loss would drop."""
    asked = kwargs.get("output_router_logits")
    if asked is None:
        asked = getattr(model.config, "output_router_logits", False)
    if asked:
        raise ValueError(f"output_router_logits=True: {type(model).__name__}'s loss would include the router's "
                         "load-balancing loss, which a qwenlong-patched forward does not add; pass "
                         "output_router_logits=False (or call the forward without labels)")


def _patched_forward(fused_loss: bool, sequence_parallel_group=None):
    def forward(self, *args, labels=None, shift_labels=None, num_items_in_batch=None, return_last_hidden_state=False,
                **kwargs):
        # looked up on the instance, never captured: a deepcopy of the model rebinds it to the copy
        original_forward = getattr(self, _ORIGINAL_FORWARD)
        if sequence_parallel_group is not None:
            if labels is not None:
                raise ValueError("labels: a sequence-parallel rank holds a shard of the row, so labels shifted inside "
                                 "it would lose each shard's last label; pass shift_labels, shifted on the whole row "
                                 "(shard_for_sequence_parallel(..., labels=labels) makes them)")
            kwargs = hf_sequence_parallel.sequence_parallel_kwargs(sequence_parallel_group, args, kwargs)
        wants_loss = fused_loss and (labels is not None or shift_labels is not None)
        if not (wants_loss or return_last_hidden_state):
            extra = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            return original_forward(*args, **{k: v for k, v in extra.items() if v is not None}, **kwargs)
        if len(args) > 5:
            raise ValueError("labels and later arguments must be passed by keyword to a qwenlong-patched forward")
        if labels is not None or shift_labels is not None:
            _check_no_router_loss_in_call(self, kwargs)
        kwargs.pop("logits_to_keep", None)  # no logits are made in this mode
        # transformers' can_return_tuple: per call, else the config's; the backbone always returns its dataclass
        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        outputs = getattr(self, self.base_model_prefix)(*args, return_dict=True, **kwargs)
        hidden = outputs.last_hidden_state
        loss = None
        if wants_loss:
            loss = _causal_lm_loss(hidden, lm_head_weight(self), _shifted_labels(labels, shift_labels),
                                   num_items_in_batch, sequence_parallel_group)
        elif labels is not None or shift_labels is not None:  # fused_loss=False: the original loss on logits
            logits = self.get_output_embeddings()(hidden)
            loss = self.loss_function(logits=logits, labels=labels, shift_labels=shift_labels,
                                      vocab_size=logits.shape[-1], num_items_in_batch=num_items_in_batch)
        output = FusedCausalLMOutput(
            loss=loss, last_hidden_state=hidden, cache=getattr(outputs, "cache", None),
            hidden_states=outputs.hidden_states, attentions=outputs.attentions,
        )
        return output if return_dict else output.to_tuple()

    return forward


def apply_qwenlong(model: torch.nn.Module, *, attention: bool = True, fused_loss: bool = True,
                   sequence_parallel_group=None, deterministic_attention: bool = True) -> torch.nn.Module:
    """Patch ``model`` (a loaded Qwen2 / Qwen3 / Llama / Mistral ``*ForCausalLM``) in place; returns it.

    Applying twice re-patches from the original forward (pass the same arguments again).

    ``deterministic_attention=False`` selects ``"qwenlong_atomic"``: the attention backward that adds dq
    with fp32 atomics (5 GEMMs instead of 7; gradients no longer bitwise reproducible run to run).

    ``sequence_parallel_group``: a ``torch.distributed`` group over which each packed row is
    split into contiguous token shards, one per rank (Ulysses). The model then takes this rank's
    shard, its attention is ``"qwenlong_ulysses"`` and its loss is the whole row's (see
    :mod:`.hf_sequence_parallel` and :func:`shard_for_sequence_parallel`); parameter gradients
    on each rank are that rank's share, to be summed over the group. It needs ``attention`` and
    ``fused_loss``; to ``generate``, patch again without the group.
    """
    _check_supported(model)
    if sequence_parallel_group is not None:
        _check_sequence_parallel(model, sequence_parallel_group, attention, fused_loss)
        if not deterministic_attention:
            raise ValueError("deterministic_attention=False: the sequence-parallel (Ulysses) attention has only the "
                             "deterministic backward")
        model.set_attn_implementation(hf_sequence_parallel.ATTENTION_NAME)
    elif attention:
        model.set_attn_implementation(hf_attention.NAME if deterministic_attention else hf_attention.ATOMIC_NAME)
    setattr(model, _SEQUENCE_PARALLEL_GROUP, sequence_parallel_group)
    original = getattr(model, _ORIGINAL_FORWARD, model.forward)
    setattr(model, _ORIGINAL_FORWARD, original)
    # keep the class forward's signature: generate() validates its model kwargs against it
    forward = functools.wraps(type(model).forward)(_patched_forward(fused_loss, sequence_parallel_group))
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

    Under sequence parallelism every rank passes the *whole* packed row (one row, no
    ``attention_mask``), runs the model on its shard and gets the whole row's results,
    differentiable into its own shard.
    """
    if not hasattr(getattr(model, "module", model), _ORIGINAL_FORWARD):
        raise ValueError("model: call apply_qwenlong(model) before token_logprobs")
    if targets.shape != input_ids.shape:
        raise ValueError(f"targets must have the shape of input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(targets.shape)}")
    inner = getattr(model, "module", model)
    weight = lm_head_weight(inner)
    group = getattr(inner, _SEQUENCE_PARALLEL_GROUP, None)
    if group is not None:
        if attention_mask is not None:
            raise ValueError("attention_mask: under sequence parallelism pass one packed row with position_ids")
        return hf_sequence_parallel.sequence_parallel_token_logprobs(
            model, weight, group, input_ids, position_ids, targets, temperature, return_entropy, ignore_index)
    hidden = model(input_ids=_as_rows(input_ids), position_ids=_as_rows(position_ids),
                   attention_mask=_as_rows(attention_mask),
                   use_cache=False, return_last_hidden_state=True, return_dict=True).last_hidden_state
    result = linear_logprobs(hidden.reshape(-1, hidden.shape[-1]).to(weight.dtype), weight, targets.reshape(-1),
                             temperature, return_entropy=return_entropy, ignore_index=ignore_index)
    if return_entropy:
        return tuple(x.view(targets.shape) for x in result)
    return result.view(targets.shape)
