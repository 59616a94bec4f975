"""The shapes the planner needs from a model: layers, widths, heads, vocabulary, experts.

A model comes from the run's ``model`` section: a ``tiny`` config, a local HF folder (its
``config.json``), or one of the published architectures below, looked up by hub id. Weights are
never downloaded: the planner must answer before anyone has the checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qwenlong.config import ConfigError
from qwenlong.config.schema import ModelConfig


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer (Qwen2/Qwen3/Llama family), dense or mixture-of-experts.

    ``experts`` = 0: a dense SwiGLU MLP of width ``intermediate``; otherwise every layer routes
    each token to ``experts_per_token`` of ``experts`` SwiGLU experts of width ``expert_intermediate``.
    """

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tie_embeddings: bool = False
    qkv_bias: bool = False
    experts: int = 0
    experts_per_token: int = 0
    expert_intermediate: int = 0

    def __post_init__(self) -> None:
        for key in ("layers", "hidden", "heads", "kv_heads", "head_dim", "vocab"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1 for model {self.name}, got {getattr(self, key)}")
        if self.heads % self.kv_heads:
            raise ValueError(f"kv_heads: {self.kv_heads} must divide heads ({self.heads}) for model {self.name}")
        if self.experts and not 0 < self.experts_per_token <= self.experts:
            raise ValueError(f"experts_per_token: must be in [1, {self.experts}], got {self.experts_per_token}")

    @property
    def moe(self) -> bool:
        return self.experts > 0

    @property
    def attention_params(self) -> int:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        bias = q + 2 * kv if self.qkv_bias else 0
        return self.hidden * (q + 2 * kv) + q * self.hidden + bias

    @property
    def mlp_params(self) -> int:
        if self.moe:
            return self.experts * 3 * self.hidden * self.expert_intermediate + self.hidden * self.experts
        return 3 * self.hidden * self.intermediate

    @property
    def layer_params(self) -> int:
        return self.attention_params + self.mlp_params + 2 * self.hidden  # two RMSNorm weights

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        head = 0 if self.tie_embeddings else self.embedding_params
        return self.layers * self.layer_params + self.embedding_params + head + self.hidden

    @property
    def active_params(self) -> int:
        """Parameters one token's forward multiplies with (the routed experts only), LM head included."""
        if not self.moe:
            return self.params - (0 if self.tie_embeddings else self.embedding_params)  # lookups cost nothing
        routed = self.experts_per_token * 3 * self.hidden * self.expert_intermediate + self.hidden * self.experts
        return self.layers * (self.attention_params + routed + 2 * self.hidden) + self.embedding_params

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """K and V of every layer for one token, whole model."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


def _shape(name: str, c: dict) -> ModelShape:
    heads = c["num_attention_heads"]
    return ModelShape(
        name=name, layers=c["num_hidden_layers"], hidden=c["hidden_size"], intermediate=c.get("intermediate_size", 0),
        heads=heads, kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // heads, vocab=c["vocab_size"],
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        qkv_bias=bool(c.get("attention_bias", c.get("model_type") == "qwen2")),
        experts=c.get("num_experts", 0) or 0, experts_per_token=c.get("num_experts_per_tok", 0) or 0,
        expert_intermediate=c.get("moe_intermediate_size", 0) or 0,
    )


# The published config.json numbers of the architectures the presets and the validation table use.
_QWEN25_32B = {"model_type": "qwen2", "num_hidden_layers": 64, "hidden_size": 5120, "intermediate_size": 27648,
               "num_attention_heads": 40, "num_key_value_heads": 8, "vocab_size": 152064,
               "tie_word_embeddings": False}
_QWEN25_7B = {"model_type": "qwen2", "num_hidden_layers": 28, "hidden_size": 3584, "intermediate_size": 18944,
              "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False}
_QWEN3_30B_A3B = {"model_type": "qwen3_moe", "num_hidden_layers": 48, "hidden_size": 2048, "intermediate_size": 6144,
                  "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936,
                  "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
                  "tie_word_embeddings": False, "attention_bias": False}
_QWEN3_8B = {"model_type": "qwen3", "num_hidden_layers": 36, "hidden_size": 4096, "intermediate_size": 12288,
             "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
             "tie_word_embeddings": False, "attention_bias": False}
_LLAMA31_8B = {"model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 14336,
               "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
               "tie_word_embeddings": False, "attention_bias": False}
KNOWN_MODELS: dict[str, dict] = {
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B": _QWEN25_32B,
    "Qwen/Qwen2.5-32B": _QWEN25_32B,
    "Qwen/Qwen2.5-32B-Instruct": _QWEN25_32B,
    "Tongyi-Zhiwen/QwenLong-L1-32B": _QWEN25_32B,
    "Qwen/Qwen2.5-7B": _QWEN25_7B,
    "Qwen/Qwen2.5-7B-Instruct": _QWEN25_7B,
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": _QWEN25_7B,
    "Qwen/Qwen3-30B-A3B": _QWEN3_30B_A3B,
    "Qwen/Qwen3-30B-A3B-Thinking-2507": _QWEN3_30B_A3B,
    "Qwen/Qwen3-30B-A3B-Instruct-2507": _QWEN3_30B_A3B,
    "Qwen/Qwen3-8B": _QWEN3_8B,
    "Qwen/Qwen3-8B-Base": _QWEN3_8B,
    "meta-llama/Llama-3.1-8B": _LLAMA31_8B,
    "meta-llama/Llama-3.1-8B-Instruct": _LLAMA31_8B,
}


def known_model(name: str) -> ModelShape:
    """A published architecture by hub id (case-insensitive)."""
    for key, config in KNOWN_MODELS.items():
        if key.lower() == name.lower():
            return _shape(key, config)
    raise ConfigError(f"model.name: {name!r} is neither a local folder with a config.json nor a known architecture "
                      f"({', '.join(sorted(KNOWN_MODELS))}); point model.name at a folder holding its config.json")


# what a config.json must give (sizes >= 1) and may give (sizes, absent or null: the defaults of ``_shape``)
_REQUIRED_SIZES = ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size")
_OPTIONAL_SIZES = ("intermediate_size", "num_key_value_heads", "head_dim", "num_experts", "num_experts_per_tok",
                   "moe_intermediate_size")


def local_model(path: Path) -> ModelShape:
    """The shape in a local folder's ``config.json`` (its ``text_config`` for a multimodal model). A file the
    planner cannot read a shape from (not JSON, a size missing or not a whole number, sizes that do not fit
    together) is a ``ConfigError`` naming ``model.name`` and the file, not a traceback: it is the user's to fix."""
    where = f"model.name: {path}"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ConfigError(f"{where} is not a readable JSON file ({error})") from None
    if isinstance(config, dict) and isinstance(config.get("text_config"), dict):
        config = config["text_config"]
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: expected a JSON object of the model's sizes, got {type(config).__name__}")
    for key in _REQUIRED_SIZES + _OPTIONAL_SIZES:
        value = config.get(key)
        if value is None and key in _OPTIONAL_SIZES:
            continue
        if value is None:
            raise ConfigError(f"{where} has no {key} (the planner needs {', '.join(_REQUIRED_SIZES)})")
        if type(value) is not int or (value < 1 and key in _REQUIRED_SIZES) or value < 0:
            raise ConfigError(f"{where}: {key} must be a whole number{' >= 1' if key in _REQUIRED_SIZES else ''}, "
                              f"got {value!r}")
    try:
        return _shape(str(path.parent), config)
    except ValueError as error:  # ModelShape's checks: sizes that do not fit together
        raise ConfigError(f"{where}: {error}") from None


def model_shape(cfg: ModelConfig) -> ModelShape:
    """The shape of the run's policy: its tiny config, a local ``config.json``, or a known hub id."""
    if cfg.tiny is not None:
        t = cfg.tiny
        return ModelShape(name="tiny", layers=t.num_hidden_layers, hidden=t.hidden_size,
                          intermediate=t.intermediate_size, heads=t.num_attention_heads,
                          kv_heads=t.num_key_value_heads, head_dim=t.hidden_size // t.num_attention_heads,
                          vocab=t.vocab_size, tie_embeddings=t.tie_word_embeddings, qkv_bias=True)
    path = Path(cfg.name) / "config.json"
    if path.is_file():
        return local_model(path)
    return known_model(cfg.name)
