"""A judge that runs a local HF causal LM in-process (greedy decoding = temperature 0).

One model serves one request at a time (a lock), off the event loop in a worker thread.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from qwenlong.rewards.judge.base import Judge, JudgeError


class LocalHFJudge(Judge):
    def __init__(self, model: Any, tokenizer: Any, *, max_new_tokens: int = 512, cache_size: int = 65536):
        super().__init__(max_concurrency=1, cache_size=cache_size)
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("tokenizer: the judge model's tokenizer needs a chat_template")
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self._generate_lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, path: str, *, device: str = "cpu", dtype: str = "auto", **kwargs: Any) -> LocalHFJudge:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        return cls(model, tokenizer, **kwargs)

    def generate(self, messages: list[dict[str, str]], max_new_tokens: int | None = None) -> str:
        """The model's greedy reply to a chat."""
        import torch

        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_tensors="pt", return_dict=True)
        ids = {k: v.to(self.model.device) for k, v in ids.items()}
        with self._generate_lock, torch.no_grad():
            out = self.model.generate(**ids, do_sample=False, max_new_tokens=max_new_tokens or self.max_new_tokens,
                                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        return self.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    async def _ask(self, session: Any, messages: list[dict[str, str]]) -> str:
        try:
            return await asyncio.to_thread(self.generate, messages)
        except Exception as e:  # a generation failure must not stop training
            raise JudgeError("generate", repr(e)) from e
