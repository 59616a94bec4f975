"""Packed batches: many (prompt, response) sequences in one row of tokens, no padding.

Token ``t`` of a packed batch is trained to predict token ``t + 1`` of the same sequence,
and only when that next token is a response token; every per-token quantity the losses need
(targets, the response mask, advantages, old log-probs) is aligned to those positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qwenlong.integrations.hf import IGNORE_INDEX, lm_head_weight
from qwenlong.kernels import build_cu_seqlens, build_position_ids, pack_by_token_budget, shard_packed_batch

__all__ = ["IGNORE_INDEX", "PackedBatch", "forward_hidden", "lm_head_weight", "pack_sequences"]


@dataclass
class PackedBatch:
    """One micro-batch.

    input_ids, position_ids: ``(T,)``; cu_seqlens: int32 ``(B + 1,)``.
    targets: ``(T,)`` next token, ``IGNORE_INDEX`` where no response token follows.
    mask: ``(T,)`` bool, ``targets != IGNORE_INDEX``.
    token_values: per-token tensors aligned to the positions (advantages, old log-probs...).
    sequence_ids: which input sequences, in packing order.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    token_values: dict[str, torch.Tensor]
    sequence_ids: list[int]

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    def to(self, device: torch.device | str) -> PackedBatch:
        return PackedBatch(self.input_ids.to(device), self.position_ids.to(device), self.cu_seqlens.to(device),
                           self.targets.to(device), self.mask.to(device),
                           {k: v.to(device) for k, v in self.token_values.items()}, self.sequence_ids)


def pack_sequences(
    sequences: Sequence[Sequence[int]],
    prompt_lengths: Sequence[int],
    response_values: dict[str, Sequence[Sequence[float]]] | None = None,
    sequence_values: dict[str, Sequence[float]] | None = None,
    sequence_ids: Sequence[int] | None = None,
) -> PackedBatch:
    """Pack ``sequences`` (prompt + response token ids) into one :class:`PackedBatch`.

    ``response_values[name][i]`` holds one value per response token of sequence ``i``
    (e.g. the rollout engine's log-probs); ``sequence_values[name][i]`` one value broadcast
    to all its response tokens (e.g. the advantage). Both land on the positions that predict
    those tokens; other positions get 0.
    """
    if len(sequences) != len(prompt_lengths):
        raise ValueError(f"prompt_lengths: {len(prompt_lengths)} values for {len(sequences)} sequences")
    response_values = response_values or {}
    sequence_values = sequence_values or {}
    lengths = [len(s) for s in sequences]
    input_ids = torch.tensor([tok for seq in sequences for tok in seq], dtype=torch.long)
    cu_seqlens = build_cu_seqlens(lengths)
    position_ids = build_position_ids(lengths)
    targets = torch.full_like(input_ids, IGNORE_INDEX)
    values = {name: torch.zeros(input_ids.numel()) for name in (*response_values, *sequence_values)}
    for i, (seq, prompt_len) in enumerate(zip(sequences, prompt_lengths, strict=True)):
        if not 1 <= prompt_len <= len(seq):
            raise ValueError(f"prompt_lengths[{i}]: must be in [1, {len(seq)}], got {prompt_len}")
        start = int(cu_seqlens[i])
        # position p predicts token p+1; the response tokens are seq[prompt_len:]
        first, last = start + prompt_len - 1, start + len(seq) - 1
        targets[first:last] = torch.as_tensor(seq[prompt_len:], dtype=torch.long)
        for name, per_token in response_values.items():
            if len(per_token[i]) != len(seq) - prompt_len:
                raise ValueError(f"response_values[{name!r}][{i}]: {len(per_token[i])} values for "
                                 f"{len(seq) - prompt_len} response tokens")
            values[name][first:last] = torch.as_tensor(per_token[i], dtype=torch.float32)
        for name, per_sequence in sequence_values.items():
            values[name][first:last] = float(per_sequence[i])
    ids = list(range(len(sequences))) if sequence_ids is None else list(sequence_ids)
    return PackedBatch(input_ids, position_ids, cu_seqlens, targets, targets != IGNORE_INDEX, values, ids)


def empty_batch(response_values: Sequence[str] = (), sequence_values: Sequence[str] = ()) -> PackedBatch:
    """A one-token batch with no loss tokens: what a data-parallel rank runs when it has fewer
    micro-batches than its peers, so every rank makes the same collective calls."""
    return pack_sequences([[0]], [1], {name: [[]] for name in response_values},
                          {name: [0.0] for name in sequence_values}, sequence_ids=[])


def rank_share(items: Sequence, rank: int, world: int, pad) -> list:
    """Round-robin share ``items[rank::world]`` of one data-parallel rank, padded with ``pad()`` to
    the largest share so every rank runs the same number of micro-batches."""
    per_rank = -(-len(items) // world) if items else 1
    share = list(items[rank::world])
    return share + [pad() for _ in range(per_rank - len(share))]


def micro_batches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Indices of sequences grouped into micro-batches of at most ``token_budget`` tokens.

    Order inside each micro-batch is by index, so results do not depend on the packer's
    internal order (our kernels make each token's numbers independent of its neighbours).
    """
    return [sorted(group) for group in pack_by_token_budget(list(lengths), token_budget)]


def forward_hidden(model: torch.nn.Module, batch: PackedBatch) -> torch.Tensor:
    """Final hidden states ``(T, d)`` of a packed batch: the decoder without the LM head.

    Position ids restart at 0 for every sequence, which is how transformers (and our
    attention) recognise the sequence boundaries of a packed row.
    """
    decoder = getattr(model, model.base_model_prefix)
    out = decoder(input_ids=batch.input_ids[None], position_ids=batch.position_ids[None], use_cache=False,
                  return_dict=True)  # a config with return_dict: false would give a tuple
    return out.last_hidden_state[0]


def policy_hidden(model: torch.nn.Module, batch: PackedBatch, sp_group=None) -> tuple[torch.Tensor, PackedBatch]:
    """Final hidden states of ``batch`` and the batch they belong to.

    Without sequence parallelism, the whole batch. With an SP group, this rank's contiguous
    token shard (``shard_packed_batch``: the total padded to a multiple of the group size with
    a loss-free sequence) run through ``SequenceParallelCausalLM``; the returned batch holds
    the shard of every per-token tensor, so the losses apply to it unchanged.
    """
    if sp_group is None:
        return forward_hidden(model, batch), batch
    from qwenlong.integrations.hf_sequence_parallel import SequenceParallelCausalLM

    shard = shard_packed_batch(batch.cu_seqlens, sp_group, ignore_index=IGNORE_INDEX, input_ids=batch.input_ids,
                               position_ids=batch.position_ids, labels=batch.targets, **batch.token_values)
    local = PackedBatch(shard["input_ids"], shard["position_ids"], shard.cu_seqlens, shard["labels"],
                        shard["labels"] != IGNORE_INDEX, {k: shard[k] for k in batch.token_values},
                        batch.sequence_ids)
    hidden = SequenceParallelCausalLM(model, sp_group)(local.input_ids, local.position_ids, shard.cu_seqlens,
                                                        shard.max_seqlen)
    return hidden, local
