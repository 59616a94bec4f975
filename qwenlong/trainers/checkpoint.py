"""Checkpoints that let a run continue exactly where it stopped.

A checkpoint is a folder holding the model, optimizer and scheduler state, the RNG states
and a JSON ``state`` (stage, step, phase, reward history, anything the trainer needs). It is
written to a temporary folder and renamed into place, so a run killed mid-save never leaves a
half checkpoint behind; ``latest`` finds the newest complete one. Checkpoints whose names differ
only in a trailing step number (``sft-step000010``, ``sft-step000020``) form a series, of which
``prune_checkpoints`` keeps the newest few.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "state.json"
MODEL_FILE = "model.pt"
STAGING_SUFFIX = ".tmp"


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def write_checkpoint(folder: Path, model_state: dict, optimizer_state: dict | None, scheduler_state: dict | None,
                     state: dict[str, Any]) -> None:
    torch.save(model_state, folder / MODEL_FILE)
    torch.save({"optimizer": optimizer_state, "scheduler": scheduler_state, "rng": rng_state()},
               folder / "trainer.pt")
    (folder / STATE_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")


def commit_checkpoint(tmp: Path, path: str | Path) -> Path:
    """Rename a fully written staging folder into place."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
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
    return torch.load(Path(path) / MODEL_FILE, map_location="cpu", weights_only=True, mmap=mmap)


def load_checkpoint(path: str | Path, *, model: torch.nn.Module | None, optimizer=None, scheduler=None,
                    restore_rng: bool = True) -> dict[str, Any]:
    """Load a checkpoint into the given objects (``model`` None: not the weights); returns its JSON state."""
    path = Path(path)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"path: {path} is not a complete checkpoint (no {STATE_FILE})")
    if model is not None:
        model.load_state_dict(model_weights(path))
    trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
    if optimizer is not None and trainer["optimizer"] is not None:
        optimizer.load_state_dict(trainer["optimizer"])
    if scheduler is not None and trainer["scheduler"] is not None:
        scheduler.load_state_dict(trainer["scheduler"])
    if restore_rng:
        set_rng_state(trainer["rng"])
    return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))


def complete_checkpoints(directory: str | Path, prefix: str = "") -> list[Path]:
    """The complete checkpoints under ``directory`` whose names start with ``prefix``, oldest first
    (staging folders of saves that never committed are not among them)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    complete = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith(prefix)
                and not p.name.endswith(STAGING_SUFFIX) and (p / STATE_FILE).exists()]
    return sorted(complete, key=lambda p: (p / STATE_FILE).stat().st_mtime_ns)


def latest_checkpoint(directory: str | Path, prefix: str = "") -> Path | None:
    """The most recently written complete checkpoint under ``directory`` whose name starts with ``prefix``."""
    complete = complete_checkpoints(directory, prefix)
    return complete[-1] if complete else None


def prune_checkpoints(path: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints of ``path``'s series (its siblings named like it
    up to a trailing step number), and the series' leftovers of killed runs (folders without a state
    file, staging folders); ``keep`` 0 deletes nothing. Call it between saves. Returns the deleted paths.

    A checkpoint's state file goes first, so a run killed mid-delete leaves an incomplete folder
    that ``latest_checkpoint`` never picks. A folder that cannot be deleted stays, with a warning:
    losing disk space is better than losing the run."""
    if keep < 0:
        raise ValueError(f"keep: must be >= 0 (0 keeps every checkpoint), got {keep}")
    path = Path(path)
    series = re.sub(r"\d+$", "", path.name)
    if keep == 0 or series == path.name:
        return []
    member = re.compile(re.escape(series) + r"\d+(" + re.escape(STAGING_SUFFIX) + ")?")
    members = [p for p in path.parent.iterdir() if p.is_dir() and member.fullmatch(p.name)]
    complete = [p for p in complete_checkpoints(path.parent, series) if p in members]
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
