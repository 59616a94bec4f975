"""A judge that runs a local HF causal LM in-process (greedy decoding = temperature 0).

One model serves one request at a time (a lock), in a daemon thread of its own so that a request
given up (the judge's deadline) never holds the caller: its generation is told to stop at the next
token. ``max_prompt_tokens`` refuses prompts longer than that before any work.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

from qwenlong.rewards.judge.base import Judge, JudgeError


def _stop_when(event: threading.Event) -> Any:
    """A transformers StoppingCriteria that ends generation once ``event`` is set."""
    import torch
    from transformers import StoppingCriteria

    class StopOnEvent(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device)

    return StopOnEvent()


class LocalHFJudge(Judge):
    def __init__(self, model: Any, tokenizer: Any, *, max_new_tokens: int = 512, max_prompt_tokens: int = 8192,
                 **judge_options: Any):
        super().__init__(**{"max_concurrency": 1, **judge_options})
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("tokenizer: the judge model's tokenizer needs a chat_template")
        if max_new_tokens < 1 or max_prompt_tokens < 1:
            raise ValueError(f"max_new_tokens and max_prompt_tokens: must be >= 1, got {max_new_tokens}, "
                             f"{max_prompt_tokens}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self._generate_lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, path: str, *, device: str = "cpu", dtype: str = "auto", **kwargs: Any) -> LocalHFJudge:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        return cls(model, tokenizer, **kwargs)

    def generate(self, messages: list[dict[str, str]], max_new_tokens: int | None = None,
                 stop: threading.Event | None = None) -> str:
        """The model's greedy reply to a chat (at most ``max_new_tokens``, capped by the judge's own);
        ``stop`` set ends generation at the next token. A prompt over ``max_prompt_tokens`` is a ValueError."""
        import torch

        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_tensors="pt", return_dict=True)
        if ids["input_ids"].shape[1] > self.max_prompt_tokens:
            raise ValueError(f"messages: the prompt has {ids['input_ids'].shape[1]} tokens, over max_prompt_tokens "
                             f"{self.max_prompt_tokens}")
        ids = {k: v.to(self.model.device) for k, v in ids.items()}
        new_tokens = min(max_new_tokens or self.max_new_tokens, self.max_new_tokens)
        extra = {"stopping_criteria": [_stop_when(stop)]} if stop is not None else {}
        pad = self.tokenizer.pad_token_id  # 0 is a token id like any other
        pad = self.tokenizer.eos_token_id if pad is None else pad
        with self._generate_lock, torch.no_grad():
            out = self.model.generate(**ids, do_sample=False, max_new_tokens=new_tokens, pad_token_id=pad, **extra)
        return self.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    async def _ask(self, session: Any, messages: list[dict[str, str]]) -> str:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[str] = loop.create_future()
        stop = threading.Event()

        def deliver(ok: bool, value: Any) -> None:
            if not done.done():
                done.set_result(value) if ok else done.set_exception(value)

        def target() -> None:
            try:
                outcome = (True, self.generate(messages, stop=stop))
            except Exception as e:  # a generation failure must not stop training
                outcome = (False, JudgeError("generate", f"{type(e).__name__}: {str(e)[:200]}"))
            with contextlib.suppress(RuntimeError):  # the caller's loop is gone: it gave up on this reply
                loop.call_soon_threadsafe(deliver, *outcome)

        threading.Thread(target=target, name="qwenlong-local-judge", daemon=True).start()
        try:
            return await done
        finally:
            stop.set()  # given up (deadline) or done: a running generation stops at its next token
