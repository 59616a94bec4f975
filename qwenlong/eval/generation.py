"""Generate functions for the evaluation: prompts in (the method's template, or a conversation's
messages, already fitted to the input budget), response texts out. One per way of running a model:

* :func:`hf_generate_fn`: an in-process HF model through the rollout engine (CPU or GPU);
* :func:`openai_generate_fn`: any OpenAI-compatible server (``vllm serve``, SGLang, an API),
  which applies the model's chat template itself.

:func:`sharded_generate_fn` splits each call over the ranks of a multi-process run.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from qwenlong.data import apply_chat_template
from qwenlong.data.prompt import chat_messages

Prompt = str | list[dict[str, str]]  # one user turn's text, or chat messages (qwenlong.eval.chat)
GenerateFn = Callable[[Sequence[Prompt]], list[str]]


@dataclass(frozen=True)
class Sampling:
    """The evaluation protocol's sampling (method.md section 5)."""

    max_new_tokens: int = 10_000
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int | None = 0


def hf_generate_fn(model: Any, tokenizer: Any, sampling: Sampling = Sampling(), max_batch_size: int = 8,
                   generation_attention: str | None = None, synced: bool = False) -> GenerateFn:
    """Generate with a HF causal LM through :class:`qwenlong.rollout.HFGenerateEngine`; ``synced``: every
    rank calls the function together (a ZeRO-3 partitioned model, see the engine)."""
    from qwenlong.rollout import HFGenerateEngine, SamplingParams

    # stop at the tokenizer's EOS and at the end of the chat turn (ChatML models)
    stops = {tokenizer.eos_token_id, tokenizer.get_vocab().get("<|im_end|>")}
    eos = sorted(t for t in stops if isinstance(t, int))
    engine = HFGenerateEngine(model, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                              max_batch_size=max_batch_size, generation_attention=generation_attention, synced=synced)
    params = SamplingParams(max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                            top_p=sampling.top_p, seed=sampling.seed)

    def generate(prompts: Sequence[Prompt]) -> list[str]:
        ids = [apply_chat_template(tokenizer, p, tokenize=True) for p in prompts]
        groups = engine.generate(ids, params)
        return [tokenizer.decode(group[0].token_ids, skip_special_tokens=True) for group in groups]

    return generate


def sharded_generate_fn(generate: GenerateFn, rank: int, world_size: int,
                        gather: Callable[[Any], list[Any]]) -> GenerateFn:
    """``generate`` with each call's prompts split over ``world_size`` ranks in consecutive blocks (rank r
    answers prompts ``len * r // world_size`` up to the next rank's first), and ``gather`` (every rank's object,
    in rank order) gives every rank all the answers in prompt order. Every rank calls it together, with the same
    prompts. Blocks, not every world_size-th prompt: an item's repeated samples sit side by side, so one rank
    answers them in one call (dealt out, ranks could get the same prompt list and, seeded alike, give an item the
    same answer k times)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank}")

    def generate_share(prompts: Sequence[Prompt]) -> list[str]:
        start, stop = len(prompts) * rank // world_size, len(prompts) * (rank + 1) // world_size
        shares = gather(generate(list(prompts[start:stop])))
        return [answer for share in shares for answer in share]

    return generate_share


def openai_generate_fn(base_url: str, model: str, *, api_key: str | None = None, sampling: Sampling = Sampling(),
                       max_concurrency: int = 16, timeout: float = 3600.0) -> GenerateFn:
    """Generate through an OpenAI-compatible ``/chat/completions`` endpoint (bounded concurrency)."""
    import httpx

    from qwenlong.rewards.judge import run_sync

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def one(client: httpx.AsyncClient, semaphore: asyncio.Semaphore, prompt: Prompt, repeat: int) -> str:
        body = {"model": model, "messages": chat_messages(prompt),
                "max_tokens": sampling.max_new_tokens, "temperature": sampling.temperature, "top_p": sampling.top_p}
        if sampling.seed is not None:  # the same seed would give a repeated prompt the same answer
            body["seed"] = sampling.seed + repeat
        async with semaphore:
            response = await client.post("/chat/completions", json=body)
        response.raise_for_status()
        message = response.json()["choices"][0]["message"]
        # servers with a reasoning parser split the thinking off; put it back where the reward expects it
        # (vLLM names it "reasoning"; older vLLM and other servers "reasoning_content")
        reasoning = message.get("reasoning") or message.get("reasoning_content")
        if reasoning:
            return f"<think>\n{reasoning}\n</think>\n\n{message.get('content') or ''}"
        return message.get("content") or ""

    async def batch(prompts: Sequence[Prompt]) -> list[str]:
        semaphore = asyncio.Semaphore(max_concurrency)
        async with httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout) as client:
            seen: Counter[str] = Counter()
            calls = []
            for p in prompts:  # each call learns how often its prompt came before (avg@k repeats prompts)
                key = p if isinstance(p, str) else json.dumps(p)
                calls.append(one(client, semaphore, p, seen[key]))
                seen[key] += 1
            return list(await asyncio.gather(*calls))

    return lambda prompts: run_sync(batch(prompts))
