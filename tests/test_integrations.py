"""Bridges to HF / TRL / verl: the same numbers as the unpatched model or the framework's own code.

References are plain PyTorch on materialized logits (HF's own forward, TRL's own loss, verl's
log-prob and entropy definitions in float64). verl's and OpenRLHF's own code runs against ours in
tests/integrations_real/ (a venv with those libraries: tools/ci_integrations.sh).
"""

from __future__ import annotations

import ast
import copy
import importlib.util
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import tiny_causal_lm  # noqa: E402

from qwenlong.integrations.hf import apply_qwenlong, token_logprobs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 96


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    """The kernels' PyTorch CPU path: the Triton interpreter would be far too slow for whole models."""
    monkeypatch.setenv("QWENLONG_BACKEND", "torch")


def _tiny_model(family: str = "qwen2", vocab: int = VOCAB, **extra):
    # Qwen3 keeps its config's head_dim of 128, wider than hidden / heads = 8 (released Qwen3 models differ too)
    shape = {"head_dim": 128, "hidden_size": 32} if family == "qwen3" else {}
    return tiny_causal_lm(family, vocab_size=vocab, max_positions=128, **shape, **extra)


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


def test_apply_qwenlong_refuses_a_router_loss_it_would_drop():
    """A MoE model that asks for its router's load-balancing loss: the unpatched loss includes it, the fused one
    would not, so apply_qwenlong (and the pipeline's model build) refuse it, naming the setting."""
    model = _tiny_model("qwen3_moe", output_router_logits=True, router_aux_loss_coef=0.5)
    input_ids, attention_mask, labels = _padded_batch()
    with_router = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert with_router.aux_loss > 0  # the term the fused loss cannot add
    with pytest.raises(ValueError, match="output_router_logits=True"):
        apply_qwenlong(model)


def test_pipeline_model_build_refuses_a_router_loss_it_would_drop(tmp_path):
    from qwenlong.config import load_config
    from qwenlong.pipeline.build import build_model

    for router_loss in (False, True):
        folder = tmp_path / f"router-{router_loss}"
        _tiny_model("qwen3_moe", output_router_logits=router_loss).save_pretrained(folder)
        cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"model.name={folder}", "model.tiny=null",
                                                                  "model.attention=sdpa"])
        if router_loss:
            with pytest.raises(ValueError, match="output_router_logits=True"):
                build_model(cfg, tokenizer=None)
        else:
            assert build_model(cfg, tokenizer=None).config.model_type == "qwen3_moe"


@pytest.mark.parametrize("family,num_items_in_batch",
                         [("qwen2", None), ("qwen2", 7), ("qwen3", None), ("llama", 7), ("mistral", None),
                          ("qwen3_moe", 7)])
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
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    torch.testing.assert_close(patched(input_ids=input_ids, attention_mask=attention_mask, shift_labels=shifted,
                                       **extra).loss, expected.loss, rtol=1e-5, atol=1e-6)
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
    expected = reference(input_ids=input_ids, attention_mask=attention_mask, labels=labels, output_hidden_states=True)
    got = patched(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert got.logits is not None
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-6)
    with_hidden = patched(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                          return_last_hidden_state=True)
    assert with_hidden.logits is None
    torch.testing.assert_close(with_hidden.loss, expected.loss, rtol=1e-5, atol=1e-6)
    real = attention_mask.bool()
    torch.testing.assert_close(with_hidden.last_hidden_state[real], expected.hidden_states[-1][real],
                               rtol=1e-5, atol=1e-5)


def test_deepcopy_of_a_patched_model_runs_its_own_weights():
    """A copy of a patched model (a reference / EMA model made by deepcopy, as TRL's create_reference_model does)
    runs the copy's weights on every path, the plain forward and generate included, not the original's."""
    original = apply_qwenlong(_tiny_model("qwen2"))
    clone = copy.deepcopy(original)
    with torch.no_grad():
        for param in clone.parameters():
            param.add_(0.5 * torch.randn_like(param))
    unpatched = copy.deepcopy(clone)
    unpatched.forward = type(unpatched).forward.__get__(unpatched)  # the class forward on the clone's weights
    unpatched.set_attn_implementation("sdpa")
    input_ids, attention_mask, labels = _padded_batch()
    real = attention_mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(clone(input_ids=input_ids, attention_mask=attention_mask).logits[real],
                                   unpatched(input_ids=input_ids, attention_mask=attention_mask).logits[real],
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(clone(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss,
                                   unpatched(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss,
                                   rtol=1e-5, atol=1e-6)
        prompt = input_ids[:1, :5]
        kwargs = {"attention_mask": torch.ones_like(prompt), "max_new_tokens": 4, "do_sample": False}
        assert torch.equal(clone.generate(prompt, **kwargs), unpatched.generate(prompt, **kwargs))


def test_router_loss_asked_for_per_call_is_refused():
    """output_router_logits=True passed to one call: transformers adds router_aux_loss_coef x the load-balancing
    loss to the loss; the fused loss cannot, so it refuses rather than return the loss without that term."""
    reference = _tiny_model("qwen3_moe", router_aux_loss_coef=0.5)
    patched = apply_qwenlong(copy.deepcopy(reference))
    input_ids, attention_mask, labels = _padded_batch()
    assert reference(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                     output_router_logits=True).aux_loss > 0
    for fused_loss in (True, False):
        apply_qwenlong(patched, fused_loss=fused_loss)
        with pytest.raises(ValueError, match="output_router_logits"):
            patched(input_ids=input_ids, attention_mask=attention_mask, labels=labels, output_router_logits=True,
                    return_last_hidden_state=not fused_loss)
    # asked for without labels (no loss to add it to) or turned off: allowed
    patched(input_ids=input_ids, attention_mask=attention_mask, labels=labels, output_router_logits=False)
    patched(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True)


def test_return_dict_false_gives_a_tuple_as_transformers_does():
    """return_dict=False (per call, or in the config) makes transformers' forward return a tuple, loss first;
    the patched forward does the same instead of failing on the backbone's tuple."""
    reference = _tiny_model("llama")
    patched = apply_qwenlong(copy.deepcopy(reference))
    input_ids, attention_mask, labels = _padded_batch()
    expected = reference(input_ids=input_ids, attention_mask=attention_mask, labels=labels, return_dict=False)
    assert isinstance(expected, tuple)
    got = patched(input_ids=input_ids, attention_mask=attention_mask, labels=labels, return_dict=False)
    assert isinstance(got, tuple)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
    hidden = patched(input_ids=input_ids, attention_mask=attention_mask, return_last_hidden_state=True,
                     use_cache=False, return_dict=False)
    assert isinstance(hidden, tuple) and hidden[0].shape == (*input_ids.shape, reference.config.hidden_size)
    patched.config.return_dict = False
    got = patched(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert isinstance(got, tuple)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
    targets = torch.nn.functional.pad(input_ids[:, 1:], (0, 1), value=-100)
    reference.config.return_dict = True
    patched_on_dict = apply_qwenlong(copy.deepcopy(reference))
    torch.testing.assert_close(token_logprobs(patched, input_ids, None, targets),  # token_logprobs needs no dict
                               token_logprobs(patched_on_dict, input_ids, None, targets), rtol=0, atol=0)


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
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="apply_qwenlong"):
        token_logprobs(model, ids, None, ids)
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(apply_qwenlong(model), ids, None, ids[:, :3])


def _import_time_modules(tree: ast.Module):
    """Absolute module names a file imports when it is imported (function bodies import lazily, later)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                yield node.module
        else:
            stack.extend(ast.iter_child_nodes(node))


def test_integrations_do_not_import_the_training_layer():
    """Users import the drop-ins into their own stack: qwenlong.integrations reaches only itself and the kernels
    (whose own layering test_foundation checks), never trainers, rewards, data... Checked on the source, since a
    process that imported the training layer earlier would hide it in sys.modules."""
    allowed = ("qwenlong.integrations", "qwenlong.kernels")
    offending = {
        f"{path.name}: {module}"
        for path in (ROOT / "qwenlong" / "integrations").glob("*.py")
        for module in _import_time_modules(ast.parse(path.read_text()))
        if module.split(".")[0] == "qwenlong" and not module.startswith(allowed)
    }
    assert not offending, sorted(offending)


# --------------------------------------------------------------------------------------------- TRL


def _trl_config(tmp_path, **overrides):
    from trl import GRPOConfig

    settings = dict(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                    per_device_train_batch_size=4, num_generations=4, max_completion_length=6, max_steps=2,
                    logging_steps=1, learning_rate=1e-2, beta=0.05, use_bias_correction_kl=False,
                    gradient_checkpointing=False)
    return GRPOConfig(**(settings | overrides))


def _length_reward(prompts, completions, **columns):
    """A reward with spread inside each group, so advantages (and gradients) are not all zero."""
    return [len(set(completion)) / 10 for completion in completions]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny Qwen2 and a byte-level tokenizer saved together (TRL loads the reference model from the path)."""
    from qwenlong.data.tokenizers import train_demo_tokenizer

    path = tmp_path_factory.mktemp("tiny_qwen2")
    tokenizer = train_demo_tokenizer(["What is two plus two? The answer is four."] * 4, vocab_size=300)
    model = _tiny_model("qwen2", vocab=320, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, tokenizer


def _prompts():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": ["What is two plus two?", "Say four.", "The answer is", "two plus"]})


@pytest.fixture(scope="module")
def grpo_trainer(tiny_checkpoint, tmp_path_factory):
    from qwenlong.integrations.trl import QwenlongGRPOTrainer

    path, tokenizer = tiny_checkpoint
    args = _trl_config(tmp_path_factory.mktemp("trl"), delta=1.5)
    return QwenlongGRPOTrainer(model=str(path), reward_funcs=_length_reward, args=args, train_dataset=_prompts(),
                               processing_class=tokenizer)


def _grpo_batch(vocab: int):
    """Left-padded prompts, right-padded completions, off-policy old log-probs (so clipping is active)."""
    torch.manual_seed(3)
    batch, prompt_len, completion_len = 4, 5, 6
    prompt_mask = torch.ones(batch, prompt_len, dtype=torch.long)
    prompt_mask[2, :2] = 0
    completion_mask = torch.ones(batch, completion_len, dtype=torch.long)
    completion_mask[1, 4:] = 0
    completion_mask[3, 2:] = 0
    return {
        "prompt_ids": torch.randint(0, vocab, (batch, prompt_len)), "prompt_mask": prompt_mask,
        "completion_ids": torch.randint(0, vocab, (batch, completion_len)), "completion_mask": completion_mask,
        "advantages": torch.tensor([1.0, -0.5, 0.3, -1.2]),
        "old_per_token_logps": -torch.rand(batch, completion_len) * 2 - 4.0,
        "ref_per_token_logps": -torch.rand(batch, completion_len) * 2 - 4.0,
        "num_items_in_batch": completion_mask.sum().float(),
    }


@pytest.mark.parametrize("loss_type,entropy_coef,on_policy,vllm_is", [
    ("grpo", 0.0, False, None), ("bnpo", 0.01, False, None), ("dr_grpo", 0.0, False, None),
    ("dapo", 0.0, False, None), ("dapo", 0.0, True, None),
    ("dapo", 0.0, False, "token"), ("grpo", 0.0, False, "sequence"), ("bnpo", 0.01, False, "token"),
])
def test_trl_loss_and_grads_equal_trl_own_loss(grpo_trainer, monkeypatch, loss_type, entropy_coef, on_policy,
                                               vllm_is):
    """on_policy: no old log-probs in the batch, so both sides take the current ones (ratio exactly 1).
    vllm_is: TRL's vLLM importance-sampling correction is on and the batch carries TRL's trainer-vs-vLLM
    ratio, per token (some tokens masked to 0, as its *_mask modes do) or per sequence."""
    from trl import GRPOTrainer

    trainer, model = grpo_trainer, grpo_trainer.model
    trainer.loss_type, trainer.entropy_coef, trainer._entropy_bonus_enabled = loss_type, entropy_coef, entropy_coef != 0
    trainer.current_gradient_accumulation_steps = 2
    model.train()
    inputs = _grpo_batch(model.config.vocab_size)
    if on_policy:
        del inputs["old_per_token_logps"]
    if vllm_is is not None:
        monkeypatch.setattr(trainer, "use_vllm", True)
        monkeypatch.setattr(trainer, "vllm_importance_sampling_correction", True)
        generator = torch.Generator().manual_seed(4)
        width = inputs["completion_ids"].shape[1] if vllm_is == "token" else 1
        ratio = torch.rand(4, width, generator=generator) * 1.5 + 0.25
        inputs["importance_sampling_ratio"] = ratio.masked_fill(torch.rand(4, width, generator=generator) < 0.2, 0)
    losses, grads = [], []
    for compute_loss in (GRPOTrainer._compute_loss, type(trainer)._compute_loss):  # TRL's, then ours
        model.zero_grad()
        loss = compute_loss(trainer, model, inputs)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-7)
    for ours, theirs in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    clipped = trainer._metrics["train"]["clip_ratio/region_mean"][-1]
    assert clipped == 0 if on_policy else clipped > 0  # the off-policy batch does exercise the clip


def test_trl_grpo_trains_a_few_steps(tiny_checkpoint, tmp_path):
    from qwenlong.integrations.trl import QwenlongGRPOTrainer

    path, tokenizer = tiny_checkpoint
    args = _trl_config(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, loss_type="grpo")
    trainer = QwenlongGRPOTrainer(model=str(path), reward_funcs=_length_reward, args=args, train_dataset=_prompts(),
                                  processing_class=tokenizer)
    assert trainer.model.config._attn_implementation == "qwenlong"
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2 and all(torch.isfinite(torch.tensor(e["loss"])) for e in logged)
    assert "kl" in logged[-1] and "clip_ratio/region_mean" in logged[-1]
    assert any(not torch.equal(p, q) for p, q in zip(before, trainer.model.parameters(), strict=True))


@pytest.mark.parametrize("setting,match", [
    ({"loss_type": "sapo"}, "loss_type"),
    ({"importance_sampling_level": "sequence", "loss_type": "grpo"}, "importance_sampling_level"),
    ({"delta": 1.1}, "delta"),
    ({"use_bias_correction_kl": True}, "use_bias_correction_kl"),
    ({"entropy_coef": 0.01, "loss_type": "dapo"}, "entropy_coef"),
    ({"top_entropy_quantile": 0.5}, "top_entropy_quantile"),
])
def test_trl_unsupported_settings_raise(tmp_path, setting, match):
    from qwenlong.integrations.trl import check_supported_config

    check_supported_config(_trl_config(tmp_path))
    with pytest.raises(ValueError, match=match):
        check_supported_config(_trl_config(tmp_path, **setting))


# -------------------------------------------------------------------------------------------- verl


def _verl_reference_logprobs_entropy(hidden, weight, labels, temperature):
    """verl's ``logprobs_from_logits`` and ``entropy_from_logits`` on materialized float64 logits."""
    logits = hidden.double() @ weight.double().T / temperature
    logp = logits.log_softmax(-1).gather(-1, labels[..., None])[..., 0]
    entropy = torch.logsumexp(logits, -1) - (logits.softmax(-1) * logits).sum(-1)
    return logp, entropy


@pytest.mark.parametrize("shape,backend", [((7,), "torch"), ((2, 5), "torch"), ((2, 5), "triton")])
def test_verl_linear_cross_entropy_matches_reference(shape, backend, monkeypatch):
    from qwenlong.integrations.verl import linear_cross_entropy

    monkeypatch.setenv("QWENLONG_BACKEND", backend)  # triton: the interpreter on CPU (conftest), tiny shapes

    torch.manual_seed(4)
    hidden = torch.randn(*shape, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    labels = torch.randint(0, 40, shape)
    logp, entropy = linear_cross_entropy(hidden, weight, labels, temperature=0.8)
    ref_logp, ref_entropy = _verl_reference_logprobs_entropy(hidden, weight, labels, 0.8)
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=1e-5, atol=1e-5)
    upstream = torch.randn(2, *shape, dtype=torch.float64)
    grads = torch.autograd.grad((logp * upstream[0] + entropy * upstream[1]).sum(), (hidden, weight))
    ref_grads = torch.autograd.grad((ref_logp * upstream[0] + ref_entropy * upstream[1]).sum(), (hidden, weight))
    for got, expected in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, expected.float(), rtol=1e-4, atol=1e-5)
    total, _ = linear_cross_entropy(hidden, weight, labels, temperature=0.8, reduction="sum")
    mean, _ = linear_cross_entropy(hidden, weight, labels, temperature=0.8, reduction="mean")
    torch.testing.assert_close(total.double(), ref_logp.sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean.double(), ref_logp.mean(), rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError, match="dist_process_group"):
        linear_cross_entropy(hidden, weight, labels, dist_process_group=object())
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, labels, reduction="max")


def test_verl_fused_linear_for_ppo_dtypes_are_verls():
    """verl's FusedLinearForPPO returns fp32 log-probs and the entropy in the hidden states' dtype."""
    from qwenlong.integrations.verl import FusedLinearForPPO

    torch.manual_seed(5)
    hidden, weight = torch.randn(2, 6, 16, dtype=torch.bfloat16), torch.randn(40, 16, dtype=torch.bfloat16)
    input_ids = torch.randint(0, 40, (2, 6))
    logp, entropy = FusedLinearForPPO(impl_backend="liger")(hidden, weight, input_ids, temperature=1.3)
    assert logp.dtype == torch.float32 and entropy.dtype == torch.bfloat16 and logp.shape == entropy.shape == (2, 6)
    ref_logp, ref_entropy = _verl_reference_logprobs_entropy(hidden, weight, input_ids, 1.3)
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="impl_backend"):
        FusedLinearForPPO(impl_backend="triton")


# verl's policy losses, reductions, fused forward and reward loader are tested inside verl itself:
# tests/integrations_real/test_verl.py (run by tools/ci_integrations.sh).


# OpenRLHF's Actor, PolicyLoss and DeepspeedStrategy with QwenlongActor are tested inside OpenRLHF itself:
# tests/integrations_real/test_openrlhf.py (run by tools/ci_integrations.sh).


# ---------------------------------------------------------------------------------------- examples


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_hf_fused_loss():
    losses = _example("hf_fused_loss").main(steps=3, lengths=(12, 7, 9))
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_example_trl_grpo(tmp_path):
    logs = _example("trl_grpo").main(max_steps=1, output_dir=str(tmp_path))
    assert len(logs) == 1 and {"loss", "reward", "kl"} <= set(logs[0])
