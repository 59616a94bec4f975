"""How the trainers update the policy: one process, or data parallel with summed gradients.

Every rank's loss is its *share* of the step's loss (its tokens' sum divided by the step's
global token count), so the gradient of the whole step is the sum of the ranks' gradients.
The trainers only call ``start`` (a fresh optimizer and LR schedule per stage), ``backward``
per micro-batch, ``step`` per update, and ``save`` / ``load`` for checkpoints; the backends
differ in how gradients meet and where optimizer state lives.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from qwenlong.distributed.context import DistributedContext
from qwenlong.integrations.hf import lm_head_weight
from qwenlong.state.checkpoint import (
    commit_checkpoint,
    load_checkpoint,
    load_tensors,
    model_weights,
    prune_checkpoints,
    rng_state,
    set_rng_state,
    staging_dir,
    staging_path,
    write_checkpoint,
)
from qwenlong.state.optim import build_optimizer, build_scheduler


class TrainingBackend:
    """Plain PyTorch: a single process, or every rank holding the whole model and optimizer and a
    sum all-reduce of the gradients before the (identical) optimizer step on every rank."""

    def __init__(self, model: torch.nn.Module, ctx: DistributedContext | None = None):
        self.model = model
        self.ctx = ctx or DistributedContext()
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self.grad_clip = 1.0

    def start(self, *, lr: float, weight_decay: float, total_steps: int, warmup_steps: int, schedule: str,
              grad_clip: float) -> None:
        """A fresh optimizer and LR schedule: each stage (SFT, every RL phase) starts its own."""
        self.optimizer = build_optimizer(self.model, lr, weight_decay)
        self.scheduler = build_scheduler(self.optimizer, total_steps, warmup_steps, schedule)
        self.grad_clip = grad_clip

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        """All-reduce (sum) the gradients, clip, update, advance the schedule; returns the gradient norm."""
        if self.ctx.world_size > 1:
            _sum_gradients([p for p in self.model.parameters() if p.requires_grad])
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    @contextmanager
    def output_weight(self, model: torch.nn.Module) -> Iterator[torch.Tensor]:
        """The LM-head weight the fused losses multiply hidden states with, whole while the context is
        open: forward *and* backward of the losses go inside it."""
        yield lm_head_weight(model)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    # ------------------------------------------------------------------ whole weights

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The full model weights (on every rank)."""
        return self.model.state_dict()

    def main_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The full model weights on rank 0 (None on the others), for the checkpoint's ``model.pt``;
        every rank calls it."""
        return self.state_dict() if self.ctx.is_main else None

    def full_parameters(self) -> Iterable[tuple[str, torch.Tensor]]:
        """(name, full tensor) of every parameter, to sync a rollout engine that holds its own copy."""
        return self.model.named_parameters()

    def frozen_copy(self) -> torch.nn.Module:
        """A frozen copy of the current policy (the KL reference)."""
        return copy.deepcopy(self.model).eval().requires_grad_(False)

    # ------------------------------------------------------------------ checkpoints

    def _save_engine_state(self, folder: Path) -> None:
        """State that lives outside the model and ``trainer.pt`` (none for plain PyTorch)."""

    def _optimizer_state(self) -> dict[str, Any] | None:
        return self.optimizer.state_dict()

    def save(self, path: str | Path, state: dict[str, Any], keep: int = 0) -> Path:
        """Write a checkpoint atomically; every rank calls it. Rank 0 writes the shared files, each
        rank its own RNG state, then deletes all but the newest ``keep`` of the checkpoint's series
        (``prune_checkpoints``; 0 keeps all)."""
        path = Path(path)
        tmp = staging_dir(path) if self.ctx.is_main else staging_path(path)
        self.ctx.barrier()
        self._save_engine_state(tmp)
        model_state = self.main_state_dict()
        if self.ctx.world_size > 1:
            torch.save(rng_state(), tmp / f"rng-rank{self.ctx.rank}.pt")
        if self.ctx.is_main:
            write_checkpoint(tmp, model_state, self._optimizer_state(), self.scheduler.state_dict(), state)
        self.ctx.barrier()
        if self.ctx.is_main:
            commit_checkpoint(tmp, path)
            prune_checkpoints(path, keep)
        self.ctx.barrier()
        return path

    def _load_engine_state(self, path: Path) -> None:
        load_checkpoint(path, model=self.model, optimizer=self.optimizer, restore_rng=False)

    def load_weights(self, path: str | Path) -> None:
        """Only the weights of ``save``'s folder (its ``model.pt``), as a new stage starts from; every rank
        calls it."""
        self.model.load_state_dict(model_weights(path))

    def load(self, path: str | Path) -> dict[str, Any]:
        """Restore weights, optimizer, schedule and this rank's RNG from ``save``'s folder; returns its state."""
        path = Path(path)
        self._load_engine_state(path)
        state = load_checkpoint(path, model=None, scheduler=self.scheduler, restore_rng=self.ctx.world_size == 1)
        if self.ctx.world_size > 1:
            set_rng_state(load_tensors(path / f"rng-rank{self.ctx.rank}.pt"))
        return state


def _sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """Sum-all-reduce the gradients of ``params`` in one collective per dtype (one per parameter
    would pay the collective's latency hundreds of times per step)."""
    for p in params:
        if p.grad is None:  # a rank whose micro-batches never reached this parameter
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        for g, reduced in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(reduced.view_as(g))
