"""What ``--resume`` may continue, and the run folder's record of it.

A run folder holds its resolved ``config.yaml`` and ``pipeline.json`` (finished stages, evaluations, the
last stage's checkpoint). ``--resume`` continues that run: a folder that does not exist or holds no run is
an error, and so are overrides that would make it a different run (another seed, other data, another
model), since the checkpoints it continues from were trained on what the folder's config says; so is, for a
phase resumed from its checkpoint, a change of its prompt list (``qwenlong.pipeline.run``). Other
settings may differ (output, logging, kernels, step counts, and learning settings such as a lower
``rl.lr`` after a divergence): they apply from the resumed point on, each one named on resume, and
the folder's ``config.yaml`` is rewritten with them.

Checkpoint paths are stored relative to the run folder, so a run folder that was moved or copied
elsewhere resumes from its own checkpoints.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from qwenlong.config import Config, ConfigError, config_to_dict
from qwenlong.state.checkpoint import CheckpointError, checkpoint_problem, read_json

CONFIG_FILE = "config.yaml"
RECORD_FILE = "pipeline.json"
# config keys (and everything under them) that define what a run learns from; --resume refuses to change them
IDENTITY_KEYS = ("seed", "data", "model.name", "model.tiny", "model.dtype")


def _leaves(value: Any, path: str) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_leaves(item, f"{path}.{key}" if path else str(key)))
        return out
    return {path: value}


def _under(path: str, key: str) -> bool:
    return path == key or path.startswith(key + ".")


def setting_changes(saved: dict, cfg: Config, identity: bool = True) -> list[str]:
    """``key: saved -> new`` for each setting on which ``cfg`` differs from the run folder's saved config: the
    identity settings (``IDENTITY_KEYS``), or with ``identity=False`` all the others. A key that only one of
    them has (an older or newer schema) is not compared."""
    old, new = _leaves(saved, ""), _leaves(config_to_dict(cfg), "")
    return [f"{key}: {old[key]!r} -> {new[key]!r}" for key in new
            if key in old and any(_under(key, k) for k in IDENTITY_KEYS) == identity and old[key] != new[key]]


def identity_changes(saved: dict, cfg: Config) -> list[str]:
    """``setting_changes`` of the identity settings: what ``--resume`` refuses."""
    return setting_changes(saved, cfg, identity=True)


def _trained_before_its_record(run_dir: Path) -> bool:
    """A run killed in its first stage: its config and what it trained (logged steps, checkpoints) but no record
    yet; ``--resume`` continues it, so a new run may not write over it. A config alone (a run that stopped at a
    bad data file before any step) is not one: the corrected command starts afresh in the folder."""
    if not (run_dir / CONFIG_FILE).exists():
        return False
    checkpoints = run_dir / "checkpoints"
    metrics = run_dir / "metrics.jsonl"
    return (metrics.is_file() and metrics.stat().st_size > 0) or (checkpoints.is_dir() and any(checkpoints.iterdir()))


def open_run_record(cfg: Config, run_dir: str | Path, resume: bool,
                    say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The run's record (``pipeline.json``) to continue, or a fresh one; raises when the folder cannot be
    started (``resume`` False and it holds a run) or resumed (``resume`` True and it holds no run, or
    ``cfg`` changes the run's identity). ``say`` gets one line naming the other settings a resume changes."""
    run_dir = Path(run_dir)
    record_path = run_dir / RECORD_FILE
    if not resume:
        if record_path.exists() or _trained_before_its_record(run_dir):
            raise ConfigError(f"output.dir: {run_dir} already holds a run; pass --resume or pick another dir")
        return {"done": [], "evals": {}, "carried": {}}
    if not run_dir.is_dir():
        raise ConfigError(f"output.dir: {run_dir} does not exist, so there is no run to resume "
                          "(drop --resume to start one)")
    config_path = run_dir / CONFIG_FILE
    if not config_path.is_file():
        raise ConfigError(f"output.dir: {run_dir} holds no run ({CONFIG_FILE} is missing); drop --resume to start one")
    try:
        saved = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as error:
        raise CheckpointError(f"{config_path}: corrupt YAML ({' '.join(str(error).split())})") from error
    changes = identity_changes(saved if isinstance(saved, dict) else {}, cfg)
    if changes:
        raise ConfigError(f"--resume: the overrides change what run {run_dir} is ({'; '.join(changes)}); "
                          "resume with its own settings or start a new run in another output.dir")
    others = setting_changes(saved if isinstance(saved, dict) else {}, cfg, identity=False)
    if others and say is not None:
        say(f"--resume: settings that differ from the run's apply from here on: {'; '.join(others)}")
    if not record_path.exists():  # killed during the first stage: its checkpoints are all there is
        return {"done": [], "evals": {}, "carried": {}}
    record = read_json(record_path)
    if not isinstance(record, dict) or not isinstance(record.get("done"), list):
        raise CheckpointError(f"{record_path}: not a run record (expected an object with a 'done' list)")
    return record


def stored_checkpoint(path: str | Path, run_dir: str | Path) -> str:
    """How a checkpoint inside the run folder is recorded: relative to the folder."""
    return os.path.relpath(Path(path).resolve(), Path(run_dir).resolve())


def recorded_checkpoint(stored: str, run_dir: str | Path) -> Path:
    """The checkpoint a record names (relative to the run folder; an absolute path from an older record that
    no longer exists is looked up by name in the folder's ``checkpoints``); a damaged one is an error."""
    run_dir = Path(run_dir)
    path = Path(stored)
    if not path.is_absolute():
        path = run_dir / path
    elif not path.exists():
        path = run_dir / "checkpoints" / path.name
    problem = checkpoint_problem(path) if path.is_dir() else f"{path} does not exist"
    if problem is not None:
        raise CheckpointError(f"{run_dir / RECORD_FILE}: the last finished stage's checkpoint is unusable: {problem}")
    return path
