"""A Hugging Face causal LM on qwenlong kernels: packed sequences, fused loss, no logits.

    python examples/hf_fused_loss.py

Builds a tiny Qwen2 from a config (no download), patches it with ``apply_qwenlong`` and
trains a few steps on one packed row of three sequences. The forward returns the loss and
``logits=None``: the (tokens x vocab) logits never exist. Then scores the same tokens with
``token_logprobs`` at a sampling temperature.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from qwenlong.integrations.hf import apply_qwenlong, token_logprobs


def packed_row(lengths: list[int], vocab_size: int):
    """Sequences packed in one row: positions restart per sequence; no label crosses a boundary."""
    sequences = [torch.randint(0, vocab_size, (n,)) for n in lengths]
    input_ids = torch.cat(sequences)[None]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = input_ids.clone()
    labels[position_ids == 0] = -100  # the first token of a sequence is not predicted from the previous one
    return input_ids, position_ids, labels


def main(steps: int = 5, lengths: tuple[int, ...] = (48, 20, 33), seed: int = 0) -> list[float]:
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = apply_qwenlong(AutoModelForCausalLM.from_config(config))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    input_ids, position_ids, labels = packed_row(list(lengths), config.vocab_size)
    losses = []
    for step in range(steps):
        out = model(input_ids=input_ids, position_ids=position_ids, labels=labels)
        assert out.logits is None
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
        print(f"step {step}: loss {losses[-1]:.4f}")
    targets = torch.roll(labels, -1, dims=1)
    targets[0, -1] = -100
    with torch.no_grad():
        logp = token_logprobs(model, input_ids, position_ids, targets, temperature=0.7)
    print(f"mean log-prob of the next tokens at temperature 0.7: {logp[targets != -100].mean():.4f}")
    return losses


if __name__ == "__main__":
    main()
