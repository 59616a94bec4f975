"""TRL's ``GRPOTrainer`` with qwenlong's fused GRPO loss and attention.

    from qwenlong.integrations.trl import QwenlongGRPOTrainer
    from qwenlong.rewards import trl_reward

    trainer = QwenlongGRPOTrainer(model=model, reward_funcs=trl_reward, args=GRPOConfig(...),
                                  train_dataset=dataset, processing_class=tokenizer)
    trainer.train()

Everything but the policy loss is TRL's (generation, rewards, advantages, old/reference
log-probs, logging). The subclass overrides one method, ``_compute_loss``: the policy's final
hidden states at the completion positions go straight into :func:`qwenlong.kernels.grpo_loss`,
so no ``(batch, length, vocab)`` logits exist, and the model runs our varlen attention
(:func:`apply_qwenlong` with ``fused_loss=False``, so TRL's own fused-LM-head calls for the
old/reference log-probs keep working).

Same loss as TRL for: ``loss_type`` in grpo / bnpo / dr_grpo / dapo (TRL's normalizations,
gradient accumulation included), ``importance_sampling_level="token"``, ``epsilon`` /
``epsilon_high``, ``delta`` (TRL's two-sided clip equals a dual clip at ``delta`` when
``delta > 1 + epsilon_high``), ``beta`` (k3 KL against TRL's reference log-probs), a static
``entropy_coef`` with ``loss_type="bnpo"`` (where TRL's entropy mean and the policy term share
one normalizer), ``tool_mask``, and with ``use_vllm`` TRL's ``vllm_importance_sampling_correction``
in every ``vllm_importance_sampling_mode`` (TRL computes the trainer-vs-vLLM ratio; the policy
term of each token is weighted by it, the KL term is not, as in TRL). Anything else raises
``ValueError`` at construction.
Logged metrics: ``kl``, ``entropy`` (only when the entropy bonus is on: it is computed only
then), ``clip_ratio/{low,high,region}_mean``; TRL's per-sequence clip extremes are not logged.
"""

from __future__ import annotations

import torch
from trl import GRPOTrainer

from qwenlong.integrations.hf import apply_qwenlong, lm_head_weight
from qwenlong.kernels import grpo_loss, linear_logprobs
from qwenlong.kernels.logprobs.policy_math import (
    aggregate_tokens,
    clip_fractions,
    k3_kl,
    loss_normalizer,
    masked_mean,
    policy_loss_per_token,
)

# TRL's loss_type -> our loss aggregation (the same reduction, see _normalizer)
TRL_LOSS_AGGREGATIONS = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm",
                         "dapo": "token-mean"}
CLIPPED_LOSS_TYPES = tuple(TRL_LOSS_AGGREGATIONS)


def check_supported_config(args) -> None:
    """Raise ``ValueError`` for GRPOConfig settings whose loss :class:`QwenlongGRPOTrainer` does not reproduce."""
    epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    unsupported = {
        "loss_type": (args.loss_type not in CLIPPED_LOSS_TYPES, f"must be one of {CLIPPED_LOSS_TYPES}"),
        "importance_sampling_level": (args.importance_sampling_level != "token", "must be 'token'"),
        "delta": (args.delta is not None and not args.delta > 1 + epsilon_high,
                  f"must exceed 1 + epsilon_high = {1 + epsilon_high} (then it is a dual clip)"),
        "off_policy_mask_threshold": (args.off_policy_mask_threshold is not None, "is not supported"),
        "top_entropy_quantile": (args.top_entropy_quantile < 1.0, "must be 1.0 (no high-entropy token mask)"),
        "use_bias_correction_kl": (args.beta != 0 and args.use_bias_correction_kl,
                                   "must be False when beta != 0 (the KL term is not weighted by the ratio)"),
        "use_adaptive_entropy": (args.use_adaptive_entropy, "is not supported"),
        "entropy_coef": (args.entropy_coef != 0 and args.loss_type != "bnpo",
                         "needs loss_type='bnpo' (one normalizer for the policy term and the entropy mean)"),
    }
    problems = [f"{name} {why} (got {getattr(args, name)!r})" for name, (bad, why) in unsupported.items() if bad]
    if problems:
        raise ValueError("QwenlongGRPOTrainer: " + "; ".join(problems))


def importance_weighted_grpo_loss(hidden, weight, targets, advantages, old_logprobs, is_weights, *, ref_logprobs,
                                  clip_low, clip_high, dual_clip, kl_coef, entropy_coef, temperature, num_tokens):
    """:func:`qwenlong.kernels.grpo_loss` over all the tokens given, with each token's policy term times
    ``is_weights`` (TRL's vLLM importance-sampling correction): ``sum_t (w_t pg_t + kl_coef k3_t -
    entropy_coef H_t) / n_t``. The same log-probs kernel, metrics and normalizer as ``grpo_loss``."""
    with_entropy = entropy_coef != 0
    logp = linear_logprobs(hidden, weight, targets, temperature, return_entropy=with_entropy)
    if with_entropy:
        logp, entropy = logp
    advantages = advantages.float()
    per_token, ratio = policy_loss_per_token(logp, old_logprobs.float(), advantages, clip_low, clip_high, dual_clip)
    per_token = per_token * is_weights.float()
    everything = torch.ones_like(targets, dtype=torch.bool)
    metrics = {}
    if ref_logprobs is not None:
        kl = k3_kl(logp, ref_logprobs.float())
        per_token = per_token + kl_coef * kl
        metrics["kl_mean"] = masked_mean(kl.detach(), everything)
    if with_entropy:
        per_token = per_token - entropy_coef * entropy
        metrics["entropy_mean"] = masked_mean(entropy.detach(), everything)
    metrics["clip_frac_low"], metrics["clip_frac_high"] = (
        masked_mean(fraction, everything) for fraction in clip_fractions(ratio.detach(), advantages, clip_low,
                                                                         clip_high))
    return aggregate_tokens(per_token, everything, num_tokens), metrics


class QwenlongGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose loss is :func:`qwenlong.kernels.grpo_loss` on the policy's hidden states.

    ``qwenlong_attention``: switch the policy (and reference) model to the ``"qwenlong"``
    attention implementation (default True). The policy must be a model type that
    :func:`apply_qwenlong` supports.
    """

    def __init__(self, *args, qwenlong_attention: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        check_supported_config(self.args)
        policy = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        apply_qwenlong(policy, attention=qwenlong_attention, fused_loss=False)
        if qwenlong_attention and self.ref_model is not None:
            apply_qwenlong(self.ref_model, attention=True, fused_loss=False)

    def _normalizer(self, mask: torch.Tensor, inputs: dict, training: bool):
        """``num_tokens`` for :func:`grpo_loss` that reproduces TRL's reduction of ``loss_type``.

        TRL's four types are :func:`loss_normalizer` modes over what TRL counts: the sequences of the local
        batch times the gradient-accumulation steps, and for ``dapo`` the batch's tokens over every process.
        """
        accumulation = self.current_gradient_accumulation_steps if training else 1
        mask = mask.float()
        if self.loss_type == "dapo":
            num_tokens = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if training:
                num_tokens = num_tokens * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        else:
            num_tokens = mask.sum().clamp(min=1.0) * accumulation
        per_token = self.loss_type == "grpo"  # each sequence's own length; the other types: one number
        sequence_tokens = mask.sum(-1, keepdim=True).expand_as(mask) if per_token else mask.new_ones(())
        normalizer = loss_normalizer(TRL_LOSS_AGGREGATIONS[self.loss_type], num_tokens, mask.shape[0] * accumulation,
                                     sequence_tokens, scale_factor=self.max_completion_length)
        return normalizer[mask.bool()] if per_token else normalizer

    def _log_token_mean(self, mode: str, name: str, local_mean: torch.Tensor, count: torch.Tensor) -> None:
        totals = self.accelerator.reduce(torch.stack([local_mean * count, count]), reduction="sum")
        self._metrics[mode][name].append((totals[0] / totals[1].clamp(min=1.0)).item())

    def _compute_loss(self, model, inputs):
        if inputs.get("pixel_values") is not None:
            raise ValueError("QwenlongGRPOTrainer: multimodal inputs (pixel_values) are not supported")
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        with self.accelerator.autocast():
            hidden = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                           return_last_hidden_state=True, return_dict=True).last_hidden_state
        # position t predicts token t + 1: the completion is predicted by the positions just before it
        hidden = hidden[:, -completion_ids.shape[1] - 1 : -1]
        selected = mask.bool()
        policy = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        weight = lm_head_weight(policy)
        hidden, targets = hidden[selected].to(weight.dtype), completion_ids[selected]
        advantages = inputs["advantages"]
        advantages = (advantages[:, None] if advantages.dim() == 1 else advantages).expand_as(mask)[selected]
        old_logprobs = inputs.get("old_per_token_logps")
        if old_logprobs is None:  # TRL's on-policy shortcut: ratio 1, the same numbers as the loss sees
            with torch.no_grad():
                old_logprobs = linear_logprobs(hidden, weight, targets, self.temperature)
        else:
            old_logprobs = old_logprobs[selected]
        ref_logprobs = inputs["ref_per_token_logps"][selected] if self.beta != 0.0 else None
        training = self.model.training
        settings = dict(ref_logprobs=ref_logprobs, clip_low=self.epsilon_low, clip_high=self.epsilon_high,
                        dual_clip=self.args.delta, kl_coef=self.beta, entropy_coef=self.entropy_coef,
                        temperature=self.temperature, num_tokens=self._normalizer(mask, inputs, training))
        corrected = self.use_vllm and self.vllm_importance_sampling_correction
        is_ratio = inputs.get("importance_sampling_ratio") if corrected else None
        if is_ratio is None:
            loss, metrics = grpo_loss(hidden, weight, targets, advantages, old_logprobs,
                                      torch.ones_like(targets, dtype=torch.bool), **settings)
        else:  # (batch, length) per token or (batch, 1) per sequence
            loss, metrics = importance_weighted_grpo_loss(hidden, weight, targets, advantages, old_logprobs,
                                                          is_ratio.expand_as(mask)[selected], **settings)
        mode = "train" if training else "eval"
        count = selected.sum().float()
        if "kl_mean" in metrics:
            self._log_token_mean(mode, "kl", metrics["kl_mean"], count)
        if "entropy_mean" in metrics:
            self._log_token_mean(mode, "entropy", metrics["entropy_mean"], count)
        self._log_token_mean(mode, "clip_ratio/low_mean", metrics["clip_frac_low"], count)
        self._log_token_mean(mode, "clip_ratio/high_mean", metrics["clip_frac_high"], count)
        self._log_token_mean(mode, "clip_ratio/region_mean", metrics["clip_frac_low"] + metrics["clip_frac_high"],
                             count)
        return loss
