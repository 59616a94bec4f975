"""Warm-up SFT on packed batches: loss only on response tokens, through the fused kernel.

Per optimizer step, ``grad_accum_steps`` micro-batches (each packed to ``token_budget``
tokens) contribute ``sum(CE over response tokens) / (response tokens in the step)``: a
token-level mean over the whole step, whatever the packing.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qwenlong.config import SFTConfig
from qwenlong.kernels import linear_cross_entropy
from qwenlong.trainers.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from qwenlong.trainers.metrics_log import MetricsLogger
from qwenlong.trainers.optim import build_optimizer, build_scheduler
from qwenlong.trainers.packed import forward_hidden, lm_head_weight, micro_batches, pack_sequences


class SFTTrainer:
    """Trains ``model`` on (prompt ids, response ids) pairs.

    The micro-batch schedule is a pure function of (seed, epoch), so a resumed run replays
    exactly the batches an uninterrupted one would have seen.
    """

    def __init__(self, model: torch.nn.Module, examples: Sequence[tuple[list[int], list[int]]], cfg: SFTConfig,
                 *, output_dir: str | Path, seed: int = 0, logger: MetricsLogger | None = None,
                 save_every_steps: int = 0):
        if not examples:
            raise ValueError("examples: SFT needs at least one (prompt, response) pair")
        too_long = [i for i, (p, r) in enumerate(examples) if len(p) + len(r) > min(cfg.token_budget, cfg.max_seq_len)]
        if too_long:
            raise ValueError(f"examples: {len(too_long)} sequences exceed min(token_budget, max_seq_len)="
                             f"{min(cfg.token_budget, cfg.max_seq_len)} tokens (first: index {too_long[0]})")
        self.model, self.examples, self.cfg, self.seed = model, list(examples), cfg, seed
        self.output_dir = Path(output_dir)
        self.logger = logger or MetricsLogger(self.output_dir)
        self.save_every_steps = save_every_steps
        self.device = next(model.parameters()).device
        self._packed: list[list[int]] | None = None
        per_epoch = math.ceil(len(self._epoch_micro_batches(0)) / cfg.grad_accum_steps)
        self.total_steps = cfg.steps if cfg.steps is not None else max(1, math.ceil(cfg.epochs * per_epoch))
        self.optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, cfg.warmup_steps, cfg.lr_schedule)
        self.step = 0

    def _epoch_micro_batches(self, epoch: int) -> list[list[int]]:
        """Micro-batches of ``epoch``, packed once per run and shuffled per epoch."""
        if self._packed is None:
            self._packed = micro_batches([len(p) + len(r) for p, r in self.examples], self.cfg.token_budget)
        batches = list(self._packed)
        random.Random(f"sft:{self.seed}:{epoch}").shuffle(batches)
        return batches

    def _step_micro_batches(self, step: int) -> list[list[int]]:
        accum = self.cfg.grad_accum_steps
        per_epoch = len(self._epoch_micro_batches(0))
        epochs = {k: divmod(k, per_epoch) for k in range(step * accum, (step + 1) * accum)}
        orders = {epoch: self._epoch_micro_batches(epoch) for epoch, _ in epochs.values()}
        return [orders[epoch][index] for epoch, index in epochs.values()]

    def _pack(self, indices: list[int]):
        pairs = [self.examples[i] for i in indices]
        return pack_sequences([p + r for p, r in pairs], [len(p) for p, _ in pairs]).to(self.device)

    def train_step(self) -> dict[str, float]:
        """One optimizer step; returns its metrics."""
        self.model.train()
        batches = [self._pack(ids) for ids in self._step_micro_batches(self.step)]
        num_targets = sum(int(b.mask.sum()) for b in batches)
        weight = lm_head_weight(self.model)
        total = 0.0
        for batch in batches:
            hidden = forward_hidden(self.model, batch)
            loss = linear_cross_entropy(hidden, weight, batch.targets, reduction="sum") / max(1, num_targets)
            loss.backward()
            total += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"loss": total, "grad_norm": float(grad_norm), "lr": self.scheduler.get_last_lr()[0],
                "tokens": sum(b.num_tokens for b in batches), "target_tokens": num_targets}

    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    def save(self) -> Path:
        return save_checkpoint(self.checkpoint_dir() / f"sft-step{self.step:06d}", model=self.model,
                               optimizer=self.optimizer, scheduler=self.scheduler,
                               state={"stage": "sft", "step": self.step})

    def resume(self) -> bool:
        """Continue from the newest SFT checkpoint in the output folder, if any."""
        path = latest_checkpoint(self.checkpoint_dir(), prefix="sft-")
        if path is None:
            return False
        state = load_checkpoint(path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)
        self.step = state["step"]
        return True

    def train(self) -> list[dict[str, float]]:
        history = []
        with tqdm(total=self.total_steps, initial=self.step, desc="sft", unit="step", dynamic_ncols=True) as bar:
            while self.step < self.total_steps:
                metrics = self.train_step()
                history.append(metrics)
                self.logger.log("sft", self.step, metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}")
                bar.update(1)
                if self.save_every_steps and self.step % self.save_every_steps == 0:
                    self.save()
        self.save()
        return history
