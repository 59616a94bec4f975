"""qwenlong.integrations.openrlhf against the real OpenRLHF (0.11): its Actor, PolicyLoss and DeepspeedStrategy.

References are OpenRLHF's own ``Actor`` on the same weights (sdpa attention, padded batch), so a
change of OpenRLHF's conventions (temperature, entropy, masking) turns these red. Skipped where
OpenRLHF is not installed (the main CI venv); tools/ci_integrations.sh runs them.
"""

from __future__ import annotations

import copy
import os
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("openrlhf")
transformers = pytest.importorskip("transformers")
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed on this CPU machine (as qwenlong.distributed does)

import torch.distributed as dist  # noqa: E402
from openrlhf.models import Actor, PolicyLoss  # noqa: E402

import qwenlong.integrations.hf_attention  # noqa: E402, F401  (registers attn_implementation="qwenlong")
from qwenlong.integrations.openrlhf import QwenlongActor  # noqa: E402

VOCAB = 96


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    """The kernels' PyTorch CPU path: the Triton interpreter would be far too slow for whole models."""
    monkeypatch.setenv("QWENLONG_BACKEND", "torch")


def _tiny_model(attn_implementation: str = "sdpa"):
    config = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)


def _openrlhf_actor(model, temperature: float, packing_samples: bool = False) -> Actor:
    actor = Actor(model, temperature=temperature)
    actor.packing_samples = packing_samples  # Actor sets it only when it loads the model from a path
    return actor


def _rollout_batch():
    """Left-padded prompts, right-padded responses (as OpenRLHF's generation leaves them)."""
    generator = torch.Generator().manual_seed(7)
    sequences = torch.randint(0, VOCAB, (3, 11), generator=generator)
    attention_mask = torch.ones_like(sequences)
    attention_mask[1, :3] = 0
    attention_mask[2, 9:] = 0
    action_mask = attention_mask[:, -6:].clone()
    action_mask[2, -3:] = 0
    return sequences, attention_mask, action_mask


def _grads(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in module.parameters()]


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_qwenlong_actor_equals_openrlhf_actor(temperature):
    """Action log-probs, all log-probs, entropies (of the temperature-scaled logits, OpenRLHF's convention)
    and gradients equal OpenRLHF's Actor on a padded batch."""
    model = _tiny_model()
    reference, ours = _openrlhf_actor(model, temperature), QwenlongActor(copy.deepcopy(model), temperature=temperature)
    assert isinstance(ours, Actor)
    sequences, attention_mask, action_mask = _rollout_batch()
    results = []
    for actor in (reference, ours):
        log_probs, output = actor(sequences, action_mask, attention_mask, return_output=True, return_entropy=True)
        upstream = torch.linspace(-1, 1, log_probs.numel()).view_as(log_probs)
        (log_probs * upstream).sum().backward()
        all_log_probs = actor(sequences, attention_mask=attention_mask, return_logprobs=True)
        results.append((log_probs.detach(), output.entropy.detach(), all_log_probs.detach(), _grads(actor.model)))
    (ref_lp, ref_entropy, ref_all, ref_grads), (lp, entropy, all_lp, grads) = results
    assert ours.model.config._attn_implementation == "qwenlong"
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)
    real = attention_mask[:, :-1].bool()  # OpenRLHF's padded path leaves its own numbers at padding; ours are 0
    torch.testing.assert_close(all_lp[real], ref_all[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy[real], ref_entropy[real], rtol=1e-5, atol=1e-5)
    for got, expected in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_openrlhf_packing_path_with_qwenlong_attention():
    """The other way in: OpenRLHF's own Actor with packing_samples=True on a model using attn_implementation
    "qwenlong" (OpenRLHF packs the real tokens into one row; our attention keeps the sequences apart)."""
    sdpa = _tiny_model()
    packed = _openrlhf_actor(_tiny_model("qwenlong"), temperature=0.6, packing_samples=True)
    packed.model.load_state_dict(sdpa.state_dict())
    reference = _openrlhf_actor(sdpa, temperature=0.6)
    sequences, attention_mask, action_mask = _rollout_batch()
    with torch.no_grad():
        expected, expected_output = reference(sequences, action_mask, attention_mask, return_output=True,
                                              return_entropy=True)
        got, output = packed(sequences, action_mask, attention_mask, return_output=True, return_entropy=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    real = attention_mask[:, :-1].bool()
    torch.testing.assert_close(output.entropy[real], expected_output.entropy[real], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def process_group():
    """A one-process gloo group, as DeepspeedStrategy's engines need one (its setup_distributed builds a CUDA
    device mesh, so the group is made here)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no shared-memory op build on CPU
    dist.init_process_group("gloo")
    yield
    dist.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _strategy():
    from openrlhf.utils.deepspeed import DeepspeedStrategy

    args = SimpleNamespace(ds=SimpleNamespace(param_dtype="fp32"), train=SimpleNamespace(), local_rank=-1)
    strategy = DeepspeedStrategy(zero_stage=2, micro_train_batch_size=3, train_batch_size=3, args=args)
    strategy.world_size, strategy.ring_attn_size = 1, 1
    return strategy


def test_policy_loss_step_through_deepspeed_strategy(process_group):
    """One PPO step the OpenRLHF way: DeepspeedStrategy.prepare wraps the actor's model in a ZeRO-2 engine
    (it unwraps Actor.model), PolicyLoss on the action log-probs, strategy.backward and optimizer_step.
    QwenlongActor's step moves the weights as OpenRLHF's Actor's does."""
    model = _tiny_model()
    sequences, attention_mask, action_mask = _rollout_batch()
    advantages = torch.tensor([[1.0], [-0.7], [0.4]]).expand(3, 6)
    generator = torch.Generator().manual_seed(3)
    old_log_probs = -torch.rand(3, 6, generator=generator) * 2 - 4  # off-policy: both clips take part
    # Adam's first step is about lr * sign(grad): a large eps keeps near-zero gradients from amplifying fp32 noise
    optim = {"optim": "adam", "adam": {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-3, "weight_decay": 0.0},
             "scheduler_steps": 4, "lr_scheduler": "constant", "max_norm": 1.0}
    results = []
    for actor in (_openrlhf_actor(copy.deepcopy(model), 0.6), QwenlongActor(copy.deepcopy(model), temperature=0.6)):
        strategy = _strategy()
        actor, optimizer, scheduler = strategy.prepare((actor, optim))
        assert type(actor.model).__name__ == "DeepSpeedEngine"
        log_probs = actor(sequences, action_mask, attention_mask)
        loss, clip_ratio, ppo_kl, _, _ = PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=3.0)(
            log_probs, old_log_probs, advantages, action_mask)
        strategy.backward(loss, actor, optimizer)
        strategy.optimizer_step(optimizer, actor, scheduler)
        grad_norm = strategy.get_grad_norm(actor)  # DeepSpeed's norm of the step's gradients
        weights = [p.detach().clone() for p in actor.model.module.parameters()]
        results.append((loss.detach(), clip_ratio, grad_norm, weights))
    (ref_loss, ref_clip, ref_norm, ref_weights), (loss, clip, norm, weights) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert 0 < clip == ref_clip < 1
    assert norm == pytest.approx(ref_norm, rel=1e-4) and norm > 0
    moved = max((w - m).abs().max().item() for w, m in zip(weights, model.parameters(), strict=True))
    assert moved > 1e-3  # the step did move the weights
    for got, expected in zip(weights, ref_weights, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_qwenlong_actor_errors():
    actor = QwenlongActor(_tiny_model())
    sequences = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(NotImplementedError, match="ring_attn_group"):
        actor(sequences, torch.ones(1, 2), ring_attn_group=object())
    with pytest.raises(ValueError, match="pixel_values"):
        actor(sequences, torch.ones(1, 2), pixel_values=torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="logits"):
        actor(sequences, return_output=True)
    with pytest.raises(ValueError, match="return_output"):
        actor(sequences, torch.ones(1, 2), return_entropy=True)


def test_example_openrlhf_logprobs():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "openrlhf_logprobs.py"
    spec = importlib.util.spec_from_file_location("example_openrlhf_logprobs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(prompt_len=6, response_len=6)
    assert results["max_abs_diff_vs_openrlhf"] < 1e-5
    assert results["mean_action_log_prob"] < 0 < results["mean_entropy"]
