"""Our attention registered in transformers ("qwenlong") matches "sdpa" on tiny models."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/ is not an installed package

import qwenlong.integrations.hf_attention as hf_attention  # noqa: E402
from benchmarks.work.counting import counting, interpreter_active  # noqa: E402

CONFIGS = {
    "qwen2": transformers.Qwen2Config,
    "qwen3": transformers.Qwen3Config,
    "llama": transformers.LlamaConfig,
}


def _models(family: str, device: str = "cpu"):
    """The same randomly initialised tiny model twice, on ``device``: with our attention and with sdpa."""
    config = CONFIGS[family](
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    ours = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="qwenlong").eval()
    sdpa = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    assert ours.config._attn_implementation == "qwenlong" and sdpa.config._attn_implementation == "sdpa"
    sdpa.load_state_dict(ours.state_dict())
    return ours.to(device), sdpa.to(device)


@pytest.mark.parametrize(
    "family,backend", [("qwen2", "triton"), ("qwen2", "torch"), ("qwen3", "torch"), ("llama", "torch")]
)
def test_packed_batch_matches_sdpa_per_sequence(family, backend, device, monkeypatch):
    """position_ids restarting per sequence: each packed sequence attends only to itself."""
    monkeypatch.setenv("QWENLONG_BACKEND", backend)
    ours, sdpa = _models(family, device)
    lengths = [7, 12, 1, 5]
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 128, (1, sum(lengths)), generator=gen).to(device)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None].to(device)
    weights = torch.randn(1, sum(lengths), 128, generator=gen).to(device)

    packed_logits = ours(input_ids=input_ids, position_ids=position_ids).logits
    (packed_logits * weights).sum().backward()
    separate = []
    for ids, w in zip(input_ids.split(lengths, dim=1), weights.split(lengths, dim=1), strict=True):
        logits = sdpa(input_ids=ids).logits
        (logits * w).sum().backward()
        separate.append(logits)
    torch.testing.assert_close(packed_logits, torch.cat(separate, dim=1), atol=1e-5, rtol=1e-4)
    for (name, p_ours), p_sdpa in zip(ours.named_parameters(), sdpa.parameters(), strict=True):
        torch.testing.assert_close(p_ours.grad, p_sdpa.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_padded_batch_matches_sdpa(family, monkeypatch):
    """An ordinary padded batch with attention_mask (right and left padding)."""
    monkeypatch.setenv("QWENLONG_BACKEND", "torch")
    ours, sdpa = _models(family)
    input_ids = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(2))
    attention_mask = torch.ones(3, 10, dtype=torch.long)
    attention_mask[0, 6:] = 0  # right padding
    attention_mask[2, :3] = 0  # left padding
    with torch.no_grad():
        logits = ours(input_ids=input_ids, attention_mask=attention_mask).logits
        expected = sdpa(input_ids=input_ids, attention_mask=attention_mask).logits
    valid = attention_mask.bool()
    torch.testing.assert_close(logits[valid], expected[valid], atol=1e-5, rtol=1e-4)


def test_registration_is_idempotent():
    hf_attention.register()
    hf_attention.register()
    mapping = transformers.AttentionInterface._global_mapping
    assert mapping["qwenlong"] is hf_attention.qwenlong_attention_forward
    assert mapping["qwenlong_atomic"] is hf_attention.qwenlong_atomic_attention_forward


@pytest.mark.skipif(not interpreter_active(), reason="counts kernel launches under TRITON_INTERPRET=1")
def test_nondeterministic_attention_runs_the_atomic_backward(monkeypatch):
    """apply_qwenlong(deterministic_attention=False) switches the model to "qwenlong_atomic": the same
    logits and gradients as "qwenlong" (to fp32 rounding), with no dq kernel in the backward."""
    from qwenlong.integrations.hf import apply_qwenlong

    monkeypatch.setenv("QWENLONG_BACKEND", "triton")
    ours, _ = _models("qwen2")
    atomic = copy.deepcopy(ours)
    apply_qwenlong(ours, fused_loss=False)
    apply_qwenlong(atomic, fused_loss=False, deterministic_attention=False)
    lengths = [9, 4, 11]
    gen = torch.Generator().manual_seed(4)
    input_ids = torch.randint(0, 128, (1, sum(lengths)), generator=gen)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    weights = torch.randn(1, sum(lengths), 128, generator=gen)
    logits, kernels = {}, {}
    for name, model in (("deterministic", ours), ("atomic", atomic)):
        with counting(torch_ops=False) as work:
            logits[name] = model(input_ids=input_ids, position_ids=position_ids).logits
            (logits[name] * weights).sum().backward()
        kernels[name] = set(work.by_kernel)
    assert {"_attn_bwd_dq", "_attn_bwd_dkdv"} <= kernels["deterministic"]
    assert "_attn_bwd_dkdv" in kernels["atomic"] and "_attn_bwd_dq" not in kernels["atomic"]
    torch.testing.assert_close(logits["atomic"], logits["deterministic"], atol=0, rtol=0)  # same forward
    for (name, p_atomic), p_ours in zip(atomic.named_parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(p_atomic.grad, p_ours.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_greedy_generation_with_cache_matches_sdpa(monkeypatch):
    """Decoding with a KV cache and a left-padded batch (queries shorter than keys)."""
    monkeypatch.setenv("QWENLONG_BACKEND", "torch")
    ours, sdpa = _models("qwen2")
    input_ids = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(3))
    attention_mask = torch.ones(2, 8, dtype=torch.long)
    attention_mask[1, :3] = 0
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(**kwargs), sdpa.generate(**kwargs))


def test_autocast_with_fp32_weights_runs_in_the_autocast_dtype():
    """fp32 weights under bf16 autocast (TRL's bf16=True on an fp32 checkpoint): q/k come out of
    rotary in fp32 while v is bf16; the attention must run them in one dtype."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from qwenlong.integrations.hf_attention import register

    register()
    config = Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    ours = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="qwenlong")
    reference = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa")
    assert ours.config._attn_implementation == "qwenlong"
    reference.load_state_dict(ours.state_dict())
    ids = torch.randint(0, 50, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ours(input_ids=ids).logits.float()
        expected = reference(input_ids=ids).logits.float()
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05)
