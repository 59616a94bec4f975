"""qwenlong inside verl: our fused LM-head kernel in verl's fused forward, our PPO loss in verl's actor loss,
our reward through verl's custom-reward loader.

    pip install verl --no-deps  # plus omegaconf hydra-core tensordict ray codetiming pylatexenc torchdata
    python examples/verl_functions.py

``qwenlong.integrations.verl.install()`` is what a verl worker calls before building its model;
then ``actor_rollout_ref.model.use_fused_kernels=True`` and
``actor_rollout_ref.actor.policy_loss.loss_mode=qwenlong`` select our code, and
``custom_reward_function.path=pkg://qwenlong.integrations.verl`` with ``name=compute_score`` our
reward. Here the same calls run on one CPU process: a tiny Qwen2 built from a config, one packed
row of four sequences, GRPO's group-normalized advantages.
"""

from __future__ import annotations

import torch
from omegaconf import OmegaConf
from tensordict import TensorDict
from transformers import AutoModelForCausalLM, Qwen2Config
from verl.models.transformers.monkey_patch import patch_forward_with_backends
from verl.trainer.ppo.reward import get_custom_reward_fn
from verl.utils import tensordict_utils as tu
from verl.workers.config import ActorConfig, PolicyLossConfig
from verl.workers.utils.losses import ppo_loss

from qwenlong.integrations.verl import install


def main(batch: int = 4, length: int = 24, seed: int = 0) -> dict[str, float]:
    install()  # registers loss_mode "qwenlong", swaps verl's fused LM-head kernels for ours
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(config)
    patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="torch")  # verl's fused forward

    # verl's remove-padding layout: every sequence's tokens in one row, positions restarting per sequence
    prompt_len, response_len = length // 2, length - length // 2
    sequences = torch.randint(0, config.vocab_size, (batch, length))
    output = model(input_ids=sequences.reshape(1, -1), position_ids=torch.arange(length).repeat(batch)[None],
                   temperature=0.8, return_dict=True)  # log-probs and entropy, no (tokens x vocab) logits

    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0]).repeat(batch)[:batch]
    advantages = ((rewards - rewards.mean()) / (rewards.std() + 1e-6))[:, None].expand(batch, response_len)
    data = TensorDict({
        "prompts": sequences[:, :prompt_len], "responses": sequences[:, prompt_len:],
        "attention_mask": torch.ones(batch, length, dtype=torch.long),
        "response_mask": torch.ones(batch, response_len, dtype=torch.long),
        "old_log_probs": torch.randn(batch, response_len) * 0.1 - 6.0, "advantages": advantages.contiguous(),
    }, batch_size=[batch])
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=None, global_batch_size=None)
    losses = {}
    for loss_mode in ("vanilla", "qwenlong"):  # verl's own loss and ours, on the same log-probs
        actor = ActorConfig(strategy="fsdp", rollout_n=batch, ppo_mini_batch_size=batch, clip_ratio_high=0.28,
                            ppo_micro_batch_size_per_gpu=batch, loss_agg_mode="seq-mean-token-mean",
                            policy_loss=PolicyLossConfig(loss_mode=loss_mode))
        losses[loss_mode], _ = ppo_loss(actor, {"log_probs": output.log_probs[0]}, data.clone())
    losses["qwenlong"].backward()

    reward_config = OmegaConf.create({"reward": {"custom_reward_function": {
        "path": "pkg://qwenlong.integrations.verl", "name": "compute_score"}}})
    compute_score = get_custom_reward_fn(reward_config)
    score = compute_score(data_source="synthetic_arithmetic", ground_truth="4", extra_info={},
                          solution_str="<think>2 + 2 = 4</think> Therefore, the answer is 4.")
    results = {
        "mean_log_prob": output.log_probs.mean().item(), "mean_entropy": output.entropy.mean().item(),
        "vanilla_pg_loss": losses["vanilla"].item(), "qwenlong_pg_loss": losses["qwenlong"].item(), "score": score,
        "lm_head_grad_norm": model.lm_head.weight.grad.norm().item(),
    }
    for name, value in results.items():
        print(f"{name}: {value:.5f}")
    return results


if __name__ == "__main__":
    main()
