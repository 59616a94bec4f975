"""Trained policies as Hugging Face model folders that transformers, ``vllm serve`` and
``qwenlong eval --model`` load: :func:`write_hf_folder` from whole weights (a checkpoint's
``model.pt`` memory-mapped, or a state dict), :func:`export_model` from a live model. A run's
stages are exported by ``qwenlong.pipeline.export`` (``qwenlong export``)."""

from qwenlong.export.hf_folder import export_model, parse_dtype, write_hf_folder, write_safetensors

__all__ = ["export_model", "parse_dtype", "write_hf_folder", "write_safetensors"]
