"""``apply_qwenlong(model, sequence_parallel_group=...)`` on 2 gloo ranks equals the unpatched model in one process.

The reference is the plain HF model (sdpa, materialized logits) on the whole packed row; the
sequence-parallel model runs each rank's shard through Ulysses attention and the fused loss.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import spawn, tiny_causal_lm

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
LENGTHS = [7, 12, 3, 9]  # 31 tokens, padded to 32: the 12-token sequence straddles the two shards
VOCAB = 64
TEMPERATURE = 0.7
# What the ranks' fork server imports once: the integration (which imports the kernels) and this module.
PRELOAD = ["transformers", "qwenlong.integrations.hf", __name__]


def _close(actual, expected, what, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol,
                               msg=lambda m: f"rank {dist.get_rank()}: {what}: {m}")


def _tiny_model(family: str, heads: int = 4, kv_heads: int = 2):
    # initializer_range 0.2: sharp attention, so a key from the wrong sequence or position changes the output
    return tiny_causal_lm(family, vocab_size=VOCAB, heads=heads, kv_heads=kv_heads, initializer_range=0.2)


def _packed_row(seed: int):
    """One packed row (the same on every rank): ids, positions restarting per sequence, HF labels."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (sum(LENGTHS),), generator=gen)
    position_ids = torch.cat([torch.arange(n) for n in LENGTHS])
    labels = input_ids.masked_fill(torch.rand(input_ids.shape, generator=gen) < 0.2, -100)  # some tokens not learnt
    return input_ids, position_ids, labels


def _reference(model, input_ids, position_ids, labels, **extra):
    """The unpatched model on the whole row (sequences told apart by restarting positions: transformers builds
    the block-diagonal mask only without a cache). HF shifts labels inside the row, so each sequence's first
    label is ignored (it would be predicted from the previous sequence)."""
    hf_labels = labels.masked_fill(position_ids == 0, -100)
    return model(input_ids=input_ids[None], position_ids=position_ids[None], labels=hf_labels[None], use_cache=False,
                 **extra)


def _check_model_matches_unpatched(group, family: str, seed: int, kv_heads: int = 2):
    from qwenlong.integrations.hf import apply_qwenlong, shard_for_sequence_parallel, token_logprobs

    reference = _tiny_model(family, kv_heads=kv_heads)
    patched = apply_qwenlong(copy.deepcopy(reference), sequence_parallel_group=group)
    assert patched.config._attn_implementation == "qwenlong_ulysses"
    input_ids, position_ids, labels = _packed_row(seed)
    what = f"{family} kv_heads={kv_heads} SP={dist.get_world_size(group)}"

    expected = _reference(reference, input_ids, position_ids, labels)
    inputs = shard_for_sequence_parallel(input_ids, group, position_ids=position_ids, labels=labels)
    assert inputs["input_ids"].shape == (1, 16) and int(inputs["cu_seq_lens_q"][-1]) == 32
    out = patched(**inputs)
    assert out.logits is None
    _close(out.loss, expected.loss, f"loss {what}", atol=1e-6)
    expected.loss.backward()
    out.loss.backward()
    for (name, ref_param), param in zip(reference.named_parameters(), patched.parameters(), strict=True):
        dist.all_reduce(param.grad, group=group)  # each rank holds its share: sum over the group
        _close(param.grad, ref_param.grad, f"d {name} {what}", rtol=1e-4, atol=1e-6)

    # num_items_in_batch counts the whole row's labels, as transformers' Trainer passes it
    num_items = int((labels.masked_fill(position_ids == 0, -100)[1:] != -100).sum())
    with torch.no_grad():
        expected_sum = _reference(reference, input_ids, position_ids, labels, num_items_in_batch=num_items).loss
        _close(patched(**inputs, num_items_in_batch=num_items).loss, expected_sum, f"loss/num_items {what}", atol=1e-6)
        # verl's call: shards of ids and positions only; the layout comes from the all-gathered positions
        verl_style = {name: inputs[name] for name in ("input_ids", "position_ids", "shift_labels")}
        _close(patched(**verl_style).loss, expected.loss, f"loss without cu_seq_lens_q {what}", atol=1e-6)
        hidden = patched(**verl_style, return_last_hidden_state=True).last_hidden_state
        assert hidden.shape == (1, 16, reference.config.hidden_size)

    targets = torch.cat([torch.cat([s[1:], torch.tensor([-100])]) for s in input_ids.split(LENGTHS)])
    logp, entropy = token_logprobs(patched, input_ids, position_ids, targets, TEMPERATURE, return_entropy=True)
    logits = _reference(reference, input_ids, position_ids, labels).logits[0].double()
    log_softmax = (logits / TEMPERATURE).log_softmax(-1)
    has_target = targets != -100
    expected_logp = log_softmax.gather(-1, targets.clamp(min=0)[:, None])[:, 0].where(has_target, 0.0)
    expected_entropy = (-(log_softmax.exp() * log_softmax).sum(-1)).where(has_target, 0.0)
    _close(logp.double(), expected_logp.detach(), f"token log-probs {what}")
    _close(entropy.double(), expected_entropy.detach(), f"token entropies {what}")

    # any loss on the gathered log-probs, the same on every rank: the reference's gradients, summed over the group
    # (a weighted sum over the tokens, not a mean: gradients ~25x those of the loss above, hence atol 2e-5)
    reference.zero_grad()
    patched.zero_grad()
    weights = torch.randn(targets.shape, generator=torch.Generator().manual_seed(seed))
    (expected_logp * weights).sum().backward()
    (logp * weights).sum().backward()
    for (name, ref_param), param in zip(reference.named_parameters(), patched.parameters(), strict=True):
        dist.all_reduce(param.grad, group=group)
        _close(param.grad, ref_param.grad, f"d {name} of a loss on token log-probs {what}", rtol=1e-4, atol=2e-5)


def _check_errors(group):
    from qwenlong.integrations.hf import apply_qwenlong, shard_for_sequence_parallel

    with pytest.raises(ValueError, match=r"heads \(3\) must be divisible by the sequence-parallel size \(2\)"):
        apply_qwenlong(_tiny_model("llama", heads=3, kv_heads=1), sequence_parallel_group=group)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        apply_qwenlong(gpt2, sequence_parallel_group=group)
    with pytest.raises(ValueError, match="needs attention=True and fused_loss=True"):
        apply_qwenlong(_tiny_model("qwen2"), fused_loss=False, sequence_parallel_group=group)

    model = apply_qwenlong(_tiny_model("qwen2"), sequence_parallel_group=group)
    input_ids, position_ids, labels = _packed_row(seed=3)
    inputs = shard_for_sequence_parallel(input_ids, group, position_ids=position_ids, labels=labels)
    shard = {"input_ids": inputs["input_ids"], "position_ids": inputs["position_ids"]}
    with pytest.raises(ValueError, match="pass shift_labels"):
        model(**shard, labels=inputs["shift_labels"])
    with pytest.raises(ValueError, match=r"cu_seq_lens_q covers 32 tokens, but this rank's shard has 15 tokens x 2"):
        model(input_ids=shard["input_ids"][:, 1:], position_ids=shard["position_ids"][:, 1:],
              cu_seq_lens_q=inputs["cu_seq_lens_q"])
    with pytest.raises(ValueError, match="attention_mask"):
        model(**shard, attention_mask=torch.ones_like(shard["input_ids"]))
    with pytest.raises(ValueError, match="position_ids must be this rank's shard"):
        model(input_ids=shard["input_ids"])
    with pytest.raises(ValueError, match="one packed row"):
        model(input_ids=shard["input_ids"].expand(2, -1), position_ids=shard["position_ids"].expand(2, -1))
    # shards of different lengths without cu_seq_lens_q: every rank sees the lengths and raises
    local = 16 - dist.get_rank(group)
    with pytest.raises(ValueError, match=r"same length, got \[16, 15\]"):
        model(input_ids=shard["input_ids"][:, :local], position_ids=shard["position_ids"][:, :local])

    # what Ulysses attention does not compute is refused, never dropped (Gemma's softcap, gpt-oss's sinks)
    from qwenlong.integrations.hf_sequence_parallel import ulysses_attention_forward

    q, kv = torch.randn(1, 4, 16, 8), torch.randn(1, 2, 16, 8)
    layout = {"sp_group": group, "cu_seq_lens_q": inputs["cu_seq_lens_q"], "max_length_q": 12}
    for extra in ({"softcap": 30.0}, {"s_aux": torch.zeros(4)}):
        with pytest.raises(ValueError, match=f"{next(iter(extra))} .*not supported by 'qwenlong_ulysses'"):
            ulysses_attention_forward(model.model.layers[0].self_attn, q, kv, kv, None, **layout, **extra)


def _check_autocast(group):
    """Under autocast an HF model hands attention fp32 q/k (rotary) and a bf16 v: they run in one dtype, and the
    loss stays within bf16 rounding of the fp32 run's."""
    from qwenlong.integrations.hf import apply_qwenlong, shard_for_sequence_parallel

    model = apply_qwenlong(_tiny_model("qwen2"), sequence_parallel_group=group)
    input_ids, position_ids, labels = _packed_row(seed=4)
    inputs = shard_for_sequence_parallel(input_ids, group, position_ids=position_ids, labels=labels)
    expected = model(**inputs).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**inputs).loss
    loss.backward()
    _close(loss, expected, "loss under bf16 autocast", rtol=2e-2, atol=0)
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_example(group):
    """examples/hf_sequence_parallel.py, run on these ranks: training lowers the loss; same log-probs everywhere."""
    result = _example("hf_sequence_parallel").train(group, steps=3, lengths=(12, 7, 9))
    assert result["losses"][-1] < result["losses"][0]
    gathered = [torch.empty_like(result["logprobs"]) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, result["logprobs"], group=group)
    assert torch.equal(gathered[0], gathered[1])


def _two_ranks():
    world = dist.group.WORLD
    _check_model_matches_unpatched(world, "qwen2", seed=1)
    _check_model_matches_unpatched(world, "llama", seed=2, kv_heads=1)  # GQA with kv_heads < P: KV heads repeated
    _check_errors(world)
    _check_autocast(world)
    _check_example(world)


@pytest.mark.distributed
def test_apply_qwenlong_sequence_parallel_two_ranks(free_port):
    spawn(_two_ranks, 2, free_port, preload=PRELOAD)
