"""Plain YAML data -> typed dataclasses, and ``dotted.key=value`` overrides on the plain data.

Knows nothing about the run's schema: any dataclass whose fields are annotated with ``int``,
``float``, ``str``, ``bool``, ``Literal[...]``, ``X | None``, ``list[X]`` or another dataclass
can be built. Every error is a ``ConfigError`` whose message starts with the key path
(``rl.phases.1.steps: expected int, got str '10k'``).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (plain YAML keeps the
    last value silently, so a preset that sets ``lr`` twice trains with whichever came second)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    first_line: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *defaults``: its keys may be overridden
            continue
        key, line = loader.construct_object(key_node, deep=deep), key_node.start_mark.line + 1
        try:
            if key in first_line:
                raise ConfigError(f"{key}: duplicate key (line {first_line[key]} and line {line})")
            first_line[key] = line
        except TypeError:  # an unhashable key: construct_mapping reports it
            continue
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def load_yaml(text: str) -> Any:
    """Parse YAML text as ``yaml.safe_load`` does, but reject duplicate keys; a syntax error is a
    ``ConfigError`` giving the line."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as error:
        raise ConfigError(f"invalid YAML: {' '.join(str(error).split())}") from None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _build(tp: Any, value: Any, path: str) -> Any:
    """Turn the YAML value at ``path`` into type ``tp``, or raise ConfigError naming ``path``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _build(inner, value, path)
    if value is None:
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got null")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: expected one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        return [_build(args[0], item, f"{path}.{i}") for i, item in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, path)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-5" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{path}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def build_dataclass(cls: type, value: Any, path: str) -> Any:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a mapping of {cls.__name__} fields, got {value!r}")
    prefix = f"{path}." if path else ""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in value:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1, cutoff=0.6)
            hint = f"did you mean {prefix}{close[0]}? " if close else ""
            raise ConfigError(f"{prefix}{key}: unknown key ({hint}allowed: {', '.join(fields)})")
    kwargs = {key: _build(hints[key], item, f"{prefix}{key}") for key, item in value.items()}
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}{name}: required key is missing")
    try:
        return cls(**kwargs)
    except ValueError as error:  # __post_init__ messages start with the field name
        raise ConfigError(f"{prefix}{error}") from None


def apply_override(data: dict, override: str) -> dict:
    """Set ``dotted.path=value`` in a raw (not yet validated) config dict, in place."""
    key_path, sep, text = override.partition("=")
    if not sep or not key_path:
        raise ConfigError(f"{override}: expected an override of the form dotted.key=value")
    try:
        value = load_yaml(text) if text.strip() else None
    except ConfigError as error:
        raise ConfigError(f"{key_path.strip()}: {error}") from None
    keys = key_path.strip().split(".")
    node: Any = data
    for depth, key in enumerate(keys):
        here = ".".join(keys[: depth + 1])
        last = depth == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"{here}: no item {key} in a list of {len(node)}")
            index = int(key)
            if last:
                node[index] = value
            else:
                node = node[index]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"{here}: cannot set a key inside {type(node).__name__} {node!r}")
        if last:
            node[key] = value
        else:
            if not isinstance(node.get(key), (dict, list)):
                node[key] = {}
            node = node[key]
    return data


def plain_copy(value: Any) -> Any:
    """Deep copy into plain dicts and lists (so overrides never touch the caller's data)."""
    if isinstance(value, Mapping):
        return {k: plain_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_copy(v) for v in value]
    return value
