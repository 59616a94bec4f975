"""Rollouts with Hugging Face ``generate``: the default engine, works on CPU.

Prompts are left-padded into batches (position ids follow the attention mask, so a padded
prompt is generated exactly like an unpadded one). Each sampled token's log-prob,
``log_softmax(logits / temperature)`` of the raw logits it was sampled from (the quantity the
trainer computes with a teacher-forced forward pass), is taken one decoding step at a time by
:class:`SampledTokenLogprobs`: only the chosen token's value is kept, never the
``[rows, new_tokens, vocab]`` logits (at a 152K vocabulary and 10K new tokens that would be
~6 GB per sequence).

``temperature=0`` decodes greedily; the log-probs are then those of the untempered
distribution (temperature 1).

Sampling follows temperature and top-p only: the checkpoint's own generation defaults
(a repetition penalty or top-k shipped in ``generation_config.json``) would move the sampling
distribution away from the one the trainer's log-probs describe, so they are set aside while
generating.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from qwenlong.rollout.engine import Completion, OnComplete, RolloutEngine, SamplingParams


class SampledTokenLogprobs(LogitsProcessor):
    """Records ``log_softmax(raw_logits / temperature)`` at each sampled token, one step at a time.

    A logits processor sees step k's raw logits (generate puts caller processors before its
    temperature and top-p warpers) and, in ``input_ids``, the tokens chosen at steps < k. So it
    keeps step k's log-probabilities until step k+1 reveals the token drawn from them, and keeps
    only that token's value: memory is one ``[rows, vocab]`` step, not the whole generation.
    The scores pass through unchanged.
    """

    def __init__(self, prompt_width: int, temperature: float) -> None:
        self.prompt_width = prompt_width
        self.temperature = temperature
        self.steps: list[torch.Tensor] = []  # [rows] log-prob of the token sampled at each step
        self.pending: torch.Tensor | None = None  # [rows, vocab] of the step whose token is not known yet

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] != self.prompt_width + len(self.steps) + (self.pending is not None):
            raise RuntimeError("SampledTokenLogprobs: generate skipped or repeated a step; use a fresh processor")
        if self.pending is not None:
            self.steps.append(self.pending.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.pending = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def token_logprobs(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """``[rows, new]`` log-probs of ``new_tokens`` (the generated part of the sequences)."""
        steps = self.steps[: new_tokens.shape[1]]
        if len(steps) < new_tokens.shape[1]:  # the last token was never fed back
            last = new_tokens[:, len(steps) : len(steps) + 1].to(self.pending.device)
            steps = [*steps, self.pending.gather(-1, last).squeeze(-1)]
        return torch.stack(steps, dim=1)


class HFGenerateEngine(RolloutEngine):
    """Rollout engine around a ``transformers`` causal LM (``model.generate``).

    Args:
        model: the policy (or a copy of it). When it *is* the trained module, weight updates
            are already visible and ``update_weights`` need not be called.
        eos_token_id: end-of-sequence token id(s).
        pad_token_id: id used for left padding (defaults to the first EOS id); never attended.
        max_batch_size: most sequences (prompts x n) generated at once.
        generation_attention: attention implementation to generate with (e.g. ``"sdpa"``, whose
            KV-cache decode path is fast on CPU), restored afterwards; None keeps the model's own.
            Training keeps its packed-sequence attention either way.
        synced: every rank of the default process group calls ``generate`` together (each with its
            own prompts, possibly none) on a model whose forward needs all ranks, e.g. ZeRO-3
            partitioned weights that each layer gathers from every rank. Ranks then run the same
            number of ``model.generate`` calls (one with fewer batches decodes a one-token
            placeholder for the missing ones) and each keeps stepping until all are done
            (``synced_gpus``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        eos_token_id: int | Sequence[int],
        pad_token_id: int | None = None,
        max_batch_size: int = 64,
        generation_attention: str | None = None,
        synced: bool = False,
    ) -> None:
        self.model = model
        self.synced = synced
        self.generation_attention = generation_attention
        self.eos_token_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        if not self.eos_token_ids:
            raise ValueError("eos_token_id: give at least one end-of-sequence id")
        self.pad_token_id = self.eos_token_ids[0] if pad_token_id is None else pad_token_id
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size: expected >= 1, got {max_batch_size}")
        self.max_batch_size = max_batch_size

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 on_complete: OnComplete | None = None) -> list[list[Completion]]:
        if any(len(prompt) == 0 for prompt in prompts):
            raise ValueError("prompts: every prompt needs at least one token")
        self._check_vocabulary(prompts)
        # prompt i's samples are rows i*n .. i*n+n-1
        rows = [list(prompt) for prompt in prompts for _ in range(params.n)]
        was_training, own_defaults = self.model.training, self.model.generation_config
        own_attention = self.model.config._attn_implementation
        self.model.eval()
        self.model.generation_config = GenerationConfig()
        if self.generation_attention is not None:
            self.model.set_attn_implementation(self.generation_attention)
        try:
            # a seeded call leaves every generator it reseeds as it was: the CPU's and, as manual_seed reseeds them
            # all, every GPU's (sampling runs on the LM head's, not necessarily the first parameter's); an unseeded
            # call draws from them and moves them on (restored, the next unseeded call would repeat it)
            cuda = range(torch.cuda.device_count()) if torch.cuda.is_available() else []
            with torch.random.fork_rng(devices=cuda, enabled=params.seed is not None):
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                missing = self._missing_batches(-(-len(rows) // self.max_batch_size))
                completions: list[Completion] = []
                for start in range(0, len(rows), self.max_batch_size):
                    done_before = len(completions) // params.n
                    completions += self._generate_batch(rows[start : start + self.max_batch_size], params)
                    if on_complete is not None:  # the groups this batch completed
                        for i in range(done_before, len(completions) // params.n):
                            on_complete(i, completions[i * params.n : (i + 1) * params.n])
                for _ in range(missing):
                    self._generate_batch([[self.pad_token_id]], params)  # lockstep only; after ours, so RNG-neutral
        finally:
            self.model.train(was_training)
            self.model.generation_config = own_defaults
            if self.generation_attention is not None:
                self.model.set_attn_implementation(own_attention)
        return [completions[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]

    def _check_vocabulary(self, prompts: Sequence[Sequence[int]]) -> None:
        """Refuses a token id outside the embedding table: the lookup would fail without naming the prompt (on a
        GPU as a device-side assert that leaves the CUDA context unusable)."""
        embeddings = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        vocab = getattr(embeddings, "num_embeddings", None)
        if vocab is None:
            return
        for i, prompt in enumerate(prompts):
            low, high = min(prompt), max(prompt)
            if low < 0 or high >= vocab:
                raise ValueError(f"prompts: prompt {i} has token id {low if low < 0 else high}, outside the model's "
                                 f"vocabulary of {vocab}")

    def _missing_batches(self, count: int) -> int:
        """How many fewer batches than the busiest rank this rank has (0 unless ``synced``)."""
        if not self.synced:
            return 0
        most = torch.tensor(count, device=next(self.model.parameters()).device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        return int(most) - count

    def _generate_batch(self, rows: list[list[int]], params: SamplingParams) -> list[Completion]:
        device = next(self.model.parameters()).device
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row) :] = torch.tensor(row)
            attention_mask[i, width - len(row) :] = 1
        stop_ids = self.eos_token_ids + [t for t in params.stop_token_ids if t not in self.eos_token_ids]
        greedy = params.temperature == 0
        recorder = SampledTokenLogprobs(width, 1.0 if greedy else params.temperature)
        sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": params.temperature,
                                                        "top_p": params.top_p, "top_k": 0}
        sequences = self.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            **sampling,
            max_new_tokens=params.max_new_tokens,
            eos_token_id=stop_ids,
            pad_token_id=self.pad_token_id,
            logits_processor=LogitsProcessorList([recorder]),
            synced_gpus=self.synced,
        )
        new_tokens = sequences[:, width:]
        token_logprobs = recorder.token_logprobs(new_tokens).cpu()
        new_tokens = new_tokens.cpu()
        completions = []
        for tokens, token_lp in zip(new_tokens.tolist(), token_logprobs.tolist(), strict=True):
            stop_at = next((t for t, token in enumerate(tokens) if token in stop_ids), None)
            end = len(tokens) if stop_at is None else stop_at + 1
            reason = "length" if stop_at is None else "stop"
            completions.append(Completion(tokens[:end], token_lp[:end], reason))
        return completions

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        # every name of a shared tensor (a tied LM head is ``lm_head.weight`` in a state dict too)
        targets = dict(self.model.named_parameters(remove_duplicate=False))
        targets.update(self.model.named_buffers(remove_duplicate=False))
        for name, tensor in named_tensors:
            if name not in targets:
                raise ValueError(f"named_tensors: the model has no parameter or buffer {name!r}")
            if targets[name].shape != tensor.shape:
                raise ValueError(
                    f"named_tensors: {name!r} has shape {tuple(tensor.shape)}, expected {tuple(targets[name].shape)}"
                )
            targets[name].copy_(tensor)
