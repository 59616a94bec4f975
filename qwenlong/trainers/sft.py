"""Warm-up SFT on packed batches: loss only on response tokens, through the fused kernel.

Per optimizer step, ``grad_accum_steps`` micro-batches per data-parallel rank (each packed to
``token_budget`` tokens per device, ``sp_size`` times that per sequence-parallel group)
contribute ``sum(CE over response tokens) / (response tokens in the step)``: a token-level mean
over the whole step, whatever the packing and however many ranks share it. Every rank knows the
whole step's schedule, so the global token count needs no communication; each rank's loss is its
share and the backend sums the gradients.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qwenlong.config import SFTConfig
from qwenlong.distributed.backend import TrainingBackend
from qwenlong.kernels import linear_cross_entropy
from qwenlong.state.checkpoint import latest_checkpoint
from qwenlong.trainers.metrics_log import MetricsLogger
from qwenlong.trainers.packed import (
    empty_batch,
    micro_batches,
    pack_sequences,
    policy_hidden,
    rank_share,
)


class SFTTrainer:
    """Trains ``model`` on (prompt ids, response ids) pairs.

    The micro-batch schedule is a pure function of (seed, epoch), so a resumed run replays
    exactly the batches an uninterrupted one would have seen.
    """

    def __init__(self, model: torch.nn.Module, examples: Sequence[tuple[list[int], list[int]]], cfg: SFTConfig,
                 *, output_dir: str | Path, seed: int = 0, logger: MetricsLogger | None = None,
                 save_every_steps: int = 0, keep_checkpoints: int = 0, backend: TrainingBackend | None = None):
        if not examples:
            raise ValueError("examples: SFT needs at least one (prompt, response) pair")
        if backend is None:
            backend = TrainingBackend(model)
        self.backend = backend
        self.ctx = self.backend.ctx
        self.token_budget = cfg.token_budget * self.ctx.sp_size  # an SP group packs its devices' budgets
        limit = min(self.token_budget, cfg.max_seq_len)
        too_long = [i for i, (p, r) in enumerate(examples) if len(p) + len(r) > limit]
        if too_long:
            raise ValueError(f"examples: {len(too_long)} sequences exceed min(token_budget * sp_size, max_seq_len)="
                             f"{limit} tokens (first: index {too_long[0]})")
        self.model, self.examples, self.cfg, self.seed = model, list(examples), cfg, seed
        self.output_dir = Path(output_dir)
        self.logger = logger or MetricsLogger(self.output_dir)
        self.save_every_steps, self.keep_checkpoints = save_every_steps, keep_checkpoints
        self.device = next(model.parameters()).device
        self._packed: list[list[int]] | None = None
        self.batches_per_step = cfg.grad_accum_steps * self.ctx.dp_size  # over all data-parallel ranks
        # an epoch's last step takes what is left of it (fewer micro-batches), so E epochs are E passes
        self.steps_per_epoch = math.ceil(len(self._epoch_micro_batches(0)) / self.batches_per_step)
        self.total_steps = (cfg.steps if cfg.steps is not None
                            else max(1, math.ceil(cfg.epochs * self.steps_per_epoch)))
        self.backend.start(lr=cfg.lr, weight_decay=cfg.weight_decay, total_steps=self.total_steps,
                           warmup_steps=cfg.warmup_steps, schedule=cfg.lr_schedule, grad_clip=cfg.grad_clip)
        self.step = 0

    def _epoch_micro_batches(self, epoch: int) -> list[list[int]]:
        """Micro-batches of ``epoch``, packed once per run and shuffled per epoch."""
        if self._packed is None:
            self._packed = micro_batches([len(p) + len(r) for p, r in self.examples], self.token_budget)
        batches = list(self._packed)
        random.Random(f"sft:{self.seed}:{epoch}").shuffle(batches)
        return batches

    def _step_micro_batches(self, step: int) -> list[list[int]]:
        """The step's micro-batches over all data-parallel ranks; rank r trains on ``[r::dp_size]``.

        Steps never straddle epochs: the last step of an epoch holds its remaining micro-batches (borrowing
        from the next epoch trained some examples once more than the others)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        start = index * self.batches_per_step
        return self._epoch_micro_batches(epoch)[start:start + self.batches_per_step]

    def _pack(self, indices: list[int]):
        pairs = [self.examples[i] for i in indices]
        return pack_sequences([p + r for p, r in pairs], [len(p) for p, _ in pairs]).to(self.device)

    def accumulate(self, step_batches: list[list[int]]) -> dict[str, float]:
        """Forward and backward of this rank's share of one step's micro-batches (gradients accumulate)."""
        num_targets = sum(len(self.examples[i][1]) for ids in step_batches for i in ids)  # the whole step's
        mine = rank_share(step_batches, self.ctx.dp_rank, self.ctx.dp_size, pad=list)
        total, tokens = torch.zeros((), device=self.device), 0  # the loss summed on the device: one sync per step
        with self.backend.output_weight(self.model) as weight:
            for ids in mine:
                batch = self._pack(ids) if ids else empty_batch().to(self.device)
                hidden, local = policy_hidden(self.model, batch, self.ctx.sp_group)
                loss = linear_cross_entropy(hidden, weight, local.targets, reduction="sum") / max(1, num_targets)
                self.backend.backward(loss)
                total += loss.detach()
                if ids and self.ctx.sp_rank == 0:  # the packed tokens once per group: no shard padding, no
                    tokens += batch.num_tokens         # placeholder batch of a rank without micro-batches
        return {"loss": float(total), "tokens": tokens, "target_tokens": num_targets}

    def train_step(self) -> dict[str, float]:
        """One optimizer step; returns its metrics (loss and tokens summed over ranks)."""
        self.model.train()
        metrics = self.accumulate(self._step_micro_batches(self.step))
        metrics.update(self.ctx.sum({"loss": metrics["loss"], "tokens": metrics["tokens"]}))
        lr = self.backend.lr  # the rate this update uses: after the step the schedule has moved on
        grad_norm = self.backend.step()
        self.step += 1
        return {"loss": metrics["loss"], "grad_norm": grad_norm, "lr": lr,
                "tokens": metrics["tokens"], "target_tokens": metrics["target_tokens"]}

    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    def save(self) -> Path:
        return self.backend.save(self.checkpoint_dir() / f"sft-step{self.step:06d}",
                                 state={"stage": "sft", "step": self.step}, keep=self.keep_checkpoints)

    def resume(self) -> bool:
        """Continue from the newest SFT checkpoint in the output folder, if any."""
        path = latest_checkpoint(self.checkpoint_dir(), prefix="sft-")
        if path is None:
            return False
        self.step = self.backend.load(path)["step"]
        return True

    def train(self) -> list[dict[str, float]]:
        history = []
        with tqdm(total=self.total_steps, initial=self.step, desc="sft", unit="step", dynamic_ncols=True,
                  disable=not self.ctx.is_main) as bar:
            while self.step < self.total_steps:
                metrics = self.train_step()
                history.append(metrics)
                if self.ctx.is_main:
                    self.logger.log("sft", self.step, metrics, flush=self.step == self.total_steps)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}")
                bar.update(1)
                if (self.save_every_steps and self.step % self.save_every_steps == 0) or self.step == self.total_steps:
                    if self.ctx.is_main:
                        self.logger.flush("sft")  # a checkpoint never holds steps the log lacks
                    self.save()
        return history
