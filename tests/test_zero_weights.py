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


class OnGPU(torch.Tensor):
    """A CPU tensor that says it is on cuda:0 (a stand-in for a GPU's weights); copies made by ``.to("cpu")`` /
    ``.cpu()`` are plain CPU tensors, every other result keeps saying cuda:0."""

    @property
    def device(self):
        return torch.device("cuda", 0)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = super().__torch_function__(func, types, args, kwargs)
        targets = [*args[1:], kwargs.get("device")]
        to_cpu = func is torch.Tensor.cpu or (func is torch.Tensor.to and any(
            isinstance(t, (str, torch.device)) and torch.device(t).type == "cpu" for t in targets))
        return out.as_subclass(torch.Tensor) if to_cpu and isinstance(out, torch.Tensor) else out


@pytest.mark.parametrize("stage", [1, 2])
def test_zero12_whole_weights_are_copied_to_the_cpu(stage):
    """Under ZeRO-1/2 each GPU holds the whole model (its tensors views of DeepSpeed's flat buffers, hence a
    copy); rank 0's weights for ``model.pt`` / the engine's folder / export must not be a second whole copy
    of the model on its GPU, as ZeRO-3's gathered weights are not either."""
    from types import SimpleNamespace

    from qwenlong.config.schema import DistributedConfig
    from qwenlong.distributed.zero import DeepSpeedBackend

    weights = {"w": torch.arange(6.0).reshape(3, 2).as_subclass(OnGPU)}
    backend = object.__new__(DeepSpeedBackend)  # no engine: only the copy is under test
    backend.cfg = DistributedConfig(deepspeed_stage=stage)
    backend.model = SimpleNamespace(state_dict=lambda: weights)
    state = backend.state_dict()
    assert state["w"].device == torch.device("cpu")
    assert torch.equal(state["w"], torch.arange(6.0).reshape(3, 2))
    assert state["w"].untyped_storage().data_ptr() != weights["w"].untyped_storage().data_ptr()  # a copy


class GPUAccelerator:
    """A stand-in for DeepSpeed's CUDA accelerator, as far as ``deepspeed.zero.Init`` asks it about dtypes."""

    def is_fp16_supported(self):
        return True

    def is_bf16_supported(self):
        return True


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("gpu", [True, False])
def test_zero3_creates_a_pretrained_model_in_its_dtype(monkeypatch, dtype, gpu):
    """``deepspeed.zero.Init`` (``load_pretrained_partitioned``) creates the parameters in the dtype it is
    given, else the config's (bf16, fp16, else float32): our config has no fp16 section, so a float16 model
    left to the config would be created in float32, twice its memory on every GPU. Traced through DeepSpeed's
    own choice (``Init._set_dtype``) with the arguments we give it, on a GPU's accelerator and on this one."""
    from qwenlong.config.schema import DistributedConfig
    from qwenlong.distributed.zero import deepspeed_config, import_deepspeed, zero_init_dtype

    import_deepspeed()  # first: it picks DeepSpeed's accelerator
    import deepspeed.accelerator
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.zero import partition_parameters

    if gpu:
        monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", GPUAccelerator)
        monkeypatch.setattr(partition_parameters, "get_accelerator", GPUAccelerator)
    elif dtype == torch.float16:
        pytest.skip("DeepSpeed's CPU accelerator (without fp16) cannot be given float16: it makes it bfloat16")
    config = DeepSpeedConfig(deepspeed_config(DistributedConfig(deepspeed_stage=3), grad_clip=0.0,
                                              bf16=dtype == torch.bfloat16))
    init = object.__new__(partition_parameters.Init)
    partition_parameters.Init._set_dtype(init, config, zero_init_dtype(dtype))
    assert init.dtype == dtype
