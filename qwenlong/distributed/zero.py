"""DeepSpeed ZeRO stages 1-3 (optionally offloading optimizer state / parameters to CPU) behind
the ``TrainingBackend`` interface.

The trainers own gradient accumulation (their micro-batch count varies per step), so the engine
runs with ``managed_gradient_accumulation: false``: ``backward`` only accumulates and ``step``
reduces, clips and updates. The optimizer is our own AdamW (``build_optimizer``), the one the plain
backend uses, so both give the same updates; DeepSpeed's fused and CPU Adam need C++/CUDA builds.
DeepSpeed averages gradients over ranks while each rank's loss is its share of the global
loss, so ``backward`` scales the loss by the world size to turn that mean into the sum.

One engine wraps the model for the whole run (DeepSpeed cannot wrap a module twice); a new
stage (SFT, each RL phase) clears the Adam moments and step counts and installs a new schedule,
which is what a fresh optimizer would start from.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from qwenlong.config.schema import DistributedConfig
from qwenlong.distributed.backend import TrainingBackend
from qwenlong.distributed.context import DistributedContext
from qwenlong.integrations.hf import lm_head_weight
from qwenlong.trainers.optim import build_optimizer, build_scheduler

CHECKPOINT_TAG = "deepspeed"  # the sub-folder of our checkpoint folder that DeepSpeed writes


def deepspeed_config(cfg: DistributedConfig, grad_clip: float, bf16: bool) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": cfg.deepspeed_stage}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": grad_clip,
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch AdamW
        "zero_force_ds_cpu_optimizer": False,  # ... also with CPU offload (DeepSpeedCPUAdam needs its C++ build)
        "steps_per_print": 2**31 - 1,
    }


def import_deepspeed():
    """Import DeepSpeed, on CPU-only machines with its CPU accelerator and without the shared-memory
    all-reduce op (used only by DeepSpeed inference; building it takes minutes on a small machine)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops

    if not torch.cuda.is_available():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


class DeepSpeedBackend(TrainingBackend):
    """ZeRO partitions optimizer state (1), gradients (2) and parameters (3) over all ranks; DeepSpeed
    reduces the gradients, clips by the global norm and updates; checkpoints add DeepSpeed's own folder."""

    def __init__(self, model: torch.nn.Module, ctx: DistributedContext, cfg: DistributedConfig):
        super().__init__(model, ctx)
        if cfg.deepspeed_stage not in (1, 2, 3):
            raise ValueError(f"distributed.deepspeed_stage: expected 1, 2 or 3, got {cfg.deepspeed_stage}")
        if cfg.deepspeed_stage == 3 and lm_head_weight(model) is model.get_input_embeddings().weight:
            # the embedding layer's hooks would re-partition the weight the fused losses hold gathered
            raise ValueError("distributed.deepspeed_stage: ZeRO-3 needs an LM head that is not tied to the input "
                             "embeddings (for the tiny model: model.tiny.tie_word_embeddings=false)")
        self.cfg = cfg
        self.deepspeed = import_deepspeed()
        self.deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
        self.engine = None

    @property
    def zero3(self) -> bool:
        return self.cfg.deepspeed_stage == 3

    def start(self, *, lr: float, weight_decay: float, total_steps: int, warmup_steps: int, schedule: str,
              grad_clip: float) -> None:
        if self.engine is None:
            self.optimizer = build_optimizer(self.model, lr, weight_decay)
            bf16 = next(self.model.parameters()).dtype == torch.bfloat16
            self.engine, *_ = self.deepspeed.initialize(model=self.model, optimizer=self.optimizer,
                                                        config=deepspeed_config(self.cfg, grad_clip, bf16))
        else:
            self.optimizer.state.clear()  # AdamW creates moments and step counts lazily, as for a new optimizer
            for group, decay in zip(self.optimizer.param_groups, (weight_decay, 0.0), strict=True):
                group.update(lr=lr, weight_decay=decay)
                group.pop("initial_lr", None)  # so the new schedule starts from this stage's lr
            self.engine.optimizer.clip_grad = grad_clip
        self.scheduler = build_scheduler(self.optimizer, total_steps, warmup_steps, schedule)
        self.grad_clip = grad_clip

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss * self.ctx.world_size, scale_wrt_gas=False)

    def step(self) -> float:
        self.engine.step()
        self.scheduler.step()
        return float(self.engine.get_global_grad_norm())

    def _gathered(self):
        """Context in which every parameter is whole on every rank (ZeRO-3 partitions them)."""
        return self.deepspeed.zero.GatheredParameters(list(self.model.parameters()), enabled=self.zero3)

    @contextmanager
    def output_weight(self, model: torch.nn.Module) -> Iterator[torch.Tensor]:
        """Under ZeRO-3 the LM head is partitioned and the fused losses use its weight without calling the
        module (so DeepSpeed's hooks never gather it): gather it for the forward and backward of the losses;
        its gradient is reduced and partitioned like any other."""
        weight = lm_head_weight(model)
        with self.deepspeed.zero.GatheredParameters([weight], enabled=self.zero3 and model is self.model):
            yield weight

    def state_dict(self) -> dict[str, torch.Tensor]:
        with self._gathered():
            return {name: t.detach().clone() for name, t in self.model.state_dict().items()}

    def full_parameters(self) -> Iterable[tuple[str, torch.Tensor]]:
        if not self.zero3:
            return self.model.named_parameters()
        with self._gathered():
            return [(name, p.detach().clone()) for name, p in self.model.named_parameters()]

    def frozen_copy(self) -> torch.nn.Module:
        if self.zero3 and self.engine is not None:
            raise ValueError("rl.kl_coef: a KL reference policy under ZeRO-3 would need its own partitioned engine; "
                             "use kl_coef 0 (the QwenLong-L1 recipe) or deepspeed_stage <= 2")
        return super().frozen_copy()

    def _save_engine_state(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder), tag=CHECKPOINT_TAG, save_latest=False)

    def _optimizer_state(self) -> None:
        return None  # partitioned: in DeepSpeed's own folder

    def _load_engine_state(self, path: Path) -> None:
        self.engine.load_checkpoint(str(path), tag=CHECKPOINT_TAG, load_optimizer_states=True,
                                    load_lr_scheduler_states=False)
