"""Rollout engines on a tiny random Qwen2 model: shapes, seeds, log-probs, weight updates."""

from __future__ import annotations

import random
import sys

import pytest
import torch
from helpers import run_rank_threads, tiny_causal_lm

from qwenlong.rollout import Completion, HFGenerateEngine, RolloutEngine, SamplingParams, logprob_mismatch

transformers = pytest.importorskip("transformers")

EOS = 3
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [1]]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: intra-op threads only add overhead (10x on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_qwen2(seed: int):
    return tiny_causal_lm(seed=seed, vocab_size=48, max_positions=128, initializer_range=0.3,
                          tie_word_embeddings=False).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_qwen2(seed=0)


def teacher_forced_logprobs(model, prompt: list[int], response: list[int], temperature: float) -> torch.Tensor:
    """The trainer's view: one unpadded forward pass over prompt + response."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
    return logprobs[positions, torch.tensor(response)]


def test_shapes_and_stop_handling(model):
    engine = HFGenerateEngine(model, eos_token_id=EOS, max_batch_size=4)
    params = SamplingParams(max_new_tokens=12, temperature=1.0, n=3, stop_token_ids=[7], seed=0)
    groups = engine.generate(PROMPTS, params)
    assert len(groups) == len(PROMPTS) and all(len(group) == 3 for group in groups)
    reasons = set()
    for completion in (c for group in groups for c in group):
        assert isinstance(completion, Completion)
        assert 1 <= len(completion.token_ids) <= 12 and len(completion.logprobs) == len(completion.token_ids)
        assert all(lp <= 0 for lp in completion.logprobs)
        stops = [t for t in completion.token_ids if t in (EOS, 7)]
        if completion.finish_reason == "stop":
            assert stops == [completion.token_ids[-1]]  # ends at the first stop token, inclusive
        else:
            assert not stops and len(completion.token_ids) == 12
        reasons.add(completion.finish_reason)
    assert reasons == {"stop", "length"}  # this seed exercises both paths


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 0.9)])
def test_logprobs_match_teacher_forced_recomputation(model, temperature, top_p):
    engine = HFGenerateEngine(model, eos_token_id=EOS, max_batch_size=16)
    params = SamplingParams(max_new_tokens=10, temperature=temperature, top_p=top_p, n=2, seed=1)
    engine_lp, trainer_lp = [], []
    for prompt, group in zip(PROMPTS, engine.generate(PROMPTS, params), strict=True):
        for completion in group:  # prompts of different lengths were left-padded together
            engine_lp.append(torch.tensor(completion.logprobs))
            trainer_lp.append(teacher_forced_logprobs(model, prompt, completion.token_ids, temperature))
    engine_lp, trainer_lp = torch.cat(engine_lp), torch.cat(trainer_lp)
    torch.testing.assert_close(engine_lp, trainer_lp, rtol=1e-4, atol=1e-4)
    mismatch = logprob_mismatch(engine_lp, trainer_lp)
    assert mismatch["logprob_abs_diff_max"] < 1e-4 and abs(mismatch["kl_k3"]) < 1e-6


def stored_logits_reference(model, prompts, params: SamplingParams):
    """The plain way: keep generate's raw logits for every step, then gather the sampled tokens."""
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[EOS] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(params.seed)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True,
                         temperature=params.temperature, top_p=params.top_p, top_k=0,
                         max_new_tokens=params.max_new_tokens, eos_token_id=EOS, pad_token_id=EOS,
                         output_logits=True, return_dict_in_generate=True,
                         generation_config=transformers.GenerationConfig())
    tokens = out.sequences[:, width:]
    logits = torch.stack(out.logits, dim=1).double()  # [rows, new, vocab]
    logprobs = torch.log_softmax(logits / params.temperature, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return tokens, logprobs


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.6, 0.8)])
def test_logprobs_equal_the_stored_logits_reference(model, temperature, top_p):
    params = SamplingParams(max_new_tokens=9, temperature=temperature, top_p=top_p, seed=3)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [1], [20, 21]]
    tokens, reference = stored_logits_reference(model, prompts, params)
    engine = HFGenerateEngine(model, eos_token_id=EOS, max_batch_size=len(prompts))
    for row, (completion,) in enumerate(engine.generate(prompts, params)):
        n = len(completion.token_ids)
        assert completion.token_ids == tokens[row, :n].tolist()
        torch.testing.assert_close(torch.tensor(completion.logprobs, dtype=torch.float64), reference[row, :n],
                                   rtol=1e-5, atol=1e-5)


def test_greedy_decoding_at_temperature_zero(model):
    engine = HFGenerateEngine(model, eos_token_id=EOS, max_batch_size=2)
    params = SamplingParams(max_new_tokens=8, temperature=0.0, n=2, seed=None)
    groups = engine.generate(PROMPTS, params)
    for prompt, group in zip(PROMPTS, groups, strict=True):
        assert group[0] == group[1]  # no sampling: every sample is the same
        completion = group[0]
        ids = torch.tensor([prompt + completion.token_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].double()
        assert completion.token_ids == logits.argmax(-1).tolist()
        torch.testing.assert_close(torch.tensor(completion.logprobs, dtype=torch.float64),
                                   torch.log_softmax(logits, -1).max(-1).values, rtol=1e-5, atol=1e-5)


def test_same_seed_same_rollouts_and_global_rng_untouched(model):
    engine = HFGenerateEngine(model, eos_token_id=EOS)
    params = SamplingParams(max_new_tokens=8, n=4, seed=123)
    torch.manual_seed(7)
    first = engine.generate(PROMPTS, params)
    after_first = torch.rand(1)
    torch.manual_seed(7)
    second = engine.generate(PROMPTS, params)
    assert first == second and torch.equal(after_first, torch.rand(1))
    other = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, n=4, seed=124))
    assert [c.token_ids for g in other for c in g] != [c.token_ids for g in first for c in g]


@pytest.mark.gpu
def test_seeded_generation_on_a_gpu_leaves_its_generator_as_it_was():
    """Sampling on a GPU draws from its generator, which the seed resets: the engine puts it back after."""
    engine = HFGenerateEngine(tiny_qwen2(seed=0).cuda(), eos_token_id=EOS)
    torch.cuda.manual_seed(7)
    before = torch.cuda.get_rng_state()
    first = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, n=4, seed=123))
    assert torch.equal(torch.cuda.get_rng_state(), before)
    assert engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, n=4, seed=123)) == first


def test_seeded_generation_leaves_every_gpu_generator_as_it_was(model, monkeypatch):
    """``torch.manual_seed`` reseeds every GPU's generator, but the engine forked only the one of its model's first
    parameter: a policy spread over GPUs (``device_map``: it samples on the LM head's GPU, not the embeddings') or
    kept on the CPU left the other GPUs reseeded. Two GPUs are faked (their generators as 1-byte states)."""
    gpus = [torch.tensor([11], dtype=torch.uint8), torch.tensor([22], dtype=torch.uint8)]

    def index(device):
        return 0 if device in (None, "cuda") else device if isinstance(device, int) else torch.device(device).index

    def set_state(state, device="cuda"):
        gpus[index(device)] = state.clone()

    def seed_all(seed):
        gpus[:] = [torch.tensor([seed % 256], dtype=torch.uint8) for _ in gpus]

    for name, value in {"is_available": lambda: True, "device_count": lambda: len(gpus), "current_device": lambda: 0,
                        "_is_in_bad_fork": lambda: False, "get_rng_state": lambda device="cuda": gpus[index(device)],
                        "set_rng_state": set_state, "manual_seed_all": seed_all}.items():
        monkeypatch.setattr(torch.cuda, name, value)
    HFGenerateEngine(model, eos_token_id=EOS).generate(PROMPTS, SamplingParams(max_new_tokens=4, n=2, seed=123))
    assert [g.tolist() for g in gpus] == [[11], [22]]


def test_checkpoint_generation_defaults_do_not_change_sampling():
    policy = tiny_qwen2(seed=0)
    policy.generation_config.min_p = 0.99  # a shipped default that would make sampling greedy here
    policy.train()
    engine = HFGenerateEngine(policy, eos_token_id=EOS)
    (group,) = engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=6, n=8, seed=0))
    assert len({tuple(c.token_ids) for c in group}) > 1
    assert policy.generation_config.min_p == 0.99
    assert policy.training  # the caller's mode is restored


def test_update_weights_changes_outputs(model):
    policy = tiny_qwen2(seed=0)
    engine = HFGenerateEngine(policy, eos_token_id=EOS)
    params = SamplingParams(max_new_tokens=6, temperature=1.0, n=2, seed=5)
    before = engine.generate(PROMPTS, params)
    updated = tiny_qwen2(seed=1)
    engine.update_weights(updated.state_dict().items())
    after = engine.generate(PROMPTS, params)
    assert [c.token_ids for g in after for c in g] != [c.token_ids for g in before for c in g]
    for prompt, group in zip(PROMPTS, after, strict=True):  # sampled from the new weights, not the old
        for completion in group:
            new = teacher_forced_logprobs(updated, prompt, completion.token_ids, 1.0)
            old = teacher_forced_logprobs(model, prompt, completion.token_ids, 1.0)
            torch.testing.assert_close(torch.tensor(completion.logprobs), new, rtol=1e-4, atol=1e-4)
            assert not torch.allclose(torch.tensor(completion.logprobs), old, atol=1e-2)
    head = policy.lm_head.weight
    with pytest.raises(ValueError, match="no parameter"):
        engine.update_weights([("lm_head.bias", head)])
    with pytest.raises(ValueError, match="shape"):
        engine.update_weights([("lm_head.weight", head[:3])])


def test_logprob_mismatch_against_formulas():
    engine = torch.log(torch.tensor([0.5, 0.25, 0.1, 0.9]))
    trainer = torch.log(torch.tensor([0.4, 0.25, 0.2, 0.1]))
    mask = torch.tensor([True, True, True, False])
    got = logprob_mismatch(engine, trainer, mask)
    diffs = [abs(a - b) for a, b in zip(engine[:3].tolist(), trainer[:3].tolist(), strict=True)]
    assert got["logprob_abs_diff_mean"] == pytest.approx(sum(diffs) / 3)
    assert got["logprob_abs_diff_max"] == pytest.approx(max(diffs))
    assert got["prob_abs_diff_mean"] == pytest.approx((0.1 + 0.0 + 0.1) / 3)
    expected_k3 = sum(r - 1 - torch.log(torch.tensor(r)).item() for r in (0.4 / 0.5, 1.0, 0.2 / 0.1)) / 3
    assert got["kl_k3"] == pytest.approx(expected_k3)
    assert logprob_mismatch(engine, trainer, torch.zeros(4, dtype=torch.bool))["logprob_abs_diff_max"] == 0.0
    with pytest.raises(ValueError, match="trainer_logprobs"):
        logprob_mismatch(engine, trainer[:2])


def test_bad_arguments():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(max_new_tokens=4, temperature=-0.5)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(max_new_tokens=4, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)


def test_vllm_engine_without_vllm_says_how_to_fix(monkeypatch):
    from qwenlong.rollout import VLLMEngine

    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` fail even where it is installed
    with pytest.raises(ImportError, match=r"VLLMEngine needs vllm.*rollout\.engine=hf"):
        VLLMEngine("some/model")


def test_vllm_weight_sync_streams_in_bounded_chunks():
    from qwenlong.rollout.vllm_engine import weight_chunks

    sizes = [random.randint(1, 40) for _ in range(30)] + [100]  # the last is larger than a chunk on its own
    pulled = []

    def stream():  # records how far the consumer has pulled
        for i, n in enumerate(sizes):
            pulled.append(i)
            yield f"p{i}", torch.zeros(n, dtype=torch.float32)

    limit = 64 * 4  # bytes: 64 fp32 values
    seen = []
    for chunk in weight_chunks(stream(), limit):
        names = [name for name, _ in chunk]
        assert pulled[-1] <= int(names[-1][1:]) + 1  # nothing read beyond the next pair
        total = sum(t.numel() * 4 for _, t in chunk)
        assert total <= limit or len(chunk) == 1
        seen += names
    assert seen == [f"p{i}" for i in range(len(sizes))]  # every pair once, in order
    with pytest.raises(ValueError, match="weight_chunk_bytes"):
        from qwenlong.rollout import VLLMEngine

        VLLMEngine("some/model", weight_chunk_bytes=0)


def test_vllm_engine_is_a_rollout_engine():
    pytest.importorskip("vllm")
    from qwenlong.rollout import RolloutEngine, VLLMEngine

    assert issubclass(VLLMEngine, RolloutEngine)


def test_hf_engine_reports_each_group_once_its_batch_is_done(model):
    """Batches of 4 rows with n=3: a group split over two batches is reported after the second; each group
    is reported once, in prompt order, equal to what generate returns, before generate returns."""
    engine = HFGenerateEngine(model, eos_token_id=EOS, max_batch_size=4)
    batches_done = []
    generate_batch = engine._generate_batch
    engine._generate_batch = lambda rows, params: batches_done.append(len(rows)) or generate_batch(rows, params)
    reports = []
    prompts = [*PROMPTS, [4, 5]]
    params = SamplingParams(max_new_tokens=5, temperature=1.0, n=3, seed=2)
    groups = engine.generate(prompts, params, on_complete=lambda i, g: reports.append((i, g, len(batches_done))))
    assert [i for i, _, _ in reports] == [0, 1, 2, 3]
    assert [g for _, g, _ in reports] == groups
    # prompt i's rows are 3i..3i+2: batch 1 (rows 0-3) completes prompt 0, batch 2 (rows 4-7) prompt 1,
    # batch 3 (rows 8-11) prompts 2 and 3
    assert [batches for _, _, batches in reports] == [1, 2, 3, 3]
    assert groups == HFGenerateEngine(model, eos_token_id=EOS, max_batch_size=4).generate(prompts, params)


def test_unseeded_calls_draw_fresh_samples_from_the_global_generator(model):
    """seed=None samples from torch's global generator and moves it on, as torch's own sampling does: two
    unseeded calls must not repeat each other, and the global seed still reproduces them."""
    engine = HFGenerateEngine(model, eos_token_id=EOS)
    params = SamplingParams(max_new_tokens=8, n=4)
    torch.manual_seed(11)
    first, second = engine.generate(PROMPTS, params), engine.generate(PROMPTS, params)
    assert [c.token_ids for g in first for c in g] != [c.token_ids for g in second for c in g]
    torch.manual_seed(11)
    assert engine.generate(PROMPTS, params) == first


def test_update_weights_takes_a_tied_models_state_dict():
    """A state dict names a tied weight under every owner (``lm_head.weight`` beside ``model.embed_tokens.weight``):
    each name must be accepted, and generation must follow the new weights."""
    policy = tiny_causal_lm(seed=0, vocab_size=48, max_positions=128, initializer_range=0.3,
                            tie_word_embeddings=True).eval()
    updated = tiny_causal_lm(seed=1, vocab_size=48, max_positions=128, initializer_range=0.3,
                             tie_word_embeddings=True).eval()
    assert "lm_head.weight" in updated.state_dict()
    engine = HFGenerateEngine(policy, eos_token_id=EOS)
    engine.update_weights(updated.state_dict().items())
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    expected = HFGenerateEngine(updated, eos_token_id=EOS).generate(PROMPTS, params)
    assert engine.generate(PROMPTS, params) == expected


@pytest.mark.parametrize("bad", [48, -1])
def test_out_of_vocabulary_prompt_token_is_refused_by_name(model, bad):
    """An id outside the embedding table fails in the embedding lookup (on a GPU, as a device-side assert that
    poisons the CUDA context); the engine says which prompt and token instead."""
    engine = HFGenerateEngine(model, eos_token_id=EOS)
    with pytest.raises(ValueError, match=rf"prompts: prompt 1 has token id {bad}.*vocabulary of 48"):
        engine.generate([[5, 6], [7, bad, 8]], SamplingParams(max_new_tokens=3))


def test_nan_temperature_is_refused():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(max_new_tokens=4, temperature=float("nan"))


class PositionSeededEngine(RolloutEngine):
    """Samples as vLLM does with a seed: prompt i's sample j depends only on the prompt and seed + i * n + j."""

    def generate(self, prompts, params, on_complete=None):
        def sample(prompt, seed):
            rng = random.Random(f"{prompt}:{seed}")
            tokens = [rng.randrange(1000) for _ in range(params.max_new_tokens)]
            return Completion(tokens, [0.0] * len(tokens), "length")

        return [[sample(p, params.seed + i * params.n + j) for j in range(params.n)] for i, p in enumerate(prompts)]

    def update_weights(self, named_tensors):
        pass


def test_placed_engines_give_identical_prompts_their_own_samples():
    """The memory agent's group is G identical prompts in one seeded call; placed over engines (every
    num_engines-th pooled prompt to each), copies land on several engines at the same position: they must still
    sample independently, or the group's trajectories repeat each other."""
    from qwenlong.plan.placement import rollout_placement
    from qwenlong.rollout.colocated import PlacedEngine

    world = 2
    placement = rollout_placement(world, 1)
    results = [None] * world

    def rank_main(rank, gather):
        engine = PlacedEngine(PositionSeededEngine(), placement, rank, gather)
        prompts = [[10 + rank, 11]] * 4  # one query's group of 4 on each rank
        results[rank] = engine.generate(prompts, SamplingParams(max_new_tokens=6, n=2, seed=9))

    run_rank_threads(world, rank_main)
    for groups in results:
        samples = [tuple(c.token_ids) for g in groups for c in g]
        assert len(samples) == 8 and len(set(samples)) == 8


def fake_vllm(monkeypatch) -> dict:
    """A stand-in ``vllm`` whose ``LLM`` records the keyword arguments it was built with."""
    import types

    made: dict = {}

    class LLM:
        def __init__(self, **kwargs):
            made.update(kwargs)
            self.llm_engine = types.SimpleNamespace(model_config=types.SimpleNamespace(hf_config=None))

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM))
    return made


@pytest.mark.parametrize("tp", [1, 2])
def test_vllm_engines_of_a_gpu_world_sit_on_their_own_gpus(monkeypatch, tp):
    """Under torchrun on GPUs every rank builds its own engine, which must sit on the rank's GPU (LOCAL_RANK).
    vLLM's one-process executor takes the device index from its device config ("cuda": index 0), so every
    rank of a TP-1 world would put its engine on GPU 0 (and make GPU 0 the rank's current device); only the
    external launcher reads LOCAL_RANK."""
    from qwenlong.rollout.vllm_engine import VLLMEngine

    made = fake_vllm(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 4)
    VLLMEngine("some/model", tensor_parallel_size=tp)
    assert made["distributed_executor_backend"] == "external_launcher"
    VLLMEngine("some/model", tensor_parallel_size=tp, distributed_executor_backend="mp")  # the caller's choice
    assert made["distributed_executor_backend"] == "mp"


def test_vllm_engine_of_one_process_keeps_vllms_executor(monkeypatch):
    """One process keeps vLLM's own executor; on CPU so does a TP-1 engine of a world (the CPU build's executor,
    as the two-process vLLM pipeline test runs it), while a TP slice of ranks takes the external launcher."""
    from qwenlong.rollout.vllm_engine import VLLMEngine

    made = fake_vllm(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    VLLMEngine("some/model")
    assert "distributed_executor_backend" not in made
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    VLLMEngine("some/model")
    assert "distributed_executor_backend" not in made
    VLLMEngine("some/model", tensor_parallel_size=2)
    assert made["distributed_executor_backend"] == "external_launcher"
