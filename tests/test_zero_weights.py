"""Rank 0's readers for ZeRO-3 loading: safetensors checkpoints (one file or sharded) and ``model.pt``,
read one tensor at a time, against the model's own state dict."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import tiny_causal_lm  # noqa: E402

from qwenlong.distributed.zero import checkpoint_weights, safetensors_weights  # noqa: E402


def tiny_qwen2():
    return tiny_causal_lm(vocab_size=64, max_positions=32768, tie_word_embeddings=False)


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_safetensors_weights_read_every_tensor(tmp_path, shard):
    model = tiny_qwen2()
    model.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    assert (tmp_path / "model.safetensors.index.json").exists() == (shard is not None)
    weights = safetensors_weights(str(tmp_path))
    try:
        for name, tensor in model.state_dict().items():
            assert weights.shape(name) == tuple(tensor.shape), name
            assert torch.equal(weights.read(name), tensor), name
        with pytest.raises(KeyError):
            weights.shape("model.layers.9.mlp.up_proj.weight")
    finally:
        weights.close()


def test_safetensors_weights_need_safetensors(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        safetensors_weights(str(tmp_path))


def test_checkpoint_weights_read_model_pt(tmp_path):
    state = {name: tensor.clone() for name, tensor in tiny_qwen2().state_dict().items()}
    torch.save(state, tmp_path / "model.pt")
    weights = checkpoint_weights(tmp_path)
    for name, tensor in state.items():
        assert weights.shape(name) == tuple(tensor.shape) and torch.equal(weights.read(name), tensor), name
    with pytest.raises(KeyError):
        weights.shape("lm_head.bias")
