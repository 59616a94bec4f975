"""Bridges to HF / TRL / verl / OpenRLHF: the same numbers as the unpatched model or the framework's formula.

References are plain PyTorch on materialized logits (HF's own forward, TRL's own loss,
verl's and OpenRLHF's documented formulas written out here in float64).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from qwenlong.integrations.hf import apply_qwenlong, token_logprobs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "qwen2": transformers.Qwen2Config,
    "qwen3": transformers.Qwen3Config,
    "llama": transformers.LlamaConfig,
    "mistral": transformers.MistralConfig,
}
VOCAB = 96


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    """The kernels' PyTorch CPU path: the Triton interpreter would be far too slow for whole models."""
    monkeypatch.setenv("QWENLONG_BACKEND", "torch")


def _tiny_model(family: str = "qwen2", vocab: int = VOCAB, **extra):
    config = CONFIGS[family](vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **extra)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def _padded_batch():
    """Two rows: one full, one right-padded; labels ignore the prompt and the padding."""
    torch.manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (2, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :3] = -100
    return input_ids, attention_mask, labels


def _max_grad_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((p.grad - q.grad).abs().max().item() for p, q in zip(a.parameters(), b.parameters(), strict=True))


# ---------------------------------------------------------------------------------------------- HF


@pytest.mark.parametrize("family,num_items_in_batch",
                         [("qwen2", None), ("qwen2", 7), ("qwen3", None), ("llama", 7), ("mistral", None)])
def test_apply_qwenlong_loss_and_grads_match_unpatched(family, num_items_in_batch):
    reference = _tiny_model(family)
    patched = apply_qwenlong(copy.deepcopy(reference))
    assert patched.config._attn_implementation == "qwenlong"
    input_ids, attention_mask, labels = _padded_batch()
    extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
    expected = reference(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **extra)
    got = patched(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **extra)
    assert got.logits is None
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-6)
    expected.loss.backward()
    got.loss.backward()
    assert _max_grad_difference(reference, patched) < 1e-5


def test_apply_qwenlong_keeps_the_plain_forward_and_generate():
    reference = _tiny_model("qwen3")
    patched = apply_qwenlong(copy.deepcopy(reference))
    apply_qwenlong(patched)  # idempotent: re-patches from the original forward
    input_ids, attention_mask, _ = _padded_batch()
    real = attention_mask.bool()  # padded positions: our attention gives 0 there, sdpa whatever it attends to
    with torch.no_grad():
        torch.testing.assert_close(patched(input_ids=input_ids, attention_mask=attention_mask).logits[real],
                                   reference(input_ids=input_ids, attention_mask=attention_mask).logits[real],
                                   rtol=1e-5, atol=1e-5)
        prompt = input_ids[:1, :5]
        generated = patched.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False)
        expected = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                                      do_sample=False)
    assert torch.equal(generated, expected)


def test_apply_qwenlong_without_fused_loss_returns_hf_loss():
    reference = _tiny_model("llama")
    patched = apply_qwenlong(copy.deepcopy(reference), fused_loss=False)
    input_ids, attention_mask, labels = _padded_batch()
    got = patched(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert got.logits is not None
    torch.testing.assert_close(got.loss, reference(input_ids=input_ids, attention_mask=attention_mask,
                                                   labels=labels).loss, rtol=1e-5, atol=1e-6)


def test_token_logprobs_on_a_packed_row_match_each_sequence_alone():
    """Two sequences packed in one row (positions restart) give each sequence's own log-probs and entropies."""
    reference = _tiny_model("qwen2")
    patched = apply_qwenlong(copy.deepcopy(reference))
    torch.manual_seed(2)
    sequences = [torch.randint(0, VOCAB, (n,)) for n in (7, 5)]
    input_ids = torch.cat(sequences)
    position_ids = torch.cat([torch.arange(len(s)) for s in sequences])
    targets = torch.cat([torch.cat([s[1:], torch.tensor([-100])]) for s in sequences])
    temperature = 0.7
    logp, entropy = token_logprobs(patched, input_ids, position_ids, targets, temperature, return_entropy=True)
    expected_logp, expected_entropy = [], []
    with torch.no_grad():
        for seq in sequences:
            logits = reference(input_ids=seq[None]).logits[0].double() / temperature
            log_softmax = logits.log_softmax(-1)
            next_logp = log_softmax[:-1].gather(-1, seq[1:, None])[:, 0]
            expected_logp.append(torch.cat([next_logp, next_logp.new_zeros(1)]))
            row_entropy = -(log_softmax.exp() * log_softmax).sum(-1)
            expected_entropy.append(torch.cat([row_entropy[:-1], row_entropy.new_zeros(1)]))
    torch.testing.assert_close(logp.double(), torch.cat(expected_logp), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy.double(), torch.cat(expected_entropy), rtol=1e-5, atol=1e-5)


def test_apply_qwenlong_errors():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        apply_qwenlong(gpt2)
    model = _tiny_model("qwen2")
    with pytest.raises(NotImplementedError, match="SequenceParallelCausalLM"):
        apply_qwenlong(model, sequence_parallel_group=object())
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="apply_qwenlong"):
        token_logprobs(model, ids, None, ids)
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(apply_qwenlong(model), ids, None, ids[:, :3])
