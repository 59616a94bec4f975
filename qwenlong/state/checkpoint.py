"""Checkpoints that let a run continue exactly where it stopped.

A checkpoint is a folder holding the model, optimizer and scheduler state, the RNG states
and a JSON ``state`` (stage, step, phase, reward history, anything the trainer needs). It is
written to a temporary folder and renamed into place, so a run killed mid-save never leaves a
half checkpoint behind; ``latest_checkpoint`` finds the newest complete one whose files are intact
(a damaged newest one, say a file truncated by a full disk, is passed over with a warning). Checkpoints
whose names differ only in a trailing step number (``sft-step000010``, ``sft-step000020``) form a
series, of which ``prune_checkpoints`` keeps the newest few. "Newest" is the order of the saves, which
each checkpoint records (``save_order``: one more than any other in its folder), so a run folder
copied without its file times resumes from the right checkpoint; checkpoints written before the order
was recorded fall back to their state file's write time.

Everything is read back with ``torch.load(weights_only=True)``: the RNG states are stored as tensors
and plain Python values, so loading a checkpoint never runs code from it. JSON files (the state, the
pipeline's record) are written to a temporary file and renamed into place, so a kill mid-write
leaves the old file, never half a new one (``write_text``, which the run's other records use too).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "state.json"
MODEL_FILE = "model.pt"
TRAINER_FILE = "trainer.pt"
STAGING_SUFFIX = ".tmp"
ORDER_FILE = "save_order"  # the checkpoint's place among its folder's saves (an integer, as text)
REPLACED_SUFFIX = ".replaced"  # a checkpoint of the same name being replaced, deleted once the new one is in place


class CheckpointError(RuntimeError):
    """A checkpoint or run record cannot be read; the message names the file and what is wrong."""


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch and CUDA generator states as tensors and plain values (``weights_only`` loads them)."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            # the GPU this process draws from: a resume that sees other GPUs continues it on its own
            "cuda_device": torch.cuda.current_device() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy = state["numpy"]
    np.random.set_state((numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        _set_cuda_rng_state(state["cuda"], state.get("cuda_device"))


def _set_cuda_rng_state(saved: list[torch.Tensor], used: int | None) -> None:
    """Restore the GPU generators of ``rng_state``. By index only where the process sees the GPUs it saved
    with and uses the same one: a rank resumed with another number of visible GPUs (all of them, or one per
    process under CUDA_VISIBLE_DEVICES) gets the saved state of the GPU it drew from on the GPU it uses now."""
    count, current = torch.cuda.device_count(), torch.cuda.current_device()
    if len(saved) == count and used in (None, current):
        torch.cuda.set_rng_state_all(saved)
    elif used is not None and used < len(saved):
        torch.cuda.set_rng_state(saved[used], current)
    else:  # a checkpoint from before the GPU in use was recorded: the GPUs both layouts have
        for index in range(min(len(saved), count)):
            torch.cuda.set_rng_state(saved[index], index)


def load_tensors(path: str | Path, mmap: bool = False) -> Any:
    """``torch.load`` of a checkpoint file with ``weights_only=True``, on CPU; an unreadable file is a
    ``CheckpointError`` naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except Exception as error:  # torch raises RuntimeError, UnpicklingError, EOFError... for a damaged file
        raise CheckpointError(f"{path}: cannot be read ({type(error).__name__}: {_one_line(error)})") from error


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) atomically: a temporary file beside ``path``, flushed, then renamed over it."""
    write_lines(path, [text])


def write_lines(path: str | Path, lines: Iterable[str]) -> None:
    """Write ``lines`` (UTF-8) atomically as :func:`write_text`, streamed: a file of gigabytes needs no second
    copy in memory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, an interrupt: the old file stays, and no temporary file is left
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | Path, value: Any) -> None:
    """Write ``value`` as JSON atomically (``write_text``)."""
    write_text(path, json.dumps(value, indent=1))


def read_json(path: str | Path) -> Any:
    """A JSON file's value; an unreadable or corrupt file is a ``CheckpointError`` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: corrupt JSON ({_one_line(error)})") from error


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]


def staging_path(path: str | Path) -> Path:
    """Where the checkpoint for ``path`` is written before it is renamed into place."""
    path = Path(path)
    return path.with_name(path.name + STAGING_SUFFIX)


def staging_dir(path: str | Path) -> Path:
    """An empty temporary folder next to ``path`` to write a checkpoint into."""
    tmp = staging_path(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def sync_folder(folder: str | Path) -> None:
    """Flush ``folder``'s entries (files created or renamed in it) to disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(folder: str | Path) -> None:
    """Flush every file under ``folder`` (whichever rank or library wrote it), then the folders' entries."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        sync_folder(root)


def write_checkpoint(folder: Path, model_state: dict, optimizer_state: dict | None, scheduler_state: dict | None,
                     state: dict[str, Any]) -> None:
    """Write a checkpoint's files into its staging ``folder`` (next to the checkpoints it joins)."""
    torch.save(model_state, folder / MODEL_FILE)
    torch.save({"optimizer": optimizer_state, "scheduler": scheduler_state, "rng": rng_state()},
               folder / TRAINER_FILE)
    order = 1 + max((save_order(p)[0] for p in folder.parent.iterdir() if p != folder and p.is_dir()), default=0)
    (folder / ORDER_FILE).write_text(str(order), encoding="utf-8")  # the staging folder is committed whole, synced
    write_json(folder / STATE_FILE, state)


def save_order(path: Path) -> tuple[int, int]:
    """Sort key of a checkpoint folder, oldest first: the order its save recorded (0 for a checkpoint from
    before the order was recorded, or not a checkpoint), then its state file's write time."""
    try:
        order = int((path / ORDER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        order = 0
    try:
        written = (path / STATE_FILE).stat().st_mtime_ns
    except OSError:
        written = 0
    return order, written


def commit_checkpoint(tmp: Path, path: str | Path) -> Path:
    """Rename a fully written staging folder into place. A checkpoint already there under that name is
    renamed aside first and deleted after: the run is without a checkpoint of that name for two renames,
    not for the deletion of a whole folder. Its files are on disk before the rename makes it the checkpoint,
    and the rename before anything older is deleted: a power loss right after a save (and the prune that
    follows it) finds the new checkpoint whole, or the old one."""
    path = Path(path)
    sync_tree(tmp)
    replaced = path.with_name(path.name + REPLACED_SUFFIX)
    if path.exists():
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(path, replaced)
    os.replace(tmp, path)
    sync_folder(path.parent)
    shutil.rmtree(replaced, ignore_errors=True)
    return path


def save_checkpoint(path: str | Path, *, model: torch.nn.Module, optimizer=None, scheduler=None,
                    state: dict[str, Any]) -> Path:
    """Write a checkpoint folder at ``path`` atomically; returns the path."""
    tmp = staging_dir(path)
    write_checkpoint(tmp, model.state_dict(), optimizer.state_dict() if optimizer is not None else None,
                     scheduler.state_dict() if scheduler is not None else None, state)
    return commit_checkpoint(tmp, path)


def model_weights(path: str | Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """A checkpoint folder's whole model weights, on CPU; ``mmap``: each tensor is read from disk when used."""
    return load_tensors(Path(path) / MODEL_FILE, mmap=mmap)


def load_checkpoint(path: str | Path, *, model: torch.nn.Module | None, optimizer=None, scheduler=None,
                    restore_rng: bool = True) -> dict[str, Any]:
    """Load a checkpoint into the given objects (``model`` None: not the weights); returns its JSON state."""
    path = Path(path)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"path: {path} is not a complete checkpoint (no {STATE_FILE})")
    if model is not None:
        model.load_state_dict(model_weights(path))
    trainer = load_tensors(path / TRAINER_FILE)
    if optimizer is not None and trainer["optimizer"] is not None:
        optimizer.load_state_dict(trainer["optimizer"])
    if scheduler is not None and trainer["scheduler"] is not None:
        scheduler.load_state_dict(trainer["scheduler"])
    if restore_rng:
        set_rng_state(trainer["rng"])
    return read_json(path / STATE_FILE)


def _oldest_first(folders: list[Path]) -> list[Path]:
    """The complete checkpoints among ``folders`` (committed, with a state file), oldest first."""
    complete = [p for p in folders if p.is_dir() and not p.name.endswith(STAGING_SUFFIX) and (p / STATE_FILE).exists()]
    return sorted(complete, key=save_order)


def complete_checkpoints(directory: str | Path, prefix: str = "") -> list[Path]:
    """The complete checkpoints of the series ``prefix`` under ``directory``, oldest first: folders named
    ``{prefix}step{N}`` exactly, so ``rl-long-docs-`` never matches ``rl-long-docs-warm-step000001``
    (staging folders of saves that never committed are not among them)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    name = re.compile(re.escape(prefix) + r"step\d+")
    return _oldest_first([p for p in directory.iterdir() if name.fullmatch(p.name)])


def checkpoint_problem(path: str | Path) -> str | None:
    """What is wrong with a committed checkpoint's files (None: intact as far as a cheap look can tell).

    The state file must be a JSON object, the model and trainer files must be there, and every ``.pt``
    file must be a whole zip archive (``torch.save``'s
    format): a file cut short loses the archive's directory at its end, or one of its entries. Reading
    the directory costs a few kilobytes, not the weights."""
    path = Path(path)
    try:
        if not isinstance(read_json(path / STATE_FILE), dict):
            return f"{path / STATE_FILE}: not a JSON object"
    except (OSError, CheckpointError) as error:
        return str(error)
    for required in (MODEL_FILE, TRAINER_FILE):
        if not (path / required).is_file():
            return f"{path / required} is missing"
    for file in sorted(path.rglob("*.pt")):  # DeepSpeed's shards too, in their own folder
        try:
            size = file.stat().st_size
            with zipfile.ZipFile(file) as archive:
                for entry in archive.infolist():
                    if entry.header_offset + entry.compress_size > size:
                        return f"{file}: entry {entry.filename} runs past the end of the file (truncated)"
        except (OSError, zipfile.BadZipFile) as error:
            return f"{file}: not a complete torch.save archive ({_one_line(error)})"
    return None


def latest_checkpoint(directory: str | Path, prefix: str = "") -> Path | None:
    """The most recently saved intact checkpoint of the series ``prefix`` (named ``{prefix}step{N}``)
    under ``directory``. A newer checkpoint whose files are damaged (``checkpoint_problem``) is passed
    over with a warning, so a run resumes from the previous kept one instead of failing or, worse,
    starting over."""
    for path in reversed(complete_checkpoints(directory, prefix)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        warnings.warn(f"checkpoint {path} is damaged and is skipped: {problem}; resuming from the one before it",
                      stacklevel=2)
    return None


def prune_checkpoints(path: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints of ``path``'s series (its siblings named like it
    up to a trailing step number), and the series' leftovers of killed runs (folders without a state
    file, staging folders, checkpoints being replaced); ``keep`` 0 deletes nothing. Call it between saves.
    Returns the deleted paths.

    A checkpoint's state file goes first, so a run killed mid-delete leaves an incomplete folder
    that ``latest_checkpoint`` never picks. A folder that cannot be deleted stays, with a warning:
    losing disk space is better than losing the run."""
    if keep < 0:
        raise ValueError(f"keep: must be >= 0 (0 keeps every checkpoint), got {keep}")
    path = Path(path)
    series = re.sub(r"\d+$", "", path.name)
    if keep == 0 or series == path.name:
        return []
    leftovers = "|".join(re.escape(suffix) for suffix in (STAGING_SUFFIX, REPLACED_SUFFIX))
    member = re.compile(re.escape(series) + r"\d+(" + leftovers + ")?")
    members = [p for p in path.parent.iterdir() if p.is_dir() and member.fullmatch(p.name)]
    complete = _oldest_first(members)
    stale = complete[:-keep] + [p for p in members if p not in complete and p != path]
    deleted = []
    for p in stale:
        try:
            (p / STATE_FILE).unlink(missing_ok=True)
            shutil.rmtree(p)
        except OSError as error:
            warnings.warn(f"checkpoint {p} could not be deleted ({error}); it stays on disk", stacklevel=2)
            continue
        deleted.append(p)
    return deleted
