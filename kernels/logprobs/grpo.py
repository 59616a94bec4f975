"""GRPO / DAPO policy loss straight from the LM head's hidden states (method.md section 2).

Log-probs (and the entropy, only when ``entropy_coef != 0``) come from the fused
:func:`linear_logprobs`; the per-token math lives in :mod:`.policy_math`.

Positions with ``mask == 0`` are handed to the LM head as ignored rows, so they cost no GEMM
work, and every per-token input there is replaced by 0 with ``torch.where`` before any math:
a NaN or -inf old log-prob, advantage, reference log-prob or hidden row at a masked position
reaches neither the loss nor a gradient (multiplying by the mask would give NaN * 0 = NaN).
"""

from __future__ import annotations

import torch

from ..utils.checks import FLOAT_DTYPES, check_tensor, tensor_checks_enabled
from .linear_logprobs import fused_linear_loss, linear_logprobs
from .policy_math import aggregate_tokens, clip_fractions, k3_kl, masked_mean, policy_loss_per_token

IGNORE_INDEX = -100  # the target given to masked rows


def _check_per_token(name, value, num_tokens, device, dtypes=FLOAT_DTYPES):
    check_tensor(name, value, ndim=1, dtypes=dtypes)
    if value.shape[0] != num_tokens:
        raise ValueError(f"{name} must have one entry per token ({num_tokens}), got shape {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but hidden is on {device}")


def _check_grpo_args(hidden, targets, advantages, old_logprobs, mask, ref_logprobs, clip_low, clip_high, dual_clip,
                     kl_coef, num_tokens):
    """Shapes, dtypes and options always; checks that read tensor values (the mask's 0/1 values, the targets at
    loss tokens, a per-token ``num_tokens``) on CPU tensors and, on a GPU, only with ``QWENLONG_CHECK_TENSORS=1``
    (:func:`tensor_checks_enabled`: reading a value back waits for the device)."""
    check_tensor("hidden", hidden, ndim=2)
    count, device = hidden.shape[0], hidden.device
    _check_per_token("targets", targets, count, device, dtypes=(torch.int32, torch.int64))
    _check_per_token("advantages", advantages, count, device)
    _check_per_token("old_logprobs", old_logprobs, count, device)
    _check_per_token("mask", mask, count, device, dtypes=(torch.bool, *FLOAT_DTYPES))
    if mask.dtype != torch.bool and tensor_checks_enabled(mask):
        bad = (mask != 0) & (mask != 1)  # NaN too
        if bool(bad.any()):
            raise ValueError(f"mask must hold only 0 and 1 (it selects loss tokens; it does not weight them), "
                             f"got {mask[bad][:4].tolist()}")
    if tensor_checks_enabled(targets):
        ignored = (mask != 0) & (targets == IGNORE_INDEX)
        if bool(ignored.any()):
            rows = ignored.nonzero()[:4, 0].tolist()
            raise ValueError(f"targets must not be ignore_index ({IGNORE_INDEX}) where mask is set (a loss token "
                             f"needs a target), got it at rows {rows}")
    if ref_logprobs is not None:
        _check_per_token("ref_logprobs", ref_logprobs, count, device)
    elif kl_coef != 0:
        raise ValueError(f"ref_logprobs must be given when kl_coef is not 0 (kl_coef={kl_coef})")
    if not 0.0 <= clip_low < 1.0:
        raise ValueError(f"clip_low must lie in [0, 1), got {clip_low}")
    if not clip_high >= 0.0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high}")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    if isinstance(num_tokens, torch.Tensor) and num_tokens.dim() > 0:
        _check_per_token("num_tokens", num_tokens, count, device, dtypes=(torch.int32, torch.int64, *FLOAT_DTYPES))
        if tensor_checks_enabled(num_tokens):
            bad = (mask != 0) & ~(num_tokens > 0)  # NaN fails > 0 too
            if bool(bad.any()):
                raise ValueError(f"num_tokens must be > 0 at every token where mask is set, got "
                                 f"{num_tokens[bad][:4].tolist()}")
    elif num_tokens is not None and (not isinstance(num_tokens, torch.Tensor) or tensor_checks_enabled(num_tokens)):
        if not float(num_tokens) > 0:  # reads a tensor's value: on a GPU only when checks are asked for
            raise ValueError(f"num_tokens must be > 0, got {num_tokens}")


def grpo_loss(hidden, weight, targets, advantages, old_logprobs, mask, *, ref_logprobs=None, clip_low=0.2,
              clip_high=0.28, dual_clip=None, kl_coef=0.0, entropy_coef=0.0, temperature=1.0, num_tokens=None,
              grad_in_forward=False):
    """Clipped-surrogate GRPO loss with optional dual clip, k3 KL and entropy bonus.

    Per token (``mask``, bool or 0/1 floats, selects the loss tokens, whose ``targets`` must not be -100; all
    per-token arguments are ``(T,)``, ``targets`` int):
    ``l_t = pg_t + kl_coef * k3(ref_t, logp_t) - entropy_coef * H_t`` with ``pg_t`` from
    :func:`policy_loss_per_token`. The loss is ``sum_t mask_t * l_t / n_t`` (see
    :func:`aggregate_tokens`): ``num_tokens=None`` is the local token mean, a number is the
    global token count over all ranks, a ``(T,)`` tensor of ``num_sequences * len(seq(t))``
    gives the mean of per-sequence means.

    Returns ``(loss, metrics)``; metrics are detached masked means over local tokens:
    ``ratio_mean``, ``clip_frac_low``, ``clip_frac_high``, ``kl_mean`` (when ``ref_logprobs``
    is given) and ``entropy_mean`` (when ``entropy_coef != 0``: entropy is computed only then).

    ``grad_in_forward``: compute the gradients during the forward from the logits it already has
    (6 instead of 8 T_valid d V FLOPs, an fp32 logits chunk of memory; see :func:`fused_linear_loss`);
    ``loss.backward()`` then only scales them.
    """
    _check_grpo_args(hidden, targets, advantages, old_logprobs, mask, ref_logprobs, clip_low, clip_high, dual_clip,
                     kl_coef, num_tokens)
    with_entropy = entropy_coef != 0
    active = mask != 0
    targets = torch.where(active, targets, IGNORE_INDEX)  # masked rows: no LM-head work, zero gradient

    def on_mask(values):  # 0 where masked, so nothing stored there (NaN, -inf) enters the math
        return None if values is None else torch.where(active, values.float(), 0.0)

    advantages, old_logprobs, ref_logprobs = on_mask(advantages), on_mask(old_logprobs), on_mask(ref_logprobs)
    if isinstance(num_tokens, torch.Tensor) and num_tokens.dim() > 0:
        num_tokens = torch.where(active, num_tokens, 1)

    def token_terms(logp, entropy, index):
        """``(l_t, ratio_t, k3_t | None)`` at the tokens ``index`` (row indices, or a slice)."""
        per_token, ratio = policy_loss_per_token(logp, old_logprobs[index], advantages[index], clip_low, clip_high,
                                                 dual_clip)
        kl = None if ref_logprobs is None else k3_kl(logp, ref_logprobs[index])
        if kl is not None and kl_coef != 0:
            per_token = per_token + kl_coef * kl
        if with_entropy:
            per_token = per_token - entropy_coef * entropy
        return per_token, ratio, kl

    if grad_in_forward:
        with torch.enable_grad():  # d loss / d l_t: the aggregation is linear in the per-token losses
            probe = torch.zeros(targets.shape, device=targets.device, requires_grad=True)
            (token_weights,) = torch.autograd.grad(aggregate_tokens(probe, mask, num_tokens), probe)
        loss, logp, entropy, _ = fused_linear_loss(
            hidden, weight, targets, lambda rows, lp, ent, _: token_terms(lp, ent, rows)[0] * token_weights[rows],
            temperature, IGNORE_INDEX, with_entropy)
        _, ratio, kl = token_terms(logp, entropy, slice(None))
    else:
        logp = linear_logprobs(hidden, weight, targets, temperature, return_entropy=with_entropy,
                               ignore_index=IGNORE_INDEX)
        logp, entropy = logp if with_entropy else (logp, None)
        per_token, ratio, kl = token_terms(logp, entropy, slice(None))
        loss = aggregate_tokens(per_token, mask, num_tokens)
    metrics = {}
    if kl is not None:
        metrics["kl_mean"] = masked_mean(kl.detach(), mask)
    if with_entropy:
        metrics["entropy_mean"] = masked_mean(entropy.detach(), mask)
    clipped_low, clipped_high = clip_fractions(ratio.detach(), advantages, clip_low, clip_high)
    metrics["ratio_mean"] = masked_mean(ratio.detach(), mask)
    metrics["clip_frac_low"] = masked_mean(clipped_low, mask)
    metrics["clip_frac_high"] = masked_mean(clipped_high, mask)
    return loss, metrics
