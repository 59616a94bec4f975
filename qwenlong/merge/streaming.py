"""Merging safetensors checkpoints one tensor at a time.

Memory stays bounded by the largest tensor (times the number of models) plus one output shard:
every input is opened with ``safe_open`` (memory-mapped, tensors read on request), each base
tensor is merged with the same-named tensors of the other models, and finished tensors are written
out in shards of at most ``max_shard_bytes``.

The unit of the merge is a parameter of the model, as in the pipeline's in-place merge
(:mod:`qwenlong.merge.inplace`): a Mixture-of-Experts model whose transformers parameters fuse the
experts (``qwen3_moe``: one ``mlp.experts.gate_up_proj`` per layer, stored per expert) is merged one
fused parameter at a time, built from the per-expert tensors of each folder (a folder in the fused
format reads as it is), and written in the released per-expert format, as ``save_pretrained`` writes
it. SCE's selection and weights are per tensor, so this differs from merging each expert's tensors
on their own.

The output folder is built under ``<out>.partial`` and renamed to ``<out>`` only when complete; a
failed merge removes it, so it leaves no half-written model (a ``<out>.partial`` the merge did not make
is refused, never deleted). Config, tokenizer and other non-weight files are copied from the base
folder, except its model card and ``qwenlong.json`` (what a ``qwenlong export`` came from): the merged
folder gets its own ``README.md``, naming the method and the merged folders, and no ``qwenlong.json``,
so ``qwenlong eval`` does not take it for the export it was merged from.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from qwenlong.config import ConfigError
from qwenlong.integrations.hf_checkpoint import CheckpointFormat
from qwenlong.merge.sce import sce_merge_tensor

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")
CARD_FILE = "README.md"
EXPORT_INFO_FILE = "qwenlong.json"  # qwenlong.pipeline.export.INFO_FILE: the run and stage an export came from
NOT_COPIED = (CARD_FILE, EXPORT_INFO_FILE)  # they describe the base, not the merged model
STAGING_MARK = ".qwenlong-merge-staging"  # in <out>.partial while a merge writes it


class CheckpointReader:
    """The tensors of a Hugging Face model folder (``model.safetensors`` or a sharded index), opened lazily, by
    the names of the model's parameters: a parameter that transformers builds from several checkpoint tensors
    (the fused experts of a Mixture-of-Experts model) is built from them when read (``checkpoint_format``,
    from the folder's ``config.json``). A folder that holds no such model raises :class:`ConfigError` (the
    user's input, named)."""

    def __init__(self, folder: str | Path, stack: ExitStack) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ConfigError(f"model folder: {str(self.folder)!r} is not a directory")
        index = self.folder / INDEX_FILE
        if index.is_file():
            self.file_of = dict(json.loads(index.read_text())["weight_map"])
        elif (self.folder / SINGLE_FILE).is_file():
            self.file_of = None
        else:
            raise ConfigError(f"model folder: {str(self.folder)!r} holds neither {SINGLE_FILE} nor {INDEX_FILE}")
        self._stack = stack
        self._handles: dict[str, object] = {}
        if self.file_of is None:
            self.file_of = dict.fromkeys(self._handle(SINGLE_FILE).keys(), SINGLE_FILE)
        self.checkpoint_format = CheckpointFormat.of_folder(self.folder)
        self._weights = self.checkpoint_format.model_weights(
            self.file_of, lambda key: tuple(self._handle(self.file_of[key]).get_slice(key).get_shape()),
            lambda key: self._handle(self.file_of[key]).get_tensor(key))

    def _handle(self, file: str):
        if file not in self._handles:
            self._handles[file] = self._stack.enter_context(safe_open(self.folder / file, framework="pt"))
        return self._handles[file]

    def names(self) -> list[str]:
        return sorted(self._weights.names())

    def shape(self, name: str) -> tuple[int, ...]:
        """``name``'s shape, from the files' headers (nothing read)."""
        if name not in self._weights:
            raise ConfigError(f"model folder {str(self.folder)!r}: no tensor named {name!r}")
        return tuple(self._weights.shape(name))

    def get(self, name: str) -> torch.Tensor:
        if name not in self._weights:
            raise ConfigError(f"model folder {str(self.folder)!r}: no tensor named {name!r}")
        return self._weights.read(name)


class ShardWriter:
    """Writes tensors into safetensors shards of at most ``max_shard_bytes`` (a larger tensor gets its own)."""

    def __init__(self, folder: Path, max_shard_bytes: int) -> None:
        if max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes: expected >= 1, got {max_shard_bytes}")
        self.folder, self.max_shard_bytes = folder, max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        save_file(self._pending, self.folder / f"shard-{len(self._shards):05d}.tmp", metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> int:
        """Names the shards as transformers does (one file, or an index); returns the number of shards."""
        if self._pending or not self._shards:
            self._flush()
        count = len(self._shards)
        if count == 1:
            (self.folder / "shard-00000.tmp").rename(self.folder / SINGLE_FILE)
            return 1
        weight_map = {}
        for i, names in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            (self.folder / f"shard-{i:05d}.tmp").rename(self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return count


TensorMerge = Callable[[torch.Tensor, Sequence[torch.Tensor]], torch.Tensor]


def merge_checkpoints(base: str | Path, models: Sequence[str | Path], out: str | Path, merge: TensorMerge,
                      max_shard_bytes: int = 5 * 2**30, overwrite: bool = False, *,
                      method: str = "a custom tensor merge", progress: bool = False) -> dict:
    """Merge ``models`` into ``base`` with ``merge(base_tensor, model_tensors)``, one tensor at a time.

    Every floating-point tensor of the base is merged; integer tensors (buffers) are copied from it.
    Each model must hold every base tensor with the same shape and no tensor the base lacks; inputs that
    cannot be merged raise :class:`ConfigError` naming the argument (``out``, ``models``, ...). ``method``
    describes ``merge`` in the model card; ``progress``: a bar over the tensors on stderr.
    Returns a summary (tensors, shards, bytes, seconds).
    """
    if not models:
        raise ConfigError("models: give at least one model to merge into the base")
    if max_shard_bytes < 1:
        raise ConfigError(f"max_shard_bytes: expected >= 1, got {max_shard_bytes}")
    out = Path(out)
    if out.resolve() in {Path(p).resolve() for p in (base, *models)}:
        raise ConfigError(f"out: {str(out)!r} is one of the input models")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out: {str(out)!r} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"out: {str(out)!r} exists and is not empty (pass overwrite=True / --overwrite)")
    staging = out.with_name(out.name + ".partial")
    _clear_staging(staging)
    try:
        staging.mkdir(parents=True)
    except OSError as error:
        raise ConfigError(f"out: cannot create {str(staging)!r} ({error.strerror or error})") from None
    start = time.perf_counter()
    try:  # from here on the staging folder is this merge's: removed unless renamed to out
        (staging / STAGING_MARK).touch()
        with ExitStack() as stack:
            base_reader = CheckpointReader(base, stack)
            readers = [CheckpointReader(m, stack) for m in models]
            names = base_reader.names()
            for reader in readers:
                extra = sorted(set(reader.names()) - set(names))
                if extra:
                    raise ConfigError(f"models: {str(reader.folder)!r} has tensors the base lacks, e.g. {extra[:3]}")
                for name in names:  # from the headers: a mismatch is found before anything is merged
                    if reader.shape(name) != base_reader.shape(name):
                        raise ConfigError(f"models: {name!r} has shape {reader.shape(name)} in "
                                          f"{str(reader.folder)!r}, {base_reader.shape(name)} in the base")
            writer = ShardWriter(staging, max_shard_bytes)
            for name in tqdm(names, desc="merge", unit="tensor", dynamic_ncols=True, disable=not progress):
                base_tensor = base_reader.get(name)
                others = [reader.get(name) for reader in readers]
                for reader, tensor in zip(readers, others, strict=True):
                    if tensor.shape != base_tensor.shape:
                        raise ConfigError(f"models: {name!r} has shape {tuple(tensor.shape)} in "
                                          f"{str(reader.folder)!r}, {tuple(base_tensor.shape)} in the base")
                merged = merge(base_tensor, others) if base_tensor.is_floating_point() else base_tensor
                del others
                for released, tensor in base_reader.checkpoint_format.released(name, merged).items():
                    writer.add(released, tensor)
            shards = writer.close()
        for path in Path(base).iterdir():
            if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and path.name not in NOT_COPIED:
                shutil.copy2(path, staging / path.name)
        (staging / CARD_FILE).write_text(merge_card(base, models, method), encoding="utf-8")
        (staging / STAGING_MARK).unlink()
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        if staging.is_dir():  # a failed merge: nothing half-written stays behind
            shutil.rmtree(staging, ignore_errors=True)
    return {"tensors": len(names), "shards": shards, "bytes": writer.total_bytes,
            "seconds": time.perf_counter() - start}


def _clear_staging(staging: Path) -> None:
    """Removes the ``<out>.partial`` a killed merge left (it holds :data:`STAGING_MARK`); anything else by
    that name is the user's, and refused."""
    if not (staging.exists() or staging.is_symlink()):
        return
    if staging.is_dir() and not staging.is_symlink() and (staging / STAGING_MARK).is_file():
        shutil.rmtree(staging)
        return
    raise ConfigError(f"out: {str(staging)!r} exists and is not a merge's staging folder (the merge is written "
                      "there first): move it away")


def _provenance(folder: Path) -> str:
    """`` (exported from stage S at step N of run R)`` for a folder ``qwenlong export`` wrote, else ``""``."""
    try:
        info = json.loads((folder / EXPORT_INFO_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    if not isinstance(info, dict) or "stage" not in info:
        return ""
    return f" (exported from stage `{info['stage']}` at step {info.get('step')} of run `{info.get('run')}`)"


def merge_card(base: str | Path, models: Sequence[str | Path], method: str) -> str:
    """README.md of a merged folder: what was merged into what, and how."""
    base = Path(base).resolve()
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [qwenlong, merge]", "---",
             "", "# Merged model", "",
             f"Written by `qwenlong merge`: {len(models)} model(s) merged into a base model by {method}, "
             "one tensor at a time (each floating-point tensor merged; other tensors are the base's).", "",
             f"- base: `{base}`{_provenance(base)}"]
    lines += [f"- merged: `{Path(m).resolve()}`{_provenance(Path(m).resolve())}" for m in models]
    lines += ["", "Config, generation config and tokenizer files are the base's; its model card and "
              f"`{EXPORT_INFO_FILE}` are not copied (they describe the base, not this model).", ""]
    return "\n".join(lines)


def sce_merge_checkpoints(base: str | Path, models: Sequence[str | Path], out: str | Path,
                          select_topk: float = 1.0, **kwargs) -> dict:
    """SCE merge (:mod:`qwenlong.merge.sce`) of safetensors model folders; see :func:`merge_checkpoints`."""
    if not 0.0 < select_topk <= 1.0:
        raise ConfigError(f"select_topk: expected a fraction in (0, 1], got {select_topk}")
    return merge_checkpoints(base, models, out, lambda b, ts: sce_merge_tensor(b, ts, select_topk),
                             method=f"SCE (select_topk {select_topk})", **kwargs)
