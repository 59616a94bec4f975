"""qwenlong's OpenRLHF actor: action log-probs and entropy without logits, beside OpenRLHF's own Actor.

    pip install openrlhf --no-deps   # plus what it imports; flash-attn on a GPU machine
    python examples/openrlhf_logprobs.py

``QwenlongActor`` is an ``openrlhf.models.Actor`` (so ``DeepspeedStrategy`` and OpenRLHF's
trainers take it) whose forward packs the real tokens of a padded batch into one row for our
varlen attention and scores them with the fused LM-head kernel. Prompts are left-padded and
responses right-padded, as OpenRLHF's generation leaves them; the temperature is the rollout's
(OpenRLHF scales the logits by it for both the log-probs and the entropy).
"""

from __future__ import annotations

import copy

import torch
from openrlhf.models import Actor
from transformers import AutoModelForCausalLM, Qwen2Config

from qwenlong.integrations.openrlhf import QwenlongActor


def main(prompt_len: int = 16, response_len: int = 12, seed: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    actor = QwenlongActor(copy.deepcopy(model), temperature=0.6)
    reference = Actor(model, temperature=0.6)  # OpenRLHF's own, materializing the logits
    reference.packing_samples = False
    sequences = torch.randint(0, config.vocab_size, (3, prompt_len + response_len))
    attention_mask = torch.ones_like(sequences)
    attention_mask[1, : prompt_len // 2] = 0  # a shorter, left-padded prompt
    attention_mask[2, -response_len // 3 :] = 0  # a shorter, right-padded response
    action_mask = attention_mask[:, -response_len:]
    action_log_probs, output = actor(sequences, action_mask, attention_mask, return_output=True, return_entropy=True)
    with torch.no_grad():
        expected = reference(sequences, action_mask, attention_mask)
    advantages = torch.tensor([0.5, -1.0, 0.8])[:, None]
    loss = -(advantages * action_log_probs).sum() / action_mask.sum()  # a REINFORCE-style step on the log-probs
    loss.backward()
    results = {
        "mean_action_log_prob": (action_log_probs.sum() / action_mask.sum()).item(),
        "max_abs_diff_vs_openrlhf": (action_log_probs - expected).abs().max().item(),
        "mean_entropy": output.entropy[:, -response_len:][action_mask.bool()].mean().item(),
        "loss": loss.item(),
    }
    for name, value in results.items():
        print(f"{name}: {value:.3g}")
    return results


if __name__ == "__main__":
    main()
