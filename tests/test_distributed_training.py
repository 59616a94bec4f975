"""The trainers on two gloo processes started from pytest: data parallel (plain and DeepSpeed ZeRO)
and sequence parallel give the single-process results on the same global batch; under ZeRO-3 (tied LM
head included) the saved weights, rollouts and evaluation answers are those of whole weights; bf16 under
ZeRO-2 and 3 updates as fp32 does.

Every rank builds the same tiny model and data from shared seeds and also runs the single-process
reference itself, so each rank checks its own numbers. Process start-up (and DeepSpeed's
initialization) dominates the cost, so one pair of processes runs all the checks (a module-scoped
fixture) and each test reports the outcome of one of them.
"""

from __future__ import annotations

import functools
import json
import random
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_tcp_port, spawn
from test_trainers import VOCAB, _grpo_groups, random_pairs, tiny_model

from qwenlong.rollout.engine import RolloutEngine

FP32 = {"rtol": 1e-5, "atol": 1e-6}
# Weights after Adam steps at lr 1e-2: Adam divides by sqrt(v), so near-zero gradient entries turn fp32
# summation-order differences into ~1e-6 weight differences. Adam is also blind to a global gradient scale,
# so every check also compares the loss and the gradient norm.
ADAM_WEIGHTS = {"rtol": 1e-4, "atol": 1e-5}


def _context(sp_size: int = 1, deepspeed_stage: int = 0):
    from qwenlong.config.schema import DistributedConfig
    from qwenlong.distributed import init_distributed

    cfg = DistributedConfig(backend="gloo", sp_size=sp_size, deepspeed_stage=deepspeed_stage)
    return init_distributed(cfg, timeout=timedelta(seconds=90)), cfg


def _assert_same_weights(actual: dict, expected: dict, what: str, **tol):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], msg=lambda m, n=name: f"{what} {n}: {m}",
                                   **(tol or FP32))


def _rl_config(**overrides):
    from qwenlong.config import RLConfig
    from qwenlong.curriculum import Phase

    options = dict(group_size=4, gen_prompts_per_step=3, train_prompts_per_step=3, mini_batch_size=3,
                   temperature=0.8, micro_batch_token_budget=24, lr=1e-2, grad_clip=0.5, ppo_epochs=2,
                   phases=[Phase("p", 64, 8, steps=1)])
    return RLConfig(**{**options, **overrides})


# --- data parallel: plain gradient all-reduce ----------------------------------------------------------------


def _check_plain_dp_grpo_update(tmp, budget: int):
    """Two ranks, each with its share of the micro-batches, make the single-process update (two optimizer
    steps: ppo_epochs 2, with clipping) on the same groups. Budget 24 packs 7 micro-batches (rank 1 pads
    its share with a loss-free batch), a large one packs 1 (rank 1 has nothing else to run)."""
    from qwenlong.distributed import TrainingBackend
    from qwenlong.trainers import GRPOTrainer
    from qwenlong.trainers.grpo import RolloutBatch

    ctx, _ = _context()
    groups = _grpo_groups(seed=11)
    results = {}
    for name, backend_ctx in (("single", None), ("dp", ctx)):
        model = tiny_model(seed=4)
        trainer = GRPOTrainer(model, engine=None, reward=None, cfg=_rl_config(micro_batch_token_budget=budget),
                              decode=str, output_dir=tmp,
                              backend=TrainingBackend(model, backend_ctx))
        trainer.backend.start(lr=1e-2, weight_decay=0.0, total_steps=4, warmup_steps=0, schedule="constant",
                              grad_clip=0.5)
        batches = trainer._micro_batches(RolloutBatch.from_groups(groups, trainer._advantages(groups)))
        if name == "dp":  # the micro-batches really are split: each rank packs only its (padded) share
            assert len(batches) == -(-results["single_batches"] // 2)
            assert ctx.sum({"sequences": sum(len(b.sequence_ids) for b in batches)})["sequences"] == 12
        else:
            results["single_batches"] = len(batches)
        results[name] = (trainer.update(groups), {k: v.clone() for k, v in model.state_dict().items()})
    single, dp = results["single"], results["dp"]
    _assert_same_weights(dp[1], single[1], "DP GRPO weights", **ADAM_WEIGHTS)
    # the engine-vs-trainer log-prob mismatch covers every rank's micro-batches, as one process's covers all
    for key in ("loss", "grad_norm", "ratio_mean", "clip_fraction", "engine_logprob_abs_diff_mean",
                "engine_logprob_abs_diff_max", "engine_kl_k3"):
        if key in single[0]:
            assert dp[0][key] == pytest.approx(single[0][key], rel=1e-5, abs=1e-7), key
    assert single[0]["engine_logprob_abs_diff_max"] > 0


def _check_entropy_control_over_split_trajectories(tmp):
    """Entropy control over two ranks whose micro-batches split responses of several sequences (memory-agent
    trajectories): each response's mean entropy sums every rank's part, so the batch entropy, the response
    counts and every token's keep decision are the single process's."""
    from qwenlong.config.schema import EntropyControlConfig
    from qwenlong.distributed import TrainingBackend
    from qwenlong.trainers import GRPOTrainer
    from qwenlong.trainers.grpo import RolloutBatch

    ctx, _ = _context()
    groups = _grpo_groups(seed=14)
    results = {}
    for name, backend_ctx in (("single", None), ("dp", ctx)):
        model = tiny_model(seed=7)
        control = EntropyControlConfig(tau_sequence=0.0, entropy_low=0.0, entropy_high=100.0)
        trainer = GRPOTrainer(model, engine=None, reward=None, decode=str, output_dir=tmp,
                              cfg=_rl_config(micro_batch_token_budget=24, entropy_control=control),
                              backend=TrainingBackend(model, backend_ctx))
        flat = RolloutBatch.from_groups(groups, trainer._advantages(groups))
        # pairs of consecutive sequences as one response (trajectories of two steps) with the second's advantage
        # and reward (a mix of signs here)
        second = [i | 1 for i in range(len(flat.sequences))]
        rollout = RolloutBatch(flat.sequences, flat.prompt_lengths, flat.engine_logprobs,
                               [flat.advantages[i] for i in second], flat.response_tokens,
                               [flat.rewards[i] for i in second], response_of=[i // 2 for i in second])
        batches = trainer._micro_batches(rollout)
        trainer._old_logprobs(batches)
        metrics = trainer._entropy_control([(rollout, batches)])
        keep = {i: values.tolist() for batch in batches for i, values in zip(
            batch.sequence_ids, batch.token_values["loss_keep"].split(batch.cu_seqlens.diff().tolist()), strict=False)}
        if backend_ctx is not None:  # every rank's sequences
            keep = {i: k for share in ctx.gather(keep) for i, k in share.items()}
            owned = ctx.gather({i // 2 for batch in batches for i in batch.sequence_ids})  # responses per rank
            assert owned[0] & owned[1], "no response is split over the two ranks: the check tests nothing"
        results[name] = (metrics, keep)
    single, dp = results["single"], results["dp"]
    assert single[0]["entropy_control/responses"] == len(rollout.sequences) // 2
    for key, value in single[0].items():
        assert dp[0][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert dp[1] == single[1]
    assert 0 < single[0]["entropy_control/tokens_kept"] < single[0]["entropy_control/tokens"]


# --- rollouts split over ranks ------------------------------------------------------------------------------


class _ScriptedEngine(RolloutEngine):
    """Responses that depend on (prompt, seed, sample index) only; records which prompts it generated."""

    def __init__(self):
        self.generated: list[list[int]] = []

    def generate(self, prompts, params, on_complete=None):
        from qwenlong.rollout.engine import Completion, report_all

        self.generated += [list(p) for p in prompts]
        out = []
        for prompt in prompts:
            rng = random.Random(f"{prompt}:{params.seed}")
            group = []
            for _ in range(params.n):
                tokens = [rng.randrange(61) for _ in range(rng.randint(1, params.max_new_tokens))]
                group.append(Completion(tokens, [-rng.random() for _ in tokens], "length"))
            out.append(group)
        return report_all(out, on_complete)

    def update_weights(self, named_tensors):
        raise AssertionError("the scripted engine has no weights to update")


class _ScriptedReward:
    """Score 1 for responses whose first token is a multiple of 5: most groups are all 0, so dynamic
    sampling needs several rounds."""

    def score(self, items):
        from qwenlong.rewards.hybrid import RewardResult

        return [RewardResult(float(int(item.response.split(",")[0]) % 5 == 0), 0.0, None, None) for item in items]


def _check_rollouts_split_and_gathered(tmp, sp_size: int):
    """Every rank ends a step's collection (dynamic sampling over several rounds) with the groups, rewards and
    reward history of one process; data-parallel ranks each generate their share of the prompts, and in a
    sequence-parallel group only SP rank 0 generates."""
    from qwenlong.config.schema import DynamicSamplingConfig
    from qwenlong.curriculum import Phase, PromptSampler
    from qwenlong.distributed import TrainingBackend
    from qwenlong.trainers import GRPOTrainer
    from qwenlong.trainers.grpo import PromptExample

    ctx, _ = _context(sp_size=sp_size)
    rng = random.Random(15)
    examples = [PromptExample(f"ex{i}", [rng.randrange(61) for _ in range(rng.randint(2, 9))], "synthetic_copy", [])
                for i in range(9)]
    cfg = _rl_config(gen_prompts_per_step=5, train_prompts_per_step=4, mini_batch_size=4, group_size=3,
                     dynamic_sampling=DynamicSamplingConfig(enabled=True, max_rounds=3))
    phase = Phase("p", 64, 6, steps=1)
    collected = {}
    for name, backend_ctx in (("single", None), ("split", ctx)):
        engine = _ScriptedEngine()
        model = tiny_model(seed=9)
        trainer = GRPOTrainer(model, engine, _ScriptedReward(), cfg, decode=lambda ids: ",".join(map(str, ids)),
                              output_dir=tmp, backend=TrainingBackend(model, backend_ctx))
        sampler = PromptSampler([e.data_source for e in examples], key="rollouts")  # every rank draws the same
        groups, metrics = trainer.collect(phase, examples, step=0, sampler=sampler)
        untimed = {key: value for key, value in metrics.items() if not key.startswith("time_")}  # wall clock
        collected[name] = ([(g.example.id, g.responses, g.engine_logprobs, g.rewards) for g in groups], untimed,
                           trainer.history.to_json(), engine.generated)
    single, split = collected["single"], collected["split"]
    assert split[:3] == single[:3]
    rounds = [single[3][start:start + 5] for start in range(0, len(single[3]), 5)]
    assert len(rounds) > 1, "dynamic sampling should need more than one round here"
    share = [prompt for prompts in rounds for prompt in prompts[ctx.dp_rank::ctx.dp_size]]
    assert split[3] == (share if ctx.sp_rank == 0 else [])  # its share of every round's prompts, in order


# --- sequence parallel ---------------------------------------------------------------------------------------


def _summed_grads(model, group) -> dict[str, torch.Tensor]:
    grads = {}
    for name, p in model.named_parameters():
        grad = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        if group is not None:
            dist.all_reduce(grad, group=group)
        grads[name] = grad
    return grads


def _check_sequence_parallel_steps(tmp):
    """SP = 2 (every rank a token shard of every micro-batch) gives the SP = 1 loss and gradients of an SFT
    step and of a GRPO mini-batch (log-probs of the old policy included)."""
    from qwenlong.config import SFTConfig
    from qwenlong.distributed import TrainingBackend
    from qwenlong.trainers import GRPOTrainer, SFTTrainer
    from qwenlong.trainers.grpo import RolloutBatch

    ctx, _ = _context(sp_size=2)
    assert ctx.sp_size == 2 and ctx.dp_size == 1
    pairs = random_pairs(12, seed=12)
    cfg = SFTConfig(steps=1, lr=1e-3, token_budget=40, max_seq_len=64)
    sft = {}
    for name, backend_ctx in (("sp1", None), ("sp2", ctx)):
        model = tiny_model(seed=5)
        trainer = SFTTrainer(model, pairs, cfg, output_dir=tmp, backend=TrainingBackend(model, backend_ctx))
        step_batches = [list(range(0, 5)), list(range(5, 12))]  # the same micro-batches for both
        metrics = trainer.ctx.sum(trainer.accumulate(step_batches))
        sft[name] = (metrics, _summed_grads(model, backend_ctx and backend_ctx.sp_group))
    assert sft["sp2"][0]["loss"] == pytest.approx(sft["sp1"][0]["loss"], rel=1e-5)
    # the packed tokens, each once (the shards' padding to a multiple of the group size counted in SP's)
    assert sft["sp2"][0]["tokens"] == sft["sp1"][0]["tokens"] == sum(map(len, (p + r for p, r in pairs)))
    _assert_same_weights(sft["sp2"][1], sft["sp1"][1], "SP SFT grad", rtol=1e-4, atol=1e-6)

    groups = _grpo_groups(seed=13)
    grpo = {}
    for name, backend_ctx in (("sp1", None), ("sp2", ctx)):
        model = tiny_model(seed=6)
        trainer = GRPOTrainer(model, engine=None, reward=None, cfg=_rl_config(kl_coef=0.1, ppo_epochs=1),
                              decode=str, output_dir=tmp, backend=TrainingBackend(model, backend_ctx))
        trainer.reference = tiny_model(seed=8).requires_grad_(False)  # a policy other than the current one
        rollout = RolloutBatch.from_groups(groups, trainer._advantages(groups))
        batches = trainer._micro_batches(rollout)
        trainer._old_logprobs(batches)
        for batch in batches:  # an off-policy old policy, so the ratios are not all 1
            batch.token_values["old_logprobs"] -= 0.1 * batch.mask
        metrics = trainer.accumulate(batches, sum(rollout.response_tokens), len(rollout.sequences))
        grpo[name] = (metrics, _summed_grads(model, backend_ctx and backend_ctx.sp_group))
    for key, value in grpo["sp1"][0].items():
        assert grpo["sp2"][0][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    _assert_same_weights(grpo["sp2"][1], grpo["sp1"][1], "SP GRPO grad", rtol=1e-4, atol=1e-6)


# --- DeepSpeed ZeRO -----------------------------------------------------------------------------------------


def _tied_tiny_model(seed: int):
    """``tiny_model`` with its LM head tied to the input embeddings (as small Qwen checkpoints ship)."""
    from transformers import AutoModelForCausalLM

    config = tiny_model().config
    config.tie_word_embeddings = True
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="qwenlong", dtype=torch.float32)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return model


def _sft_run(tmp, backend_factory, steps: int, grad_accum_steps: int, resume: bool = False, tied: bool = False):
    from qwenlong.config import SFTConfig
    from qwenlong.trainers import SFTTrainer

    cfg = SFTConfig(steps=steps, lr=3e-3, token_budget=40, max_seq_len=64, warmup_steps=1, grad_clip=0.5,
                    grad_accum_steps=grad_accum_steps)
    model = (_tied_tiny_model if tied else tiny_model)(seed=7 if not resume else 99)
    trainer = SFTTrainer(model, random_pairs(24, seed=14), cfg, output_dir=tmp, backend=backend_factory(model))
    if resume:
        assert trainer.resume()
    return trainer


def _check_deepspeed_sft(own, shared, stage: int, tied: bool = False):
    """ZeRO-``stage`` SFT on two ranks (one micro-batch each per step) ends with the weights of a single
    process accumulating both micro-batches, and so does the ``model.pt`` it saves; a DeepSpeed checkpoint
    resumes exactly. Returns the DeepSpeed backend."""
    from qwenlong.distributed import TrainingBackend, build_backend

    ctx, cfg = _context(deepspeed_stage=stage)
    run = f"zero{stage}" + ("-tied" if tied else "")
    own, shared = own / run, shared / run
    single = _sft_run(own / "single", TrainingBackend, steps=3, grad_accum_steps=2, tied=tied)
    expected_metrics = single.train()
    expected = single.backend.state_dict()

    def deepspeed_backend(model):
        return build_backend(model, ctx, cfg)

    straight = _sft_run(shared, deepspeed_backend, steps=3, grad_accum_steps=1, tied=tied)
    assert type(straight.backend).__name__ == "DeepSpeedBackend"
    metrics = [straight.train_step() for _ in range(2)]
    straight.save()
    metrics.append(straight.train_step())
    for step, (actual, reference) in enumerate(zip(metrics, expected_metrics, strict=True)):
        for key in ("loss", "grad_norm", "lr", "target_tokens"):
            assert actual[key] == pytest.approx(reference[key], rel=1e-5), f"{run} step {step} {key}"
    weights = straight.backend.state_dict()
    _assert_same_weights(weights, expected, f"{run} SFT weights", **ADAM_WEIGHTS)
    saved = torch.load(straight.backend.save(shared / "final", state={}) / "model.pt", weights_only=True)
    _assert_same_weights(saved, weights, f"{run} model.pt", rtol=0, atol=0)
    if tied:  # one tensor under both names, as torch.save writes a tied model
        assert saved["lm_head.weight"] is saved["model.embed_tokens.weight"]

    resumed = _sft_run(shared, deepspeed_backend, steps=3, grad_accum_steps=1, resume=True, tied=tied)
    assert resumed.step == 2
    resumed.train_step()
    actual = resumed.backend.state_dict()
    for name, value in straight.backend.state_dict().items():
        assert torch.equal(actual[name], value), f"{run} resumed {name}"

    # a second stage on the same engine starts from fresh Adam state and its own schedule, like a new optimizer
    from qwenlong.config import SFTConfig
    from qwenlong.trainers import SFTTrainer

    pairs = random_pairs(24, seed=16)
    after = {}
    for name, first, accum, folder in (("single", single, 2, own / "single-2"),
                                       ("zero", straight, 1, shared / "second")):
        cfg = SFTConfig(steps=2, lr=1e-2, lr_schedule="cosine", token_budget=40, max_seq_len=64, weight_decay=0.1,
                        grad_clip=0.5, grad_accum_steps=accum)
        trainer = SFTTrainer(first.model, pairs, cfg, output_dir=folder, backend=first.backend)
        after[name] = ([trainer.train_step() for _ in range(2)], trainer.backend.state_dict())
    for actual, reference in zip(after["zero"][0], after["single"][0], strict=True):
        for key in ("loss", "grad_norm", "lr"):
            assert actual[key] == pytest.approx(reference[key], rel=1e-4), f"{run} second stage {key}"
    _assert_same_weights(after["zero"][1], after["single"][1], f"{run} second stage", **ADAM_WEIGHTS)
    return straight.backend


def _check_deepspeed_bf16(shared, stage: int):
    """bf16 weights under ZeRO-``stage`` (DeepSpeed steps fp32 master copies): three SFT steps on two ranks
    move the weights as the same run in fp32 does, in direction and size, with losses equal to bf16
    precision, and ``model.pt`` holds bf16 weights."""
    from qwenlong.distributed import build_backend

    ctx, cfg = _context(deepspeed_stage=stage)
    initial = tiny_model(seed=7).state_dict()  # _sft_run's model
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        folder = shared / f"zero{stage}-{dtype}".replace("torch.", "")
        trainer = _sft_run(folder, lambda model, d=dtype: build_backend(model.to(d), ctx, cfg), steps=3,
                           grad_accum_steps=1)
        metrics = trainer.train()
        saved = torch.load(trainer.backend.save(folder / "final", state={}) / "model.pt", weights_only=True)
        assert all(t.dtype == dtype for t in saved.values()), f"zero{stage} {dtype} model.pt"
        start = torch.cat([initial[name].to(dtype).float().flatten() for name in saved])
        runs[dtype] = (metrics, torch.cat([saved[name].float().flatten() for name in saved]) - start)
    (fp32_metrics, fp32_update), (bf16_metrics, bf16_update) = runs[torch.float32], runs[torch.bfloat16]
    for step, (got, want) in enumerate(zip(bf16_metrics, fp32_metrics, strict=True)):
        assert got["loss"] == pytest.approx(want["loss"], rel=2e-2), f"zero{stage} bf16 step {step} loss"
    cosine = torch.nn.functional.cosine_similarity(bf16_update, fp32_update, dim=0)
    size = bf16_update.norm() / fp32_update.norm()
    assert cosine > 0.99 and abs(size - 1) < 0.02, (cosine, size)  # measured: 0.998 and 1.0015 on both stages


def _check_zero3_generation(backend):
    """The HF engine generates with the ZeRO-3 partitioned policy itself, every rank in lockstep on its own
    prompts (other counts, lengths and numbers of batches, early stops, or none at all), and gives the tokens
    and log-probs that a whole copy of the same weights gives in one process: greedy and seeded sampling."""
    from qwenlong.rollout import HFGenerateEngine, SamplingParams

    whole = _tied_tiny_model(seed=0)
    whole.load_state_dict(backend.state_dict())
    rank = dist.get_rank()
    rng = random.Random(17 + rank)
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randint(2, 9))] for _ in range((5, 2)[rank])]
    greedy = SamplingParams(max_new_tokens=6, temperature=0)
    cases = [(prompts, greedy), (prompts, SamplingParams(max_new_tokens=6, temperature=0.9, top_p=0.9, n=2, seed=3)),
             (prompts if rank == 0 else [], greedy)]
    stop_ids = list(range(0, VOCAB, 4))  # some rows stop early, some run to the length limit
    reasons = set()
    for case, (ranks_prompts, params) in enumerate(cases):
        engines = [HFGenerateEngine(model, eos_token_id=stop_ids, max_batch_size=3, generation_attention="sdpa",
                                    synced=synced) for model, synced in ((whole, False), (backend.model, True))]
        expected, actual = (engine.generate(ranks_prompts, params) for engine in engines)
        assert len(actual) == len(expected) == len(ranks_prompts)
        for want_group, got_group in zip(expected, actual, strict=True):
            for want, got in zip(want_group, got_group, strict=True):
                assert (got.token_ids, got.finish_reason) == (want.token_ids, want.finish_reason), f"case {case}"
                torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs), **FP32)
                reasons.add(want.finish_reason)
    assert reasons == {"stop", "length"}


def _far_weights(model, folder: Path, ctx, drop: str | None = None) -> dict[str, torch.Tensor]:
    """Weights far from the initialisation (whose greedy answers are all alike), written by rank 0 as a
    checkpoint's ``model.pt`` (without parameter ``drop``); returns them."""
    generator = torch.Generator().manual_seed(5)
    state, drawn = {}, {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in drawn:  # a tied weight is one tensor under two names
            drawn[id(tensor)] = torch.empty(getattr(tensor, "ds_shape", tensor.shape)).normal_(0.0, 0.5,
                                                                                               generator=generator)
        state[name] = drawn[id(tensor)].to(tensor.dtype)
    if ctx.is_main:
        folder.mkdir(parents=True)
        torch.save({k: v for k, v in state.items() if k != drop}, folder / "model.pt")
    ctx.barrier()
    return state


def _load_far_weights(run, folder: Path) -> None:
    """Load far weights as a checkpoint: under ZeRO-3, rank 0 reads them and scatters them one parameter at a time."""
    state = _far_weights(run.model, folder, run.ctx)
    run.backend.load_weights(folder)
    _assert_same_weights(run.backend.state_dict(), state, "loaded weights", rtol=0, atol=0)


def _check_loaded_weights_survive_a_step(shared, stage: int, dtype: torch.dtype):
    """Weights loaded into a DeepSpeed model (as a resumed stage starts) are the ones it trains on: a step at
    lr 0 leaves them exactly as loaded (DeepSpeed's fp32 master copies follow the load). A ``model.pt``
    missing a weight fails on every rank with the weight's name, with no rank left waiting."""
    from qwenlong.distributed import build_backend

    ctx, cfg = _context(deepspeed_stage=stage)
    backend = build_backend(tiny_model(seed=3).to(dtype), ctx, cfg)
    backend.start(lr=0.0, weight_decay=0.0, total_steps=1, warmup_steps=0, schedule="constant", grad_clip=1.0)
    run = f"zero{stage}-{dtype}".replace("torch.", "")
    state = _far_weights(backend.model, shared / f"{run}-far", ctx)
    backend.load_weights(shared / f"{run}-far")
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(ctx.rank))
    backend.backward(backend.model(input_ids=ids).logits.float().square().mean())
    assert backend.step() > 0
    _assert_same_weights(backend.state_dict(), state, f"{run} weights after a step at lr 0", rtol=0, atol=0)
    if stage == 3:
        _far_weights(backend.model, shared / f"{run}-lacking", ctx, drop="model.norm.weight")
        with pytest.raises(ValueError, match=r"1 of \d+ parameters do not fit: model\.norm\.weight is missing"):
            backend.load_weights(shared / f"{run}-lacking")


def _check_zero3_pretrained_load(policy: Path, tmp: Path):
    """ZeRO-3 with a pretrained policy (``model.name``): every parameter is partitioned as it is created,
    before any engine exists, and the partitions hold the checkpoint's weights exactly."""
    from test_pipeline import SMALL, TINY
    from transformers import AutoModelForCausalLM

    from qwenlong.config import load_config
    from qwenlong.distributed import build_backend, init_distributed
    from qwenlong.pipeline import build

    cfg = load_config(TINY, [*SMALL, f"model.name={policy}", "model.tiny=null", "distributed.deepspeed_stage=3",
                             f"output.dir={tmp / 'run-pretrained'}"])
    ctx = init_distributed(cfg.distributed)
    model = build.build_model(cfg, build.build_tokenizer(cfg, tmp))
    for name, param in model.named_parameters():
        assert param.numel() == 0 and 0 < param.ds_tensor.numel() < param.ds_numel, name
    whole = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).state_dict()
    _assert_same_weights(build_backend(model, ctx, cfg.distributed).state_dict(), whole, "ZeRO-3 pretrained",
                         rtol=0, atol=0)


def _check_zero3_run(tmp):
    """A ZeRO-3 run generates with its partitioned (tied) policy, every rank in lockstep: its held-out answers
    and its first RL step's rollouts are those of a run with whole weights on every rank (deepspeed_stage 0);
    in both, each rank answers its share of the held-out prompts, and the answers are those of one process
    answering them all. The HF folder it saves for vLLM holds its weights."""
    from test_pipeline import SMALL, TINY
    from transformers import AutoModelForCausalLM

    from qwenlong.config import load_config
    from qwenlong.eval import evaluate, hf_generate_fn
    from qwenlong.eval.generation import Sampling
    from qwenlong.pipeline import build
    from qwenlong.pipeline.run import GENERATION_ATTENTION, Run, _rl, save_policy_folder

    results = {}
    for stage in (0, 3):
        folder = Path(tmp) / f"run-zero{stage}"
        # one prompt per RL step: rank 1 has none of its own, yet must generate in lockstep under ZeRO-3
        one_prompt = ["rl.gen_prompts_per_step=1", "rl.train_prompts_per_step=1", "rl.mini_batch_size=1"]
        run = Run(load_config(TINY, [*SMALL, *one_prompt, f"output.dir={folder}", "eval.temperature=0.0",
                                     "eval.samples_per_prompt=1", f"distributed.deepspeed_stage={stage}"]))
        if stage == 3:  # DeepSpeed partitions the weights from the backend's construction on
            assert run.model.get_output_embeddings().weight.numel() == 0
        _load_far_weights(run, folder / "far")
        run.evaluate("untrained")
        answers = [json.loads(line)["response"]
                   for line in (folder / "eval" / "untrained" / "predictions.jsonl").read_text().splitlines()]
        if stage == 0:  # whole weights on each rank: one process can answer every prompt alone
            ev = run.cfg.eval
            one_process = evaluate({"heldout": build.load_split(run.cfg, "eval", run.tokenizer)},
                                   hf_generate_fn(run.model, run.tokenizer, Sampling(ev.max_output_tokens, seed=0,
                                                                                      temperature=0.0),
                                                  max_batch_size=64, generation_attention=GENERATION_ATTENTION),
                                   run.tokenizer, max_input_tokens=ev.max_input_tokens, chat_template_in_budget=True,
                                   batch_size=64, progress=False)
            assert answers == [row["response"] for row in one_process.predictions]
        _rl(run)
        steps = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        results[stage] = answers, next(step for step in steps if step["stage"].startswith("rl/"))
    assert results[3][0] == results[0][0] and len(results[0][0]) == 4 and len(set(results[0][0])) > 1
    for key in ("reward_mean", "response_tokens_mean", "groups_trained"):
        assert results[3][1][key] == results[0][1][key], key
    # engine log-probs against the trainer's recomputation: the same sampled tokens and numbers in both runs
    assert results[3][1]["engine_logprob_abs_diff_mean"] == pytest.approx(
        results[0][1]["engine_logprob_abs_diff_mean"], rel=1e-3)

    policy = save_policy_folder(run)
    saved = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    assert saved.get_output_embeddings().weight is saved.get_input_embeddings().weight
    _assert_same_weights(saved.state_dict(), run.backend.state_dict(), "ZeRO-3 HF folder", rtol=0, atol=0)
    return policy


# --- one pair of processes runs every check; a test per check reports its outcome ------------------------------


@dataclass
class _RankState:
    """What the checks on one rank share: its own folder, the folder both ranks write, and what earlier checks
    built for later ones."""

    own: Path
    shared: Path
    built: dict = field(default_factory=dict)


def _build(state: _RankState, key: str, value) -> None:
    state.built[key] = value


# name -> check, in the order the ranks run them (later checks use what earlier ones built)
CHECKS: dict[str, Callable[[_RankState], None]] = {
    "dp-grpo-update-7-micro-batches": lambda s: _check_plain_dp_grpo_update(s.own, budget=24),
    "rollouts-split-over-dp2": lambda s: _check_rollouts_split_and_gathered(s.own, sp_size=1),
    "rollouts-from-sp-rank-0": lambda s: _check_rollouts_split_and_gathered(s.own, sp_size=2),
    "dp-grpo-update-1-micro-batch": lambda s: _check_plain_dp_grpo_update(s.own, budget=1000),
    "dp-entropy-control-split-trajectories": lambda s: _check_entropy_control_over_split_trajectories(s.own),
    "sp2-sft-and-grpo-steps": lambda s: _check_sequence_parallel_steps(s.own),
    "zero2-sft-weights-save-resume": lambda s: _check_deepspeed_sft(s.own, s.shared, stage=2),
    "zero3-sft-weights-save-resume": lambda s: _check_deepspeed_sft(s.own, s.shared, stage=3),
    "zero3-tied-sft-weights-save-resume":
        lambda s: _build(s, "tied", _check_deepspeed_sft(s.own, s.shared, stage=3, tied=True)),
    "zero3-generation-as-whole-weights": lambda s: _check_zero3_generation(s.built["tied"]),
    "zero2-bf16-updates-as-fp32": lambda s: _check_deepspeed_bf16(s.shared, stage=2),
    "zero3-bf16-updates-as-fp32": lambda s: _check_deepspeed_bf16(s.shared, stage=3),
    "zero2-fp32-loaded-weights-train": lambda s: _check_loaded_weights_survive_a_step(s.shared, 2, torch.float32),
    "zero3-fp32-loaded-weights-train": lambda s: _check_loaded_weights_survive_a_step(s.shared, 3, torch.float32),
    "zero3-bf16-loaded-weights-train": lambda s: _check_loaded_weights_survive_a_step(s.shared, 3, torch.bfloat16),
    "zero3-run-as-whole-weights": lambda s: _build(s, "policy", _check_zero3_run(s.shared)),
    "zero3-pretrained-policy-partitioned": lambda s: _check_zero3_pretrained_load(s.built["policy"], s.shared),
}


def _run_checks(tmp: str) -> None:
    """On each rank: run CHECKS in order, appending each one's outcome (null, or the traceback) to
    ``outcomes/rank<r>.jsonl`` as it ends. The first failure ends the rank, and with it the run: the other
    rank would otherwise wait in a collective this one never joins."""
    rank = dist.get_rank()
    state = _RankState(own=Path(tmp) / f"rank{rank}", shared=Path(tmp) / "shared")
    log = Path(tmp) / "outcomes" / f"rank{rank}.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    for name, check in CHECKS.items():
        try:
            check(state)
        except BaseException:  # pytest.fail and pytest.raises' Failed are BaseExceptions too
            with log.open("a") as out:
                out.write(json.dumps({"check": name, "error": traceback.format_exc()}) + "\n")
            raise
        with log.open("a") as out:
            out.write(json.dumps({"check": name, "error": None}) + "\n")


@dataclass
class _Outcomes:
    """Each rank's check outcomes (name -> None when it passed, else its traceback) and the run's error."""

    by_rank: list[dict[str, str | None]]
    error: Exception | None

    def assert_passed(self, check: str) -> None:
        assert check in CHECKS, check
        for rank, outcomes in enumerate(self.by_rank):
            if check not in outcomes:
                pytest.fail(f"rank {rank} never finished check {check!r}; the run stopped:\n{self.error}")
            assert outcomes[check] is None, f"rank {rank}, check {check!r}:\n{outcomes[check]}"


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> _Outcomes:
    """Every check, run once on two gloo processes (process start-up and DeepSpeed's initialization dominate)."""
    tmp = tmp_path_factory.mktemp("two-processes")
    error = None
    try:
        spawn(functools.partial(_run_checks, str(tmp)), 2, free_tcp_port(), timeout_s=90, torchrun_env=True,
              preload=["transformers", "qwenlong.trainers", __name__])
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as failure:  # a rank failed: its test says which
        error = failure
    by_rank = []
    for rank in range(2):
        log = tmp / "outcomes" / f"rank{rank}.jsonl"
        lines = log.read_text().splitlines() if log.exists() else []
        by_rank.append({row["check"]: row["error"] for row in map(json.loads, lines)})
    return _Outcomes(by_rank, error)


@pytest.mark.distributed
@pytest.mark.parametrize("check", list(CHECKS))
def test_two_processes_match_one(two_processes, check):
    """One check (its ``_check_*`` function says what it compares) passed on both ranks."""
    two_processes.assert_passed(check)


@pytest.mark.distributed
def test_two_process_run_ends_cleanly(two_processes):
    """Every check ran on both ranks and the processes left the group without an error."""
    assert two_processes.error is None, str(two_processes.error)
    assert all(list(outcomes) == list(CHECKS) for outcomes in two_processes.by_rank)


@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_sft_cli_matches_one_process(tmp_path, free_port):
    """``torchrun -m qwenlong sft`` with ZeRO-2 on two CPU processes: one micro-batch per rank per step ends
    with the weights of one process accumulating two; only rank 0 writes the run's metrics."""
    import subprocess
    import sys

    from test_pipeline import SMALL, TINY, _env

    args = ["sft", "--config", TINY, *SMALL, "eval.enabled=false"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(free_port)]
    two = subprocess.run([*launcher, "-m", "qwenlong", *args, "distributed.deepspeed_stage=2",
                          f"output.dir={tmp_path / 'two'}"], capture_output=True, text=True, env=_env(), timeout=600)
    assert two.returncode == 0, two.stderr[-4000:]
    one = subprocess.run([sys.executable, "-m", "qwenlong", *args, "sft.grad_accum_steps=2",
                          f"output.dir={tmp_path / 'one'}"], capture_output=True, text=True, env=_env(), timeout=600)
    assert one.returncode == 0, one.stderr[-4000:]
    final = [torch.load(tmp_path.joinpath(run, "checkpoints", "sft-step000003", "model.pt"), weights_only=True)
             for run in ("two", "one")]
    _assert_same_weights(*final, "torchrun SFT", **ADAM_WEIGHTS)
    for run in ("one", "two"):
        steps = [line for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines() if '"sft"' in line]
        assert len(steps) == 3, run


@pytest.mark.parametrize("local_rank", [None, "0"])  # plain `python -m qwenlong`, `torchrun --nproc-per-node 1`
def test_one_process_on_a_gpu_machine_trains_on_the_gpu(monkeypatch, local_rank):
    """A single process returned a CPU context wherever it ran, and ``Run`` moves the model to ``ctx.device``:
    `qwenlong pipeline` on a GPU machine (the README's 32B recipe included) trained on the CPU. With CUDA there
    (faked here: nothing is allocated), one process must take its GPU as a process of a multi-GPU run does."""
    from qwenlong.config.schema import DistributedConfig
    from qwenlong.distributed import context

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    if local_rank is not None:
        monkeypatch.setenv("WORLD_SIZE", "1")
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    chosen = []
    monkeypatch.setattr(context.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    ctx = context.init_distributed(DistributedConfig())
    assert ctx.device == torch.device("cuda", 0) and chosen == [0]
    assert (ctx.rank, ctx.world_size) == (0, 1)
    # gloo asked for by name keeps a single process on the CPU, as it keeps several
    assert context.init_distributed(DistributedConfig(backend="gloo")).device == torch.device("cpu")
