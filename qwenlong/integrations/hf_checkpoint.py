"""A released checkpoint's tensors versus the model's own parameters (transformers 5 conversion mappings).

transformers 5 builds some models with parameters that their released checkpoints do not hold as such:
a Mixture-of-Experts layer of the ``qwen2_moe`` family (``qwen3_moe``: Qwen3-30B-A3B, ...) has one
``mlp.experts.gate_up_proj`` ``[E, 2I, H]`` and one ``mlp.experts.down_proj`` ``[E, H, I]`` per layer, where
the checkpoint stores ``mlp.experts.{e}.gate_proj.weight`` / ``up_proj.weight`` / ``down_proj.weight`` per
expert. ``from_pretrained`` converts while loading (its checkpoint conversion mapping: stack the experts,
then concatenate gate and up) and ``save_pretrained`` converts back (``revert_weight_conversion``).

We read and write checkpoints one tensor at a time (ZeRO-3 loading, merging, export, the vLLM weight sync),
so this module applies transformers' own conversions per parameter:

- :class:`ModelWeights`: a checkpoint's tensors under the model's parameter names; a fused parameter is
  built from its per-expert tensors alone when it is read, by the mapping's own ``WeightConverter``;
- :meth:`CheckpointFormat.released` (and ``released_parameters``, ``released_weights``): a parameter (a
  stream of them, a mapping of them) as the released checkpoint's tensors, by transformers'
  ``revert_weight_conversion`` on that parameter alone.

Only the conversions of expert fusing (``MergeModulelist`` and ``Concatenate`` into one target, the
``qwen2_moe`` family's) are applied; a model whose mapping holds anything else (renamings, splits, rope
permutations, ...) raises ``NotImplementedError`` naming its model type. A folder in the model's own
(fused) format reads as it is: its names match no conversion.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

# the operations of expert fusing, by transformers' class names
SUPPORTED_OPERATIONS = ("MergeModulelist", "Concatenate")


def model_skeleton(config: Any) -> torch.nn.Module:
    """The causal LM of ``config`` on the meta device (no memory, no initialisation): its parameter names,
    shapes and ties, and the conversions transformers applies to its checkpoints."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        # eager: a name every transformers build knows (a run may have trained with its own attention)
        return AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager")


def checkpoint_conversions(skeleton: torch.nn.Module) -> list[Any]:
    """transformers' conversions from the released checkpoint of ``skeleton``'s model to its parameters (the
    ``WeightConverter`` list ``save_pretrained`` reverts); empty for a model without any, or under
    transformers 4. Raises NotImplementedError for a conversion other than expert fusing."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter
    except ImportError:  # transformers 4: checkpoints hold the parameters as they are
        return []
    # without the legacy renamings (LayerNorm.gamma, ...), as save_pretrained reverts the mapping
    conversions = get_model_conversion_mapping(skeleton, add_legacy=False)
    model_type = getattr(skeleton.config, "model_type", type(skeleton).__name__)
    for conversion in conversions:
        operations = [type(op).__name__ for op in getattr(conversion, "operations", [])]
        if (type(conversion) is not WeightConverter or len(conversion.target_patterns) != 1
                or not set(operations) <= set(SUPPORTED_OPERATIONS)):
            raise NotImplementedError(
                f"model type {model_type!r}: transformers converts its checkpoints with {conversion!r} "
                f"(operations {operations or 'none'}), which qwenlong's one-parameter-at-a-time checkpoint reading "
                "and writing (ZeRO-3 loading, merging, export, the vLLM weight sync) does not apply: it applies "
                f"expert fusing only ({', '.join(SUPPORTED_OPERATIONS)} into one parameter)")
    return conversions


class ModelWeights:
    """The tensors of a checkpoint (``keys``, read one at a time by ``shape(key)`` and ``read(key)``) under the
    names of the model's parameters, converted by ``conversions`` (:func:`checkpoint_conversions`).

    A name that no conversion produces is the checkpoint key itself. A converted name is built when it is read
    from its own checkpoint tensors only, in transformers' order (``dot_natural_key``: expert 2 before 10);
    its shape comes from the same conversion run on meta tensors, so checking shapes reads nothing."""

    def __init__(self, keys: Iterable[str], shape: Callable[[str], tuple[int, ...]],
                 read: Callable[[str], torch.Tensor], conversions: list[Any]) -> None:
        self._shape, self._read = shape, read
        # model name -> (its converter or None, [(source pattern, checkpoint key), ...])
        self._sources: dict[str, tuple[Any, list[tuple[str | None, str]]]] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        if not conversions:
            self._sources = {key: (None, [(None, key)]) for key in keys}
            return
        from transformers.core_model_loading import dot_natural_key, rename_source_key

        by_pattern = {pattern: converter for converter in conversions for pattern in converter.source_patterns}
        for key in sorted(keys, key=dot_natural_key):
            name, pattern = rename_source_key(key, [], conversions)
            converter = None if pattern is None else by_pattern[pattern]
            known = self._sources.setdefault(name, (converter, []))
            if known[0] is not converter:
                raise ValueError(f"checkpoint: {name} is both stored as it is and built from per-expert tensors "
                                 f"(e.g. {key}); the checkpoint mixes two formats")
            known[1].append((pattern, key))

    def names(self) -> list[str]:
        """Every model name the checkpoint holds."""
        return list(self._sources)

    def __contains__(self, name: str) -> bool:
        return name in self._sources

    def shape(self, name: str) -> tuple[int, ...]:
        """The whole shape of ``name``; KeyError when the checkpoint lacks it, ValueError when its per-expert
        tensors do not fit together."""
        converter, sources = self._sources[name]
        if converter is None:
            return tuple(self._shape(sources[0][1]))
        if name not in self._shapes:
            meta = self._convert(name, lambda key: torch.empty(self._shape(key), device="meta"))
            self._shapes[name] = tuple(meta.shape)
        return self._shapes[name]

    def read(self, name: str) -> torch.Tensor:
        """``name`` whole, in the checkpoint's dtype (a fused one from its per-expert tensors alone)."""
        converter, sources = self._sources[name]
        if converter is None:
            return self._read(sources[0][1])
        return self._convert(name, self._read)

    def _convert(self, name: str, load: Callable[[str], torch.Tensor]) -> torch.Tensor:
        converter, sources = self._sources[name]
        job = copy.deepcopy(converter)  # collects this parameter's tensors only
        for pattern, key in sources:
            job.add_tensor(name, key, pattern, functools.partial(load, key))  # read when the conversion runs
        try:
            converted = job.convert(name)
        except (RuntimeError, ValueError) as error:
            raise ValueError(f"checkpoint: {name} cannot be built from its {len(sources)} tensors "
                             f"({sources[0][1]}, ...): {error}") from None
        if list(converted) != [name]:
            raise ValueError(f"checkpoint: converting the tensors of {name} gave {sorted(converted)}")
        tensor = converted[name]
        return tensor[0] if isinstance(tensor, list) else tensor


class CheckpointFormat:
    """The conversions between the parameters of ``config``'s causal LM and its released checkpoint (none for a
    ``config`` of None, or a model that transformers loads as it is stored)."""

    def __init__(self, config: Any | None) -> None:
        self.skeleton = None if config is None else model_skeleton(config)
        self.conversions = [] if self.skeleton is None else checkpoint_conversions(self.skeleton)

    @classmethod
    def of_folder(cls, folder: str | Path) -> CheckpointFormat:
        """The format of the checkpoint in ``folder``, whose ``config.json`` names the model; without a config,
        none (the checkpoint's names are taken as they are)."""
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            return cls(None)
        from transformers import AutoConfig

        return cls(AutoConfig.from_pretrained(folder))

    def model_weights(self, keys: Iterable[str], shape: Callable[[str], tuple[int, ...]],
                      read: Callable[[str], torch.Tensor]) -> ModelWeights:
        """A checkpoint's tensors (read one at a time by ``shape(key)`` / ``read(key)``) by parameter name."""
        return ModelWeights(keys, shape, read, self.conversions)

    def released(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """The released checkpoint's tensors of the parameter ``name`` (for a fused expert parameter one per
        expert, in order; otherwise ``{name: tensor}``), by transformers' ``revert_weight_conversion`` (what
        ``save_pretrained`` writes) on this parameter alone. A meta ``tensor`` gives meta tensors: the names
        and shapes, for free."""
        if not self.conversions:
            return {name: tensor}
        from transformers.core_model_loading import revert_weight_conversion

        return revert_weight_conversion(self.skeleton, {name: tensor})

    def released_parameters(self, named_tensors: Iterable[tuple[str, torch.Tensor]]
                            ) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) of parameters as the released checkpoint's tensors, consuming the input lazily (one
        parameter converted at a time)."""
        for name, tensor in named_tensors:
            yield from self.released(name, tensor).items()

    def released_weights(self, weights: Mapping[str, torch.Tensor], names: list[str]) -> ReleasedWeights:
        """``names`` of ``weights`` as the released checkpoint's tensors, converted as they are read."""
        return ReleasedWeights(weights, names, self)


class ReleasedWeights(Mapping):
    """``weights`` (model parameter names, ``names`` of them, in order) seen as the released checkpoint's tensors:
    each is converted when asked for, and the last parameter's tensors are kept until another is asked for, so
    reading them in order converts each parameter once and holds one at a time. ``layouts`` holds their names,
    shapes and dtypes as meta tensors (nothing read)."""

    def __init__(self, weights: Mapping[str, torch.Tensor], names: list[str], checkpoint_format: CheckpointFormat
                 ) -> None:
        self._weights, self._format = weights, checkpoint_format
        self.layouts: dict[str, torch.Tensor] = {}
        self._owner: dict[str, str] = {}
        for name in names:
            tensor = weights[name]
            meta = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
            for released, layout in checkpoint_format.released(name, meta).items():
                if released in self._owner:
                    raise ValueError(f"weights: {name} and {self._owner[released]} both give {released}")
                self.layouts[released], self._owner[released] = layout, name
        self._cached: tuple[str | None, dict[str, torch.Tensor]] = (None, {})

    def __getitem__(self, released: str) -> torch.Tensor:
        owner = self._owner[released]
        if self._cached[0] != owner:
            self._cached = (None, {})  # free the previous parameter's tensors first
            self._cached = (owner, self._format.released(owner, self._weights[owner]))
        return self._cached[1][released]

    def __iter__(self) -> Iterator[str]:
        return iter(self.layouts)

    def __len__(self) -> int:
        return len(self.layouts)
