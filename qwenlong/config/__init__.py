"""Typed run configuration: dataclasses loaded from YAML, with errors that name the bad key.

    cfg = load_config("configs/tiny.yaml", overrides=["rl.phases.0.max_input_tokens=4096"])

Every section is a dataclass with defaults (``schema.py``), so a YAML file only states what
differs. Loading rejects unknown keys and wrong types with a ``ConfigError`` naming the key path
(``rl.phases.1.steps: expected int, got str '10k'``), then checks ranges and cross-field rules
(``validation.py``). Overrides are ``dotted.path=value`` strings; the value is read as YAML
(``4096``, ``true``, ``[a, b]``, ``null``), list items are addressed by index, and overrides
apply before validation, so they are checked the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path

import yaml

from qwenlong.config.schema import (
    Config,
    DataConfig,
    DistributedConfig,
    DynamicSamplingConfig,
    EvalConfig,
    ModelConfig,
    OutputConfig,
    OverlongConfig,
    RewardConfig,
    RLConfig,
    RolloutConfig,
    SFTConfig,
    SyntheticDataConfig,
    TinyModelConfig,
)
from qwenlong.config.typed import ConfigError, apply_override, build_dataclass, load_yaml, plain_copy
from qwenlong.config.validation import validate

__all__ = [
    "Config", "ConfigError", "DataConfig", "DistributedConfig", "DynamicSamplingConfig", "EvalConfig", "ModelConfig",
    "OutputConfig", "OverlongConfig", "RLConfig", "RewardConfig", "RolloutConfig", "SFTConfig", "SyntheticDataConfig",
    "TinyModelConfig", "apply_override", "config_from_dict", "config_to_dict", "load_config", "save_config", "validate",
]


def config_from_dict(data: Mapping | None, overrides: Iterable[str] = ()) -> Config:
    """Build and validate a ``Config`` from a raw mapping plus ``dotted.key=value`` overrides."""
    raw = plain_copy(data or {})
    for override in overrides:
        apply_override(raw, override)
    return validate(build_dataclass(Config, raw, ""))


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """Read a YAML preset (a key given twice is an error), apply overrides, validate."""
    try:
        with open(path, encoding="utf-8") as f:
            data = load_yaml(f.read())
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read the config ({error})") from None
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    try:
        return config_from_dict(data, overrides)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def config_to_dict(cfg: Config) -> dict:
    """Plain dict of a config (``config_from_dict`` of it gives an equal config)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (into a run directory or checkpoint), atomically: a run killed while
    its config is rewritten (``--resume`` saves it again) keeps the old one whole."""
    from qwenlong.state.checkpoint import write_text  # imported here: loading a config needs no torch

    write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
