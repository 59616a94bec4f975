"""SCE merging (qwenlong.merge): the streaming merge of tiny safetensors models against a direct
per-entry implementation written here in float64, a hand-computed case, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from qwenlong.cli import main
from qwenlong.merge import sce_merge_checkpoints, sce_merge_tensor


def direct_sce(base: torch.Tensor, models: list[torch.Tensor], select_topk: float) -> torch.Tensor:
    """SCE entry by entry, in float64 Python numbers."""
    b = base.double().flatten().tolist()
    n, m = len(b), len(models)
    deltas = [[x - y for x, y in zip(model.double().flatten().tolist(), b, strict=True)] for model in models]
    if select_topk < 1:
        variance = []
        for j in range(n):
            column = [deltas[i][j] for i in range(m)]
            mean = sum(column) / m
            variance.append(sum((c - mean) ** 2 for c in column) / m)
        chosen = set(sorted(range(n), key=lambda j: -variance[j])[: int(select_topk * n)])
        deltas = [[d if j in chosen else 0.0 for j, d in enumerate(row)] for row in deltas]
    energy = [sum(d * d for d in row) / n for row in deltas]
    weights = [e / sum(energy) for e in energy] if sum(energy) > 0 else [1.0 / m] * m

    def sign(x: float) -> int:
        return (x > 0) - (x < 0)

    out = []
    for j in range(n):
        majority = sign(sum(deltas[i][j] for i in range(m)))
        num = den = 0.0
        for i in range(m):
            if sign(deltas[i][j]) == majority:
                num += weights[i] * deltas[i][j]
                den += weights[i]
        out.append(b[j] + (num / den if den else 0.0))
    return torch.tensor(out, dtype=torch.float64).view(base.shape)


def test_sce_hand_computed():
    base = torch.zeros(3)
    merged = sce_merge_tensor(base, [torch.tensor([1.0, -2.0, 0.5]), torch.tensor([3.0, 1.0, 0.0])])
    w1, w2 = (1 + 4 + 0.25) / 3, (9 + 1 + 0) / 3
    # entry 0: both positive, weighted mean; entry 1: the sum is negative, +1 is erased; entry 2: the second
    # model did not move it (sign 0 is not the majority), so the first one's 0.5 is kept whole
    expected = [(w1 * 1 + w2 * 3) / (w1 + w2), -2.0, 0.5]
    assert merged.tolist() == pytest.approx(expected)
    # selecting the top third by variance keeps entry 1 only (variance 2.25 vs 1 and 0.0625): weights 4/3 : 1/3,
    # and the negative majority erases the second model's +1
    assert sce_merge_tensor(base, [torch.tensor([1.0, -2.0, 0.5]), torch.tensor([3.0, 1.0, 0.0])],
                            select_topk=0.34).tolist() == pytest.approx([0.0, -2.0, 0.0])


def _tiny(seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=48, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return Qwen2ForCausalLM(config)


def _fine_tuned(base: Qwen2ForCausalLM, seed: int, touched: float) -> Qwen2ForCausalLM:
    """A copy of ``base`` whose weights moved by noise, only in a ``touched`` fraction of its tensors."""
    model = _tiny(0)
    model.load_state_dict(base.state_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, param in enumerate(model.parameters()):
            if (i * 0.618) % 1.0 < touched:
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    return model


@pytest.fixture
def models(tmp_path):
    base = _tiny(0)
    paths = {"base": tmp_path / "base", "b": tmp_path / "b", "c": tmp_path / "c"}
    base.save_pretrained(paths["base"], max_shard_size="20KB")  # a sharded input
    (paths["base"] / "tokenizer.json").write_text('{"model": "tiny"}')
    (paths["base"] / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    _fine_tuned(base, 1, touched=1.0).save_pretrained(paths["b"])
    _fine_tuned(base, 2, touched=0.6).save_pretrained(paths["c"])
    return paths


def _state(folder) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else \
        ["model.safetensors"]
    state = {}
    for file in files:
        state.update(load_file(folder / file))
    return state


def test_sce_select_breaks_ties_by_position():
    """Equal variances (here integer deltas, exact in float32 and float64): the first positions are kept, as
    the reference's stable sort does, so CPU and GPU select alike."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randint(-2, 3, (6, 7), generator=generator).float()
    models = [base + torch.randint(-1, 2, (6, 7), generator=generator).float() for _ in range(3)]
    for select_topk in (0.1, 0.3, 0.5, 0.9):
        torch.testing.assert_close(sce_merge_tensor(base, models, select_topk).double(),
                                   direct_sce(base, models, select_topk))
    # one model: no variance anywhere; a fraction of 0.3 keeps the first three of ten entries
    merged = sce_merge_tensor(torch.zeros(10), [torch.arange(1.0, 11.0)], select_topk=0.3)
    assert merged.tolist() == [1.0, 2.0, 3.0] + [0.0] * 7


def test_sce_merges_scalar_tensors():
    """A 0-dim parameter (a learned scale) merges like any tensor (its weights' flatten(1) raised IndexError)."""
    generator = torch.Generator().manual_seed(3)
    base = torch.randn((), generator=generator, dtype=torch.float64)
    models = [base + torch.randn((), generator=generator, dtype=torch.float64) for _ in range(3)]
    for select_topk in (1.0, 0.5):
        merged = sce_merge_tensor(base, models, select_topk)
        assert merged.shape == ()
        torch.testing.assert_close(merged, direct_sce(base, models, select_topk))


@pytest.mark.parametrize("select_topk", [1.0, 0.3])
def test_streaming_sce_matches_direct_implementation(models, tmp_path, select_topk):
    out = tmp_path / "merged"
    assert main(["merge", "--method", "sce", "--base", str(models["base"]), "--models", str(models["b"]),
                 str(models["c"]), "--out", str(out), "--select-topk", str(select_topk),
                 "--max-shard-size", "16KB"]) == 0
    assert (out / "model.safetensors.index.json").is_file()  # the output is sharded too
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    assert not (tmp_path / "merged.partial").exists()
    base, b, c, merged = (_state(p) for p in (models["base"], models["b"], models["c"], out))
    assert set(merged) == set(base)
    for name, tensor in base.items():
        expected = direct_sce(tensor, [b[name], c[name]], select_topk)
        assert merged[name].dtype == tensor.dtype
        assert torch.allclose(merged[name].double(), expected, atol=1e-6, rtol=1e-5), name
    # not a no-op, and every tensor moved off the base
    assert all(not torch.equal(merged[name], base[name]) for name in base)
    for file in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / file).read_bytes() == (models["base"] / file).read_bytes()
    model = AutoModelForCausalLM.from_pretrained(out)  # transformers reads the result
    assert torch.equal(model.state_dict()["lm_head.weight"], merged["lm_head.weight"])


def test_merge_refuses_bad_inputs(models, tmp_path):
    other = _tiny(5)
    other.config.intermediate_size = 32
    Qwen2ForCausalLM(other.config).save_pretrained(tmp_path / "wide")
    with pytest.raises(ValueError, match="shape"):
        sce_merge_checkpoints(models["base"], [models["b"], tmp_path / "wide"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="out"):
        sce_merge_checkpoints(models["base"], [models["b"]], models["base"])
    with pytest.raises(ValueError, match="select_topk"):
        sce_merge_checkpoints(models["base"], [models["b"]], tmp_path / "out2", select_topk=0.0)
    with pytest.raises(ValueError, match="neither"):
        sce_merge_checkpoints(tmp_path, [models["b"]], tmp_path / "out3")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        sce_merge_checkpoints(models["base"], [models["b"]], tmp_path / "full")
    assert (tmp_path / "full" / "x").read_text() == "keep me"


def test_inplace_merge_keeps_the_models_precision_over_a_bf16_base():
    """The pipeline's in-place merge of an fp32 policy over the released bf16 weights (ZeRO-3 reads the base from
    the safetensors as they are): the result is the fp32 merge, not one rounded to the base's bf16 (that rounding
    is ~0.4% of a weight, far more than what RL moved it: the merge wiped out the fine-tuning)."""
    from qwenlong.distributed.zero import WholeWeights
    from qwenlong.merge import merge_into_model

    model = _tiny(0)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for param in model.parameters():  # weights a bf16 file holds exactly
            param.copy_(param.to(torch.bfloat16).float())
    base = {name: tensor.to(torch.bfloat16) for name, tensor in model.state_dict().items()}
    other = {name: tensor.float() + 1e-4 * torch.randn(tensor.shape, generator=generator)
             for name, tensor in base.items()}
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1e-4 * torch.randn(param.shape, generator=generator))
    own = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    def sources():
        return (WholeWeights(lambda name: tuple(base[name].shape), base.__getitem__),
                [WholeWeights(lambda name: tuple(other[name].shape), other.__getitem__)])

    merge_into_model(model, sources, lambda b, others: sce_merge_tensor(b, others, 0.5))
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == torch.float32
        expected = direct_sce(base[name], [other[name], own[name]], 0.5)
        torch.testing.assert_close(tensor.double(), expected, rtol=1e-6, atol=1e-6,
                                   msg=lambda text, name=name: f"{name}: {text}")
