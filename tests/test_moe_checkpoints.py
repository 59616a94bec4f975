"""Mixture-of-Experts checkpoints (qwen3_moe, the QwenLong-L1.5 preset's model type) on a tiny Qwen3MoE.

transformers 5 fuses the experts into ``mlp.experts.gate_up_proj`` / ``down_proj`` parameters while the
released checkpoint (what ``save_pretrained`` writes) stores one tensor per expert and projection. Every path of
ours that reads or writes checkpoints one tensor at a time goes through transformers' conversion per parameter
(``qwenlong.integrations.hf_checkpoint``); here each is compared, element for element, with transformers'
own whole-model conversion (``from_pretrained`` / ``save_pretrained``): rank 0's safetensors reader, ZeRO-3
loading and the in-place merge on two gloo processes, export, the streaming merge and the names the vLLM
weight sync sends. A model whose conversion is not expert fusing fails with its model type named, and one
SFT step and one GRPO update of the trainers (our attention, fused LM head) on the MoE model give the
gradients of plain PyTorch on materialized logits.
"""

from __future__ import annotations

import copy
import functools
import random
import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.core_model_loading")  # transformers 5: fused experts

from helpers import assert_sft_step_matches_reference, spawn  # noqa: E402
from test_merge import direct_sce  # noqa: E402

from qwenlong.distributed.zero import safetensors_weights  # noqa: E402
from qwenlong.export import write_hf_folder  # noqa: E402
from qwenlong.integrations.hf_checkpoint import CheckpointFormat  # noqa: E402
from qwenlong.merge import merge_into_model, sce_merge_checkpoints, sce_merge_tensor  # noqa: E402

EXPERTS = 11  # more than 10: expert 10 must come after expert 2 (natural order, not string order)
VOCAB = 61
PER_EXPERT = re.compile(r"model\.layers\.\d+\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")


def tiny_moe(seed: int, attention: str = "sdpa", **config) -> torch.nn.Module:
    """A seeded float32 Qwen3MoE: 2 layers, hidden 32, 11 experts of width 8 (2 per token), untied head."""
    if attention == "qwenlong":
        from qwenlong.integrations.hf_attention import register

        register()
    model_config = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=8, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=EXPERTS, num_experts_per_tok=2,
        max_position_embeddings=256, tie_word_embeddings=False, **config)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(model_config, attn_implementation=attention,
                                                         dtype=torch.float32)


def _fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


def _checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def _assert_per_expert(keys) -> None:
    """Every expert tensor is stored per expert (no fused name), all 11 experts x 3 projections x 2 layers."""
    assert not [k for k in keys if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    experts = [PER_EXPERT.fullmatch(k) for k in keys]
    assert sorted({(int(m.group(1)), m.group(2)) for m in experts if m}) == \
        sorted((e, p) for e in range(EXPERTS) for p in ("gate", "up", "down"))
    assert sum(m is not None for m in experts) == 2 * 3 * EXPERTS


def _moved(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A copy of ``model`` whose weights moved by noise (a stand-in for a fine-tuned model)."""
    moved = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in moved.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return moved


@pytest.fixture
def released(tmp_path):
    """A base and two moved copies of it as released (per-expert) checkpoints; the base one sharded."""
    seed = _fresh_seed()
    base = tiny_moe(seed % 1000)
    folders = {label: tmp_path / label for label in ("base", "b", "c")}
    base.save_pretrained(folders["base"], max_shard_size="40KB")
    _moved(base, seed + 1).save_pretrained(folders["b"])
    _moved(base, seed + 2).save_pretrained(folders["c"])
    return folders


def _loaded(folder: Path) -> dict[str, torch.Tensor]:
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()


# ---------------------------------------------------------------------- reading


def test_released_checkpoint_reads_by_parameter_name(released):
    """save_pretrained writes one tensor per expert; rank 0's reader gives every parameter of the model (the fused
    experts built from those tensors) equal to from_pretrained's, with its shape known before reading."""
    assert (released["base"] / "model.safetensors.index.json").exists()  # sharded: experts span files
    _assert_per_expert(_checkpoint_tensors(released["base"]))
    expected = _loaded(released["base"])
    assert expected["model.layers.0.mlp.experts.gate_up_proj"].shape == (EXPERTS, 16, 32)
    weights = safetensors_weights(str(released["base"]))
    try:
        for name, tensor in expected.items():
            assert weights.shape(name) == tuple(tensor.shape), name
            assert torch.equal(weights.read(name), tensor), name
        with pytest.raises(KeyError):
            weights.shape("model.layers.0.mlp.experts.0.gate_proj.weight")  # a checkpoint name, not a parameter
    finally:
        weights.close()


def test_missing_expert_is_reported_before_loading(released, tmp_path):
    """A checkpoint lacking one expert's tensor cannot fill the fused parameter: the shape check says so."""
    from safetensors.torch import save_file

    from qwenlong.distributed.zero import _mismatches

    state = _checkpoint_tensors(released["b"])
    del state["model.layers.1.mlp.experts.10.up_proj.weight"]
    folder = tmp_path / "lacking"
    folder.mkdir()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_bytes((released["b"] / "config.json").read_bytes())
    model = tiny_moe(0)
    weights = safetensors_weights(str(folder))
    try:
        problem = _mismatches(weights, list(model.named_parameters()))
    finally:
        weights.close()
    assert problem.startswith("1 of ") and "model.layers.1.mlp.experts.gate_up_proj cannot be built" in problem


def test_unsupported_conversion_names_the_model_type(tmp_path):
    """Mixtral's mapping renames keys as well as fusing experts, which we do not apply: loading, export and the
    weight sync refuse it with its model type named (rather than reading or writing the wrong names)."""
    config = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=2)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "mixtral")
    with pytest.raises(NotImplementedError, match="model type 'mixtral'.*WeightRenaming"):
        safetensors_weights(str(tmp_path / "mixtral"))
    with pytest.raises(NotImplementedError, match="model type 'mixtral'"):
        write_hf_folder(tmp_path / "out", weights=model.state_dict(), config=config, tokenizer=None)
    with pytest.raises(NotImplementedError, match="model type 'mixtral'"):
        CheckpointFormat(config)


# ---------------------------------------------------------------------- ZeRO-3 loading and the in-place merge


def _check_zero3_load_and_merge(folders: dict[str, str]):
    """On each rank: the partitioned model that ZeRO-3 loading builds from the per-expert checkpoint equals
    from_pretrained's, gathered parameter by parameter; the in-place merge of it with per-expert sources equals
    the SCE merge of from_pretrained's parameters."""
    from datetime import timedelta

    import deepspeed

    from qwenlong.config.schema import DistributedConfig
    from qwenlong.distributed import init_distributed
    from qwenlong.distributed.zero import load_pretrained_partitioned

    cfg = DistributedConfig(backend="gloo", deepspeed_stage=3)
    init_distributed(cfg, timeout=timedelta(seconds=120))
    rank = torch.distributed.get_rank()
    model = load_pretrained_partitioned(folders["c"], dtype=torch.float32, attn_implementation="sdpa", cfg=cfg)
    fused = model.get_submodule("model.layers.0.mlp.experts").gate_up_proj
    assert fused.numel() == 0 and fused.ds_shape == (EXPERTS, 16, 32)  # partitioned
    expected = {label: _loaded(Path(folder)) for label, folder in folders.items()}
    params = list(model.named_parameters())
    assert sorted(name for name, _ in params) == sorted(expected["c"])
    for name, param in params:
        with deepspeed.zero.GatheredParameters([param]):
            assert torch.equal(param.data, expected["c"][name]), name

    def sources():
        return safetensors_weights(folders["base"]), [safetensors_weights(folders["b"])]

    merge_into_model(model, sources if rank == 0 else None, lambda base, others: sce_merge_tensor(base, others, 0.3))
    for name, param in params:
        direct = sce_merge_tensor(expected["base"][name], [expected["b"][name], expected["c"][name]], 0.3)
        with deepspeed.zero.GatheredParameters([param]):
            assert torch.equal(param.data, direct), name
            assert not torch.equal(param.data, expected["c"][name]), name


@pytest.mark.distributed
@pytest.mark.slow
def test_zero3_loading_and_merge_on_two_processes(released, free_port):
    folders = {label: str(folder) for label, folder in released.items()}
    spawn(functools.partial(_check_zero3_load_and_merge, folders), 2, free_port, timeout_s=120, torchrun_env=True,
          preload=["transformers", "deepspeed", "qwenlong.distributed", __name__])


# ---------------------------------------------------------------------- export, streaming merge, weight sync


def _demo_tokenizer():
    from qwenlong.data import train_demo_tokenizer

    return train_demo_tokenizer(["Therefore, the answer is blue.", "a document question"] * 8, vocab_size=300)


@pytest.mark.parametrize("max_shard_bytes", [None, 30_000])
def test_export_writes_the_released_format(tmp_path, max_shard_bytes):
    """write_hf_folder writes exactly the tensors save_pretrained writes (per expert) and from_pretrained reads
    the model back bit for bit; a shard limit splits the experts of one parameter over files."""
    model = tiny_moe(_fresh_seed() % 1000)
    state = model.state_dict()
    model.save_pretrained(tmp_path / "reference")
    reference = _checkpoint_tensors(tmp_path / "reference")
    folder = write_hf_folder(tmp_path / "export", weights=state, config=model.config, tokenizer=_demo_tokenizer(),
                             **({"max_shard_bytes": max_shard_bytes} if max_shard_bytes else {}))
    written = _checkpoint_tensors(folder)
    _assert_per_expert(written)
    assert written.keys() == reference.keys()
    for key, tensor in reference.items():
        assert torch.equal(written[key], tensor), key
    if max_shard_bytes:
        assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1
    loaded = _loaded(folder)
    assert loaded.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name


def test_streaming_merge_of_per_expert_folders_is_the_parameter_merge(released, tmp_path):
    """qwenlong merge over released folders merges each model parameter (a fused expert parameter as a whole, as
    the pipeline's in-place merge does) and writes the released format: from_pretrained of the result equals the
    SCE merge of from_pretrained's parameters, and the float64 per-entry reference."""
    out = tmp_path / "merged"
    sce_merge_checkpoints(released["base"], [released["b"], released["c"]], out, select_topk=0.3,
                          max_shard_bytes=30_000)
    _assert_per_expert(_checkpoint_tensors(out))
    assert _checkpoint_tensors(out).keys() == _checkpoint_tensors(released["b"]).keys()
    base, b, c, merged = (_loaded(folder) for folder in (released["base"], released["b"], released["c"], out))
    for name, tensor in base.items():
        assert torch.equal(merged[name], sce_merge_tensor(tensor, [b[name], c[name]], 0.3)), name
    for name in ("model.layers.1.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"):
        torch.testing.assert_close(merged[name].double(), direct_sce(base[name], [b[name], c[name]], 0.3),
                                   rtol=1e-5, atol=1e-6, msg=name)


def test_weight_sync_sends_the_released_names():
    """The vLLM weight sync's stream: the trainer's parameters become the released checkpoint's tensors (vLLM's
    qwen3_moe maps per-expert names onto its fused experts), equal to save_pretrained's, converted lazily."""
    model = tiny_moe(_fresh_seed() % 1000)
    expected = transformers.core_model_loading.revert_weight_conversion(model, model.state_dict())
    seen = []

    def parameters():
        for name, param in model.named_parameters():
            seen.append(name)
            yield name, param.detach()

    sent = {}
    for key, tensor in CheckpointFormat(model.config).released_parameters(parameters()):
        if key == "model.layers.0.mlp.experts.0.gate_proj.weight":  # lazily: its parameter is the last one read
            assert seen[-1] == "model.layers.0.mlp.experts.gate_up_proj"
        sent[key] = tensor
    _assert_per_expert(sent)
    assert sent.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(sent[key], tensor), key


def test_dense_model_keeps_its_names():
    """A dense Qwen3 has no conversion: the stream is the parameters themselves."""
    from helpers import tiny_causal_lm

    model = tiny_causal_lm("qwen3")
    params = list(model.named_parameters())
    assert CheckpointFormat(model.config).conversions == []
    sent = list(CheckpointFormat(model.config).released_parameters(iter(params)))
    assert [n for n, _ in sent] == [n for n, _ in params]
    assert all(a is b for (_, a), (_, b) in zip(sent, params, strict=True))


# ---------------------------------------------------------------------- training on the MoE model


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv("QWENLONG_BACKEND", "torch")


def _random_pairs(n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    return [([rng.randrange(VOCAB) for _ in range(rng.randint(1, 12))],
             [rng.randrange(VOCAB) for _ in range(rng.randint(1, 8))]) for _ in range(n)]


@pytest.mark.slow
def test_sft_and_grpo_steps_on_the_moe_model(tmp_path, torch_backend):
    """The trainers' packed forward (our attention, the fused LM head on the decoder's hidden states) on the MoE
    model: the SFT loss and gradients, and a GRPO update's, equal plain PyTorch's on sdpa and materialized logits,
    one sequence at a time (routing is per token, so packing changes nothing). Neither includes the router's
    load-balancing loss (the trainers call the decoder, not the causal LM's forward that adds it)."""
    from qwenlong.config import RLConfig, SFTConfig
    from qwenlong.curriculum import Phase
    from qwenlong.trainers import GRPOTrainer, SFTTrainer
    from qwenlong.trainers.grpo import Group, PromptExample, RolloutBatch

    seed = _fresh_seed() % 1000
    model = tiny_moe(seed, attention="qwenlong", output_router_logits=True)
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("sdpa")
    pairs = _random_pairs(9, seed)
    trainer = SFTTrainer(model, pairs, SFTConfig(steps=1, lr=1e-3, lr_schedule="constant", token_budget=40,
                                                 max_seq_len=64, grad_clip=1e9), output_dir=tmp_path / "sft")
    prompt, response = pairs[0]
    assert reference(torch.tensor([prompt + response])).aux_loss is not None  # computed; a trainer never adds it
    assert_sft_step_matches_reference(trainer, model, reference, pairs)
    assert model.get_submodule("model.layers.0.mlp.gate").weight.grad.abs().sum() > 0  # the router learns too

    model.zero_grad(set_to_none=True)
    reference.zero_grad(set_to_none=True)
    rng = random.Random(seed)
    groups = []
    for g in range(3):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(2, 10))]
        responses = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 7))] for _ in range(4)]
        rewards = [float(i % 2) for i in range(4)]
        groups.append(Group(PromptExample(f"ex{g}", prompt, "synthetic_copy", ["x"]), responses,
                            [[0.0] * len(r) for r in responses], rewards, rewards))
    cfg = RLConfig(group_size=4, gen_prompts_per_step=3, train_prompts_per_step=3, mini_batch_size=3,
                   temperature=0.8, clip_low=0.2, clip_high=0.28, micro_batch_token_budget=48, lr=1e-3,
                   grad_clip=1e9, loss_aggregation="token-mean", phases=[Phase("p", 64, 8, steps=1)])
    grpo = GRPOTrainer(model, engine=None, reward=None, cfg=cfg, decode=str, output_dir=tmp_path / "grpo")
    rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float64)
    advantages = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + cfg.advantage_eps)
    token_losses = []
    for g, group_advantages in zip(groups, advantages, strict=True):
        for response, advantage in zip(g.responses, group_advantages, strict=True):
            logits = reference(torch.tensor([g.example.prompt_ids + response])).logits[0].double() / cfg.temperature
            start = len(g.example.prompt_ids) - 1
            logp = torch.log_softmax(logits[start:-1], -1).gather(1, torch.tensor(response)[:, None])[:, 0]
            ratio = torch.exp(logp - logp.detach())
            token_losses.append(-torch.minimum(ratio * advantage,
                                               torch.clamp(ratio, 1 - cfg.clip_low, 1 + cfg.clip_high) * advantage))
    reference_loss = torch.cat(token_losses).sum() / sum(len(t) for t in token_losses)
    reference_loss.backward()
    micro = grpo._micro_batches(RolloutBatch.from_groups(groups, grpo._advantages(groups)))
    grpo._old_logprobs(micro)
    metrics = grpo.accumulate(micro, sum(int(b.mask.sum()) for b in micro), len(token_losses))
    assert metrics["loss"] == pytest.approx(float(reference_loss.detach()), abs=1e-6)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad.to(p.grad.dtype), rtol=1e-4, atol=1e-6, msg=name)
