"""The PyTorch backend of the fused LM-head statistics: chunks of tokens and of vocabulary.

Same math as :mod:`.linear_logprobs` (see its docstring), and the same ``forward`` / ``backward``
contract as :mod:`.cuda_backend`; :class:`.valid_rows.ValidRowStats` and :class:`.valid_rows.ValidRowLoss`
run either. Logits exist only one ``TOKEN_CHUNK x VOCAB_CHUNK`` tile at a time, in fp32, so the extra
memory is a few tiles plus O(T) per-token statistics, never T x V. The backward pass recomputes each tile,
unless the forward kept them (``kept_logits``: gradients made in the forward of a scalar loss, at most
``KEPT_ROWS`` rows per call).

Batch invariance: every tile is the same matmul shape whatever T is. The token chunk is
zero-padded to ``TOKEN_CHUNK`` rows, the vocabulary is cut at fixed offsets, and per-token
statistics are combined over vocabulary chunks in a fixed order, so a token's outputs (and
its hidden-state gradient) are bitwise the same alone or inside any batch.
"""

from __future__ import annotations

import torch

TOKEN_CHUNK = 256
VOCAB_CHUNK = 4096
KEPT_ROWS = 1024  # rows per call with kept logits (fp32 KEPT_ROWS x V), a multiple of TOKEN_CHUNK


def _padded(num_rows: int) -> int:
    return -(-num_rows // TOKEN_CHUNK) * TOKEN_CHUNK


def kept_logits(num_rows: int, vocab: int, device) -> torch.Tensor:
    """The buffer a forward keeps the fp32 logits of ``num_rows`` (<= ``KEPT_ROWS``) rows in, for a backward
    without recompute: rows padded to whole tiles."""
    return torch.empty((_padded(min(num_rows, KEPT_ROWS)), vocab), dtype=torch.float32, device=device)


def _pad_rows(values: torch.Tensor, fill=0) -> torch.Tensor:
    """``values`` with rows appended up to a multiple of ``TOKEN_CHUNK`` (filled with ``fill``)."""
    padded_len = _padded(values.shape[0])
    out = values.new_full((padded_len, *values.shape[1:]), fill)
    out[: values.shape[0]] = values
    return out


def _token_chunks(hidden: torch.Tensor):
    """Yield ``(rows, hidden_rows)``: a slice of ``TOKEN_CHUNK`` tokens and their fp32 hidden states."""
    for start in range(0, hidden.shape[0], TOKEN_CHUNK):
        rows = slice(start, start + TOKEN_CHUNK)
        hidden_rows = hidden.new_zeros((TOKEN_CHUNK, hidden.shape[1]), dtype=torch.float32)
        chunk = hidden[rows]
        hidden_rows[: chunk.shape[0]] = chunk
        yield rows, hidden_rows


def _vocab_chunks(weight: torch.Tensor, inv_temperature: float):
    """Yield ``(start, stop, weight_rows)``: one vocabulary chunk's fp32 weight rows divided by tau."""
    for start in range(0, weight.shape[0], VOCAB_CHUNK):
        stop = min(start + VOCAB_CHUNK, weight.shape[0])
        yield start, stop, weight[start:stop].to(torch.float32, copy=True).mul_(inv_temperature)  # one copy


def _target_columns(targets: torch.Tensor, v_start: int, v_stop: int):
    """Column of each token's target inside vocab chunk [v_start, v_stop), and whether it is there."""
    local = targets - v_start
    inside = (local >= 0) & (local < v_stop - v_start)
    return local.clamp(0, v_stop - v_start - 1), inside


def _check_kept(kept_logits, num_tokens):
    if kept_logits is not None and _padded(num_tokens) > kept_logits.shape[0]:
        raise ValueError(f"kept_logits has {kept_logits.shape[0]} rows, too few for {num_tokens} tokens")


def forward(hidden, weight, targets, temperature, ignore_index, with_entropy, with_mean_logp, kept_logits=None):
    """Per-token ``(logp, entropy | None, mean_logp | None, lse)`` in fp32; see the module docstring.
    ``kept_logits`` (from :func:`kept_logits`): each tile is also stored there."""
    num_tokens, vocab = hidden.shape[0], weight.shape[0]
    _check_kept(kept_logits, num_tokens)
    inv_temperature = 1.0 / temperature
    padded_targets = _pad_rows(targets, -1)
    # per token: running max m, sum exp(z - m), sum exp(z - m) * (z - m), sum z, target logit
    stats = hidden.new_zeros((5, padded_targets.shape[0]), dtype=torch.float32)
    stats[0] = torch.finfo(torch.float32).min  # finite, so (m_old - m_new) * 0 stays 0 on the first chunk
    running_max, sum_exp, shifted_sum, logit_sum, target_logit = stats
    for v_start, v_stop, weight_rows in _vocab_chunks(weight, inv_temperature):
        for rows, hidden_rows in _token_chunks(hidden):
            logits = hidden_rows @ weight_rows.T
            if kept_logits is not None:
                kept_logits[rows, v_start:v_stop] = logits
            columns, inside = _target_columns(padded_targets[rows], v_start, v_stop)
            target_logit[rows] += torch.where(inside, logits.gather(1, columns[:, None])[:, 0], 0.0)
            if with_mean_logp:
                logit_sum[rows] += logits.sum(dim=1)
            m_old = running_max[rows]
            m_new = torch.maximum(m_old, logits.amax(dim=1))
            rescale = torch.exp(m_old - m_new)
            shifted = logits.sub_(m_new[:, None])
            exps = torch.exp(shifted)
            if with_entropy:  # carry sum exp(z - m) * (z - m) over to the new max, then add this chunk
                shifted_sum[rows] = rescale * (shifted_sum[rows] + (m_old - m_new) * sum_exp[rows])
                shifted_sum[rows] += torch.linalg.vecdot(exps, shifted)
            sum_exp[rows] = rescale * sum_exp[rows] + exps.sum(dim=1)
            running_max[rows] = m_new
    stats = stats[:, :num_tokens]
    running_max, sum_exp, shifted_sum, logit_sum, target_logit = stats
    valid = targets != ignore_index
    lse = running_max + torch.log(sum_exp)
    logp = torch.where(valid, target_logit - lse, 0.0)
    entropy = torch.where(valid, torch.log(sum_exp) - shifted_sum / sum_exp, 0.0) if with_entropy else None
    mean_logp = torch.where(valid, logit_sum / vocab - lse, 0.0) if with_mean_logp else None
    return logp, entropy, mean_logp, lse


def backward(hidden, weight, targets, lse, entropy, grad_logp, grad_entropy, grad_mean_logp, temperature,
             needs_hidden=True, needs_weight=True, kept_logits=None, grad_weight_sum=None):
    """``(grad_hidden, grad_weight)``, None when not needed; output gradients must be 0 on ignored rows.

    grad_hidden is fp32 (it sums over every vocabulary chunk); grad_weight comes in the weight's dtype: each
    vocabulary chunk's rows are summed over the token chunks in an fp32 chunk buffer and rounded once, so no
    fp32 copy of the whole weight is ever held. ``kept_logits``: the forward's, read instead of recomputed (and
    overwritten). ``grad_weight_sum``: an fp32 tensor of the weight's shape that d(weight) is added to (over the
    calls of a caller's chunks of rows), returned as grad_weight."""
    vocab = weight.shape[0]
    _check_kept(kept_logits, hidden.shape[0])
    inv_temperature = 1.0 / temperature
    targets, lse, grad_logp = _pad_rows(targets, -1), _pad_rows(lse), _pad_rows(grad_logp)
    if grad_entropy is not None:
        entropy, grad_entropy = _pad_rows(entropy), _pad_rows(grad_entropy)
    if grad_mean_logp is not None:
        grad_mean_logp = _pad_rows(grad_mean_logp)
    grad_hidden = torch.zeros((targets.shape[0], hidden.shape[1]), dtype=torch.float32, device=hidden.device)
    grad_hidden = grad_hidden if needs_hidden else None
    if grad_weight_sum is not None:
        grad_weight = grad_weight_sum if needs_weight else None
    else:
        grad_weight = torch.empty_like(weight) if needs_weight else None
    for v_start, v_stop, weight_rows in _vocab_chunks(weight, inv_temperature):
        if not needs_weight:
            weight_sum = None
        elif grad_weight_sum is not None:
            weight_sum = grad_weight_sum[v_start:v_stop]
        else:
            weight_sum = torch.zeros(weight_rows.shape, dtype=torch.float32, device=weight.device)
        for rows, hidden_rows in _token_chunks(hidden):
            logits = hidden_rows @ weight_rows.T if kept_logits is None else kept_logits[rows, v_start:v_stop]
            log_probs = logits.sub_(lse[rows, None])
            probs = torch.exp(log_probs)
            # sum of every -p_j coefficient: d logp_t/dz = onehot(t) - p, d mean_j(log p_j)/dz = 1/V - p,
            # dH/dz = -p (log p + H)
            p_coef = grad_logp[rows]
            if grad_mean_logp is not None:
                p_coef = p_coef + grad_mean_logp[rows]
            if grad_entropy is not None:
                dlogits = log_probs.add_(entropy[rows, None]).mul_(grad_entropy[rows, None]).add_(p_coef[:, None])
                dlogits.mul_(probs).neg_()
            else:
                dlogits = probs.mul_(-p_coef[:, None])
            if grad_mean_logp is not None:
                dlogits += grad_mean_logp[rows, None] / vocab
            columns, inside = _target_columns(targets[rows], v_start, v_stop)
            dlogits.scatter_add_(1, columns[:, None], torch.where(inside, grad_logp[rows], 0.0)[:, None])
            if needs_hidden:
                grad_hidden[rows] += dlogits @ weight_rows  # weight_rows already carries 1/tau
            if needs_weight:
                weight_sum += (dlogits.T @ hidden_rows).mul_(inv_temperature)
        if needs_weight and grad_weight_sum is None:
            grad_weight[v_start:v_stop] = weight_sum
    return (grad_hidden[: hidden.shape[0]] if needs_hidden else None), grad_weight
