"""TRL's GRPOTrainer with qwenlong's fused GRPO loss, attention and reward.

    python examples/trl_grpo.py

A tiny Qwen2 (built from a config and saved to a temporary folder, since TRL loads the
reference model from a path) and a small byte-level tokenizer; the reward is our rule-based
``trl_reward`` (the dataset's ``answer`` and ``data_source`` columns reach it as TRL passes
dataset columns to reward functions) plus a toy term, so a random model gets some signal.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, Qwen2Config
from trl import GRPOConfig

from qwenlong.data.tokenizers import train_demo_tokenizer
from qwenlong.integrations.trl import QwenlongGRPOTrainer
from qwenlong.rewards import trl_reward

QUESTIONS = [("What is 2 + 2?", "4"), ("What is 3 + 4?", "7"), ("What is 5 + 1?", "6"), ("What is 9 - 3?", "6")]


def distinct_characters(prompts, completions, **columns):
    """A toy shaping reward: more distinct characters, more reward."""
    return [len(set(completion)) / 20 for completion in completions]


def main(max_steps: int = 3, output_dir: str | None = None) -> list[dict]:
    torch.manual_seed(0)
    workdir = Path(output_dir or tempfile.mkdtemp(prefix="qwenlong_trl_"))
    tokenizer = train_demo_tokenizer([f"{q} The answer is {a}." for q, a in QUESTIONS] * 8, vocab_size=320)
    config = Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(workdir / "model")
    tokenizer.save_pretrained(workdir / "model")
    dataset = Dataset.from_dict({
        "prompt": [q for q, _ in QUESTIONS],
        "answer": [a for _, a in QUESTIONS],
        "data_source": ["synthetic_arithmetic"] * len(QUESTIONS),
    })
    args = GRPOConfig(
        output_dir=str(workdir / "out"), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
        max_steps=max_steps, logging_steps=1, learning_rate=1e-3, per_device_train_batch_size=4, num_generations=4,
        max_completion_length=8, gradient_checkpointing=False,
        loss_type="dapo", epsilon_high=0.28, beta=0.01, use_bias_correction_kl=False,
    )
    trainer = QwenlongGRPOTrainer(model=str(workdir / "model"), reward_funcs=[trl_reward, distinct_characters],
                                  args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    for entry in logs:
        print(f"step {entry['step']}: loss {entry['loss']:.5f} reward {entry['reward']:.3f} kl {entry['kl']:.5f}")
    return logs


if __name__ == "__main__":
    main()
