"""qwenlong's drop-ins for verl: log-probs/entropy from hidden states, the PPO policy loss, the reward.

    python examples/verl_functions.py

verl itself is not needed: the functions have verl's signatures. The hidden states come from
a tiny Qwen2 built from a config; the advantages are GRPO's group-normalized rewards.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from qwenlong.integrations.verl import (
    FusedLinearForPPO,
    compute_policy_loss,
    compute_policy_loss_vanilla,
    compute_score,
    linear_cross_entropy,
)


def main(batch: int = 4, length: int = 24, seed: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(config)
    input_ids = torch.randint(0, config.vocab_size, (batch, length))
    hidden = model.model(input_ids=input_ids).last_hidden_state
    rolled = torch.roll(input_ids, shifts=-1, dims=1)  # verl scores the inputs shifted by one

    # verl.utils.kernel.linear_cross_entropy / FusedLinearForPPO: no (batch, length, vocab) logits
    log_prob, entropy = linear_cross_entropy(hidden, model.lm_head.weight, rolled, temperature=1.0)
    log_prob_bf16, _ = FusedLinearForPPO()(hidden.bfloat16(), model.lm_head.weight.bfloat16(), rolled)

    # verl.trainer.ppo.core_algos.compute_policy_loss on the response half
    response = slice(length // 2, length - 1)
    old_log_prob = log_prob.detach()[:, response] + 0.1 * torch.randn(batch, length // 2 - 1)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])[:batch]
    advantages = ((rewards - rewards.mean()) / (rewards.std() + 1e-6))[:, None].expand_as(old_log_prob)
    mask = torch.ones_like(old_log_prob)
    pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower = compute_policy_loss(
        old_log_prob, log_prob[:, response], advantages, mask, cliprange=0.2, cliprange_high=0.28,
        loss_agg_mode="token-mean")
    pg_loss.backward()
    # the same loss through verl's policy-loss registry signature (clip settings from the actor config)
    actor_config = SimpleNamespace(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=0.28, clip_ratio_c=3.0)
    registry_loss, _ = compute_policy_loss_vanilla(old_log_prob, log_prob[:, response].detach(), advantages, mask,
                                                   "token-mean", actor_config)

    # verl's custom_reward_function: compute_score(data_source, solution_str, ground_truth, extra_info)
    score = compute_score("synthetic_arithmetic", "<think>2 + 2 = 4</think> Therefore, the answer is 4.", "4")
    results = {
        "mean_log_prob": log_prob.mean().item(), "mean_log_prob_bf16": log_prob_bf16.float().mean().item(),
        "mean_entropy": entropy.mean().item(), "pg_loss": pg_loss.item(), "pg_clipfrac": pg_clipfrac.item(),
        "ppo_kl": ppo_kl.item(), "pg_clipfrac_lower": pg_clipfrac_lower.item(),
        "registry_pg_loss": registry_loss.item(), "score": score,
        "lm_head_grad_norm": model.lm_head.weight.grad.norm().item(),
    }
    for name, value in results.items():
        print(f"{name}: {value:.5f}")
    return results


if __name__ == "__main__":
    main()
