"""Sequence parallelism for a Hugging Face causal LM: each rank runs its shard of one packed row.

    torchrun --nproc-per-node 2 examples/hf_sequence_parallel.py
    python examples/hf_sequence_parallel.py          # starts 2 gloo processes itself

Every rank builds the same tiny Qwen2 from a config (same seed, no download) and patches it
with ``apply_qwenlong(model, sequence_parallel_group=group)``. One packed row of three
sequences is split into contiguous token shards, one per rank; attention runs Ulysses (two
all-to-alls per layer), everything else runs on the shard. The forward returns the whole
row's loss on every rank and ``logits=None``. Each rank's backward gives its share of the
parameter gradients, summed over the group before the optimizer step. Then every rank scores
the whole row with ``token_logprobs`` and gets the same log-probs.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, Qwen2Config

from qwenlong.integrations.hf import apply_qwenlong, shard_for_sequence_parallel, token_logprobs
from qwenlong.kernels import build_cu_seqlens, build_position_ids, next_token_labels


def train(group, steps: int = 5, lengths: tuple[int, ...] = (48, 20, 33), seed: int = 0) -> dict:
    """One rank's part (the process group is up). Returns the losses and the row's log-probs."""
    torch.manual_seed(seed)  # the same weights and the same row on every rank
    config = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = apply_qwenlong(AutoModelForCausalLM.from_config(config), sequence_parallel_group=group)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    cu_seqlens = build_cu_seqlens(lengths)
    input_ids = torch.randint(0, config.vocab_size, (int(cu_seqlens[-1]),))
    # this rank's (1, L) input_ids / position_ids / shift_labels and the whole row's cu_seq_lens_q / max_length_q
    inputs = shard_for_sequence_parallel(input_ids, group, cu_seqlens=cu_seqlens, labels=input_ids)
    losses = []
    for step in range(steps):
        out = model(**inputs)
        assert out.logits is None
        out.loss.backward()
        for param in model.parameters():  # each rank holds its share of the gradient
            dist.all_reduce(param.grad, group=group)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
        if dist.get_rank(group) == 0:
            print(f"step {step}: loss {losses[-1]:.4f}")
    targets = next_token_labels(input_ids, cu_seqlens)
    with torch.no_grad():  # the whole row in, the whole row's log-probs out, on every rank
        logp = token_logprobs(model, input_ids, build_position_ids(lengths), targets, temperature=0.7)
    if dist.get_rank(group) == 0:
        print(f"mean log-prob of the next tokens at temperature 0.7: {logp[targets != -100].mean():.4f}")
    return {"losses": losses, "logprobs": logp}


def _spawned(rank: int, world_size: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        train(dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def main(world_size: int = 2) -> None:
    if "RANK" in os.environ:  # started by torchrun
        dist.init_process_group("gloo")
        try:
            train(dist.group.WORLD)
        finally:
            dist.destroy_process_group()
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_spawned, args=(world_size, port), nprocs=world_size)


if __name__ == "__main__":
    main()
