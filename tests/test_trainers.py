"""Trainers: packing alignment, SFT and GRPO steps against plain PyTorch, exact resume."""

from __future__ import annotations

import copy
import random

import pytest
import torch

pytest.importorskip("transformers")

from helpers import assert_sft_step_matches_reference, record_learning_rates, tiny_causal_lm  # noqa: E402

from qwenlong.config import RLConfig, SFTConfig  # noqa: E402
from qwenlong.curriculum import Phase  # noqa: E402
from qwenlong.trainers import GRPOTrainer, SFTTrainer  # noqa: E402
from qwenlong.trainers.grpo import Group, PromptExample, RolloutBatch  # noqa: E402
from qwenlong.trainers.packed import IGNORE_INDEX, pack_sequences  # noqa: E402

VOCAB = 61


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    """Model-sized tensors: run the kernels' PyTorch path (the interpreter would take minutes)."""
    monkeypatch.setenv("QWENLONG_BACKEND", "torch")


def tiny_model(seed: int = 0, attention: str = "qwenlong"):
    return tiny_causal_lm(seed=seed, vocab_size=VOCAB, max_positions=256, tie_word_embeddings=False,
                          attention=attention)


def random_pairs(n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    return [([rng.randrange(VOCAB) for _ in range(rng.randint(1, 12))],
             [rng.randrange(VOCAB) for _ in range(rng.randint(1, 8))]) for _ in range(n)]


def test_pack_sequences_alignment():
    pairs = random_pairs(7, seed=1)
    sequences = [p + r for p, r in pairs]
    values = [[random.random() for _ in r] for _, r in pairs]
    advantages = [random.random() for _ in pairs]
    batch = pack_sequences(sequences, [len(p) for p, _ in pairs], {"lp": values}, {"adv": advantages})
    position = 0
    for (prompt, response), lp, adv in zip(pairs, values, advantages, strict=True):
        seq = prompt + response
        for t in range(len(seq)):
            predicts_response = t + 1 < len(seq) and t + 1 >= len(prompt)
            assert int(batch.position_ids[position + t]) == t
            assert int(batch.input_ids[position + t]) == seq[t]
            expected = seq[t + 1] if predicts_response else IGNORE_INDEX
            assert int(batch.targets[position + t]) == expected
            if predicts_response:
                assert batch.token_values["lp"][position + t] == pytest.approx(lp[t + 1 - len(prompt)])
                assert batch.token_values["adv"][position + t] == pytest.approx(adv)
            else:
                assert batch.token_values["lp"][position + t] == 0
        position += len(seq)
    assert position == batch.num_tokens
    with pytest.raises(ValueError, match="prompt_lengths"):
        pack_sequences([[1, 2]], [3])


def test_sft_step_matches_plain_pytorch(tmp_path):
    pairs = random_pairs(9, seed=2)
    model = tiny_model()
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("sdpa")
    cfg = SFTConfig(steps=1, lr=1e-3, lr_schedule="constant", token_budget=40, max_seq_len=64, grad_clip=1e9)
    trainer = SFTTrainer(model, pairs, cfg, output_dir=tmp_path)
    assert_sft_step_matches_reference(trainer, model, reference, pairs)


def _grpo_groups(seed: int) -> list[Group]:
    rng = random.Random(seed)
    groups = []
    for g in range(3):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(2, 10))]
        responses = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 7))] for _ in range(4)]
        rewards = [float(rng.random() < 0.5) for _ in responses]
        groups.append(Group(PromptExample(f"ex{g}", prompt, "synthetic_copy", ["x"]), responses,
                            [[0.0] * len(r) for r in responses], rewards, rewards))
    return groups


@pytest.mark.parametrize("aggregation,kl_coef", [("token-mean", 0.0), ("seq-mean-token-mean", 0.3),
                                                  ("seq-mean-token-sum", 0.0)])
def test_grpo_update_matches_plain_pytorch(tmp_path, aggregation, kl_coef):
    groups = _grpo_groups(seed=3)
    model = tiny_model(seed=1)
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("sdpa")
    cfg = RLConfig(group_size=4, gen_prompts_per_step=3, train_prompts_per_step=3, mini_batch_size=3,
                   temperature=0.8, clip_low=0.2, clip_high=0.28, micro_batch_token_budget=48, lr=1e-3,
                   grad_clip=1e9, loss_aggregation=aggregation, kl_coef=kl_coef, phases=[Phase("p", 64, 8, steps=1)])
    trainer = GRPOTrainer(model, engine=None, reward=None, cfg=cfg, decode=str, output_dir=tmp_path)
    ref_policy = None
    if kl_coef:
        trainer.reference = tiny_model(seed=7).requires_grad_(False)  # a policy other than the current one
        ref_policy = copy.deepcopy(trainer.reference)
        ref_policy.set_attn_implementation("sdpa")

    # plain PyTorch: per-sequence logits, log_softmax(logits / T), clipped surrogate, token mean
    rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float64)
    advantages = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + cfg.advantage_eps)
    def response_logprobs(policy, prompt, response):
        logits = policy(torch.tensor([prompt + response])).logits[0].double() / cfg.temperature
        return torch.log_softmax(logits[len(prompt) - 1:-1], -1).gather(1, torch.tensor(response)[:, None])[:, 0]

    per_sequence = []
    for g, group_adv in zip(groups, advantages, strict=True):
        for response, adv in zip(g.responses, group_adv, strict=True):
            prompt = g.example.prompt_ids
            logp = response_logprobs(reference, prompt, response)
            ratio = torch.exp(logp - logp.detach())  # old policy = current policy before the update
            clipped = torch.clamp(ratio, 1 - cfg.clip_low, 1 + cfg.clip_high)
            token_loss = -torch.minimum(ratio * adv, clipped * adv)
            if kl_coef:
                log_ratio = response_logprobs(ref_policy, prompt, response).detach() - logp
                token_loss = token_loss + kl_coef * (torch.exp(log_ratio) - log_ratio - 1)
            per_sequence.append(token_loss)
    if aggregation == "token-mean":
        reference_loss = torch.cat(per_sequence).sum() / sum(len(t) for t in per_sequence)
    elif aggregation == "seq-mean-token-mean":
        reference_loss = torch.stack([t.mean() for t in per_sequence]).mean()
    else:
        reference_loss = torch.stack([t.sum() for t in per_sequence]).mean()
    reference_loss.backward()

    batches = trainer._micro_batches(RolloutBatch.from_groups(groups, trainer._advantages(groups)))
    trainer._old_logprobs(batches)
    num_tokens = sum(int(b.mask.sum()) for b in batches)
    metrics = trainer.accumulate(batches, num_tokens, len(per_sequence))  # gradients before any update
    assert metrics["loss"] == pytest.approx(float(reference_loss), abs=1e-6)
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad.to(p.grad.dtype), rtol=1e-4, atol=1e-6, msg=name)


def test_old_logprobs_do_not_depend_on_packing(tmp_path):
    """On-policy ratios are exactly 1: a token's log-prob is the same in any micro-batch."""
    groups = _grpo_groups(seed=4)
    model = tiny_model(seed=2)
    values = {}
    for budget in (24, 48, 200):
        cfg = RLConfig(group_size=4, gen_prompts_per_step=3, train_prompts_per_step=3, mini_batch_size=3,
                       micro_batch_token_budget=budget, phases=[Phase("p", 64, 8, steps=1)])
        trainer = GRPOTrainer(model, engine=None, reward=None, cfg=cfg, decode=str, output_dir=tmp_path)
        batches = trainer._micro_batches(RolloutBatch.from_groups(groups, trainer._advantages(groups)))
        trainer._old_logprobs(batches)
        per_sequence = {}
        for b in batches:
            for k, seq in enumerate(b.sequence_ids):
                lo, hi = int(b.cu_seqlens[k]), int(b.cu_seqlens[k + 1])
                per_sequence[seq] = b.token_values["old_logprobs"][lo:hi][b.mask[lo:hi]]
        values[budget] = per_sequence
    for seq in values[24]:
        assert torch.equal(values[24][seq], values[48][seq]) and torch.equal(values[24][seq], values[200][seq])


def test_sft_resume_is_exact(tmp_path):
    pairs = random_pairs(20, seed=5)
    cfg = SFTConfig(steps=6, lr=3e-3, token_budget=48, max_seq_len=64, warmup_steps=2)
    straight = SFTTrainer(tiny_model(seed=3), pairs, cfg, output_dir=tmp_path / "a")
    straight.train()

    first = SFTTrainer(tiny_model(seed=3), pairs, cfg, output_dir=tmp_path / "b", save_every_steps=3)
    for _ in range(4):  # one step past the checkpoint is lost when the run dies
        first.train_step()
        if first.step % 3 == 0:
            first.save()
    resumed = SFTTrainer(tiny_model(seed=99), pairs, cfg, output_dir=tmp_path / "b")
    assert resumed.resume() and resumed.step == 3
    resumed.train()
    for (name, p), (_, q) in zip(straight.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_sft_saves_its_last_step_once(tmp_path, monkeypatch):
    """A last step that is also a save_every_steps step is written once (it was written twice, the second time
    replacing the first under the same name)."""
    cfg = SFTConfig(steps=4, lr=3e-3, token_budget=48, max_seq_len=64)
    for every, expected in ((2, ["sft-step000002", "sft-step000004"]), (3, ["sft-step000003", "sft-step000004"]),
                            (0, ["sft-step000004"])):
        trainer = SFTTrainer(tiny_model(seed=3), random_pairs(20, seed=5), cfg, output_dir=tmp_path / str(every),
                             save_every_steps=every)
        saved = []

        def save(path, *args, real_save=trainer.backend.save, saved=saved, **kwargs):
            saved.append(path.name)
            return real_save(path, *args, **kwargs)

        monkeypatch.setattr(trainer.backend, "save", save)
        trainer.train()
        assert saved == expected, every


def test_sft_keeps_the_newest_checkpoints(tmp_path):
    cfg = SFTConfig(steps=7, lr=3e-3, token_budget=48, max_seq_len=64)
    trainer = SFTTrainer(tiny_model(seed=3), random_pairs(20, seed=5), cfg, output_dir=tmp_path, save_every_steps=2,
                         keep_checkpoints=2)
    trainer.train()
    assert sorted(p.name for p in trainer.checkpoint_dir().iterdir()) == ["sft-step000006", "sft-step000007"]
    resumed = SFTTrainer(tiny_model(seed=99), random_pairs(20, seed=5), cfg, output_dir=tmp_path)
    assert resumed.resume() and resumed.step == 7


@pytest.mark.parametrize("epochs", [1, 2])
def test_sft_epochs_train_every_example_exactly_that_many_times(tmp_path, epochs):
    """``epochs: E`` is E passes over the data, even when an epoch's micro-batches are not a multiple of a step's:
    the last step of an epoch is short (it took micro-batches of the next epoch, so some examples were trained
    once more than the others: 1 epoch of 9 micro-batches at 4 per step saw 6 of 20 examples twice)."""
    from collections import Counter

    pairs = random_pairs(20, seed=3)
    cfg = SFTConfig(epochs=epochs, lr=1e-3, token_budget=24, max_seq_len=24, grad_accum_steps=4)
    trainer = SFTTrainer(tiny_model(), pairs, cfg, output_dir=tmp_path)
    per_epoch = len(trainer._epoch_micro_batches(0))
    assert per_epoch % cfg.grad_accum_steps, "the case needs an epoch that does not fill its last step"
    assert trainer.total_steps == epochs * -(-per_epoch // cfg.grad_accum_steps)
    seen = Counter(i for step in range(trainer.total_steps) for ids in trainer._step_micro_batches(step) for i in ids)
    assert seen == dict.fromkeys(range(len(pairs)), epochs)
    # every epoch is the whole data once, in its own shuffled order
    steps_per_epoch = trainer.total_steps // epochs
    for epoch in range(epochs):
        steps = range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch)
        assert [ids for step in steps for ids in trainer._step_micro_batches(step)] == \
            trainer._epoch_micro_batches(epoch)


def test_sft_logs_the_learning_rate_its_step_used(tmp_path):
    """A step's logged ``lr`` is the one its update used (it was the next step's: warm-up looked a step ahead)."""
    cfg = SFTConfig(steps=6, lr=1e-3, token_budget=48, max_seq_len=64, warmup_steps=4, lr_schedule="cosine")
    trainer = SFTTrainer(tiny_model(), random_pairs(20, seed=5), cfg, output_dir=tmp_path)
    used = record_learning_rates(trainer.backend.optimizer)
    logged = [metrics["lr"] for metrics in trainer.train()]
    assert logged == pytest.approx(used)
    # warm-up from 1/4 of the rate, then the cosine from the full rate
    assert logged[:5] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])


def test_a_policy_whose_config_returns_tuples_trains_alike(tmp_path):
    """A checkpoint's config may say ``return_dict: false`` (the decoder then returns tuples): the trainers read
    the decoder's hidden states by name, so they ask for its output object (it crashed on a tuple)."""
    cfg = SFTConfig(steps=2, lr=1e-3, token_budget=48, max_seq_len=64)
    losses = {}
    for return_dict in (True, False):
        model = tiny_model(seed=4)
        model.config.return_dict = return_dict
        trainer = SFTTrainer(model, random_pairs(12, seed=6), cfg, output_dir=tmp_path / str(return_dict))
        losses[return_dict] = [metrics["loss"] for metrics in trainer.train()]
    assert losses[False] == losses[True]
