"""Write a Hugging Face model folder from whole weights, one tensor at a time.

The folder is what ``AutoModelForCausalLM.from_pretrained``, ``vllm serve`` and the Hub read:
``model.safetensors`` (or ``model-0000k-of-0000n.safetensors`` shards with
``model.safetensors.index.json``), ``config.json``, ``generation_config.json``, the tokenizer files
with its chat template, and a ``README.md`` model card.

The weights are any mapping of name to whole tensor: a checkpoint's ``model.pt`` memory-mapped
(``qwenlong.state.checkpoint.model_weights(path, mmap=True)``), where each tensor is read from
disk when it is written, or a live model's state dict. Each shard's safetensors header is planned
from the tensors' shapes alone, then the tensors are cast and written one after another, so the
writer never holds more than one tensor beyond the mapping itself (``safetensors.torch.save_file``
would hold a whole shard). Names tied to another parameter (an LM head sharing the input
embeddings) are written once, under the name ``from_pretrained`` reads, as ``save_pretrained``
does. The tensors are those of the model's released checkpoint, as ``save_pretrained`` writes them:
a Mixture-of-Experts parameter that transformers 5 fuses over the experts (``qwen3_moe``'s
``mlp.experts.gate_up_proj``) is written as one tensor per expert and projection, the format of the
released checkpoint that vLLM and transformers 4 read (converted one parameter at a time, by
:mod:`qwenlong.integrations.hf_checkpoint`). The folder is written beside its destination and
renamed into place, so a run killed while exporting never leaves half a model behind.
"""

from __future__ import annotations

import copy
import json
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from qwenlong.integrations.hf_checkpoint import CheckpointFormat
from qwenlong.state.checkpoint import commit_checkpoint, staging_dir

DEFAULT_MAX_SHARD_BYTES = 5_000_000_000  # 5 GB, transformers' usual shard size
DTYPE_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
               "fp32": torch.float32, "float32": torch.float32}
# safetensors' names for the tensor types a model folder holds
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """``bf16``/``bfloat16``, ``fp16``/``float16``, ``fp32``/``float32`` (or a torch dtype); None: keep the weights'."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPE_NAMES)}, got {name!r}")
    return DTYPE_NAMES[name]


@dataclass(frozen=True)
class _Entry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int


def _target_dtype(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """``dtype`` for floating-point tensors; integer and boolean ones keep theirs."""
    return dtype if dtype is not None and tensor.dtype.is_floating_point else tensor.dtype


def _plan_shards(entries: list[_Entry], max_shard_bytes: int) -> list[list[_Entry]]:
    """Consecutive tensors grouped into shards of at most ``max_shard_bytes`` (a larger tensor alone)."""
    shards: list[list[_Entry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def _write_shard(path: Path, entries: list[_Entry], weights: Mapping[str, torch.Tensor], bar: tqdm) -> None:
    """One safetensors file: an 8-byte little-endian header length, the JSON header (padded with spaces
    to a multiple of 8 bytes), then each tensor's bytes, C-contiguous and little-endian, in header order."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}  # transformers reads "pt" as PyTorch weights
    offset = 0
    for entry in entries:
        header[entry.name] = {"dtype": _SAFETENSORS_DTYPES[entry.dtype], "shape": list(entry.shape),
                              "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for entry in entries:
            tensor = weights[entry.name].detach().to(device="cpu", dtype=entry.dtype).contiguous()
            if tensor.numel():
                f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
            del tensor  # read (a memory-mapped tensor) and freed one at a time
            bar.update(1)


def write_safetensors(weights: Mapping[str, torch.Tensor], folder: str | Path, names: list[str] | None = None, *,
                      dtype: torch.dtype | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                      layouts: Mapping[str, torch.Tensor] | None = None, progress: bool = False) -> list[str]:
    """Write ``names`` of ``weights`` (default: all) into ``folder`` as ``model.safetensors``, or as numbered
    shards of at most ``max_shard_bytes`` with ``model.safetensors.index.json``; floating-point tensors are cast
    to ``dtype`` (None: kept). ``layouts``: tensors of the same names, shapes and dtypes (e.g. on the meta
    device) that plan the shards instead of ``weights``, for weights built only when read. ``progress``: a bar
    over the tensors on stderr (a 30B model takes minutes). Returns the files written."""
    if sys.byteorder != "little":
        raise RuntimeError("write_safetensors: safetensors stores little-endian data; this machine is big-endian")
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes: must be >= 1, got {max_shard_bytes}")
    folder = Path(folder)
    entries = []
    for name in (list(weights) if names is None else names):
        tensor = (weights if layouts is None else layouts)[name]
        target = _target_dtype(tensor, dtype)
        if target not in _SAFETENSORS_DTYPES:
            raise ValueError(f"weights: {name} has dtype {tensor.dtype}, which safetensors export does not support")
        entries.append(_Entry(name, tuple(tensor.shape), target, tensor.numel() * target.itemsize))
    shards = _plan_shards(entries, max_shard_bytes)
    files = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    with tqdm(total=len(entries), desc="write weights", unit="tensor", dynamic_ncols=True,
              disable=not progress) as bar:
        for file, shard in zip(files, shards, strict=True):
            _write_shard(folder / file, shard, weights, bar)
    if len(shards) == 1:
        return files
    index = {"metadata": {"total_size": sum(e.nbytes for e in entries)},
             "weight_map": {e.name: file for file, shard in zip(files, shards, strict=True) for e in shard}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return [*files, "model.safetensors.index.json"]


def saved_names(skeleton: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of ``weights`` to write for ``skeleton``: each of its parameters and persistent buffers once
    (a tied one under its first name). Raises ValueError when ``weights`` lack a name, hold one the model does
    not have, or a shape differs."""
    expected = skeleton.state_dict(keep_vars=True)
    first: dict[int, str] = {}
    for name, tensor in expected.items():
        first.setdefault(id(tensor), name)
    names = list(first.values())
    problems = [f"{n} is missing" for n in names if n not in weights]
    problems += [f"{n} is not a weight of {type(skeleton).__name__}" for n in weights if n not in expected]
    problems += [f"{n} has shape {tuple(weights[n].shape)}, the model's is {tuple(expected[n].shape)}"
                 for n in names if n in weights and tuple(weights[n].shape) != tuple(expected[n].shape)]
    if problems:
        raise ValueError(f"weights: {len(problems)} do not fit the model config: {'; '.join(problems[:5])}")
    return names


def write_hf_folder(out: str | Path, *, weights: Mapping[str, torch.Tensor], config: Any, tokenizer: Any,
                    generation_config: Any = None, card: str | None = None,
                    extra_files: Mapping[str, str] | None = None, dtype: torch.dtype | str | None = None,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = False) -> Path:
    """Write the HF folder ``out`` (replacing one already there): ``weights`` checked against the causal LM of
    ``config`` (a transformers ``PretrainedConfig``) and written as safetensors in ``dtype`` (None: the weights'
    own), the config, ``generation_config`` (a ``GenerationConfig``), the tokenizer, ``card`` as README.md and
    ``extra_files`` (name -> text). ``progress``: a bar over the tensors written. Returns ``out``."""
    out = Path(out)
    dtype = parse_dtype(dtype)
    checkpoint_format = CheckpointFormat(config)
    names = saved_names(checkpoint_format.skeleton, weights)
    floating = [weights[n].dtype for n in names if weights[n].dtype.is_floating_point]
    saved_dtype = dtype or (floating[0] if floating else torch.float32)
    released = checkpoint_format.released_weights(weights, names)  # per expert where the model fuses them
    tmp = staging_dir(out)
    write_safetensors(released, tmp, dtype=dtype, max_shard_bytes=max_shard_bytes, layouts=released.layouts,
                      progress=progress)
    folder_config = copy.deepcopy(config)
    folder_config.architectures = [type(checkpoint_format.skeleton).__name__]
    folder_config.dtype = saved_dtype
    folder_config.use_cache = True  # training may have turned the KV cache off (gradient checkpointing)
    folder_config.save_pretrained(tmp)
    if generation_config is not None:
        generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(str(tmp))
    _portable_tokenizer_class(tmp / "tokenizer_config.json")
    if card is not None:
        (tmp / "README.md").write_text(card, encoding="utf-8")
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text, encoding="utf-8")
    return commit_checkpoint(tmp, out)


def _portable_tokenizer_class(path: Path) -> None:
    """transformers 5 names a fast tokenizer's class ``TokenizersBackend``, which transformers 4 (and the vLLM
    builds on it) cannot load; ``PreTrainedTokenizerFast`` loads as the same class in both."""
    if not path.exists():
        return
    settings = json.loads(path.read_text(encoding="utf-8"))
    if settings.get("tokenizer_class") == "TokenizersBackend":
        settings["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def export_model(model: torch.nn.Module, tokenizer: Any, out: str | Path, *, backend: Any = None,
                 **folder: Any) -> Path:
    """Write a live model as the HF folder ``out`` (``folder``: ``write_hf_folder``'s keyword arguments).

    With its training ``backend`` (``qwenlong.distributed.TrainingBackend``) every rank calls it: the
    weights reach rank 0 the way ``model.pt`` does (under ZeRO-3 gathered one parameter at a time and
    copied to CPU), rank 0 writes the folder, and every rank returns once it is in place."""
    if backend is None:
        return write_hf_folder(out, weights=model.state_dict(), config=model.config, tokenizer=tokenizer, **folder)
    state = backend.main_state_dict()
    if backend.ctx.is_main:
        write_hf_folder(out, weights=state, config=model.config, tokenizer=tokenizer, **folder)
    backend.ctx.barrier()
    return Path(out)
