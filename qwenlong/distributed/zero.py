"""DeepSpeed ZeRO stages 1-3 (optionally offloading optimizer state / parameters to CPU) behind
the ``TrainingBackend`` interface.

The trainers own gradient accumulation (their micro-batch count varies per step), so the engine
runs with ``managed_gradient_accumulation: false``: ``backward`` only accumulates and ``step``
reduces, clips and updates. The optimizer is our own AdamW (``build_optimizer``), the one the plain
backend uses, so both give the same updates; DeepSpeed's fused and CPU Adam need C++/CUDA builds.
DeepSpeed averages gradients over ranks while each rank's loss is its share of the global
loss, so ``backward`` scales the loss by the world size to turn that mean into the sum.

One engine wraps the model for the whole run, from the backend's construction (DeepSpeed cannot
wrap a module twice, and a model partitioned at creation runs only inside it); each stage (SFT,
each RL phase) clears the Adam moments and step counts and installs its learning rate, weight
decay, clipping and schedule, which is what a fresh optimizer would start from.

Under ZeRO-3 no rank ever holds the whole model: a pretrained policy is created partitioned
(``deepspeed.zero.Init``) and its weights arrive one parameter at a time (``load_pretrained_partitioned``;
a Mixture-of-Experts parameter that fuses the experts is built from its per-expert checkpoint tensors alone);
``model.pt`` is written from weights gathered one parameter at a time (rank 0 copies each to CPU),
and read back the same way; a rollout engine with its own copy receives them one at a time too; and
generation runs on the partitioned policy itself, every rank in lockstep
(``HFGenerateEngine(synced=True)``). A tiny policy built from a config is small enough to be built
whole and partitioned by ``deepspeed.initialize``, which keeps its seeded initialisation.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qwenlong.config.schema import DistributedConfig
from qwenlong.distributed.backend import TrainingBackend
from qwenlong.distributed.context import DistributedContext
from qwenlong.integrations.hf import lm_head_weight
from qwenlong.state.checkpoint import model_weights
from qwenlong.state.optim import build_optimizer, build_scheduler

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
        self.cfg = cfg
        self.deepspeed = import_deepspeed()
        self.deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
        # start() sets the real learning rate, weight decay and clipping of each stage
        self.optimizer = build_optimizer(self.model, lr=0.0, weight_decay=0.0)
        bf16 = next(self.model.parameters()).dtype == torch.bfloat16
        self.engine, *_ = self.deepspeed.initialize(model=self.model, optimizer=self.optimizer,
                                                    config=deepspeed_config(cfg, grad_clip=0.0, bf16=bf16))

    @property
    def zero3(self) -> bool:
        return self.cfg.deepspeed_stage == 3

    def start(self, *, lr: float, weight_decay: float, total_steps: int, warmup_steps: int, schedule: str,
              grad_clip: float) -> None:
        self.optimizer.state.clear()  # AdamW creates moments and step counts lazily, as for a new optimizer
        for group, decay in zip(self.optimizer.param_groups, (weight_decay, 0.0), strict=True):
            group.update(lr=lr, weight_decay=decay)
            group.pop("initial_lr", None)  # so the new schedule starts from this stage's lr
        self.engine.optimizer.clip_grad = grad_clip  # DeepSpeed's ZeRO optimizers read it at each step
        self.scheduler = build_scheduler(self.optimizer, total_steps, warmup_steps, schedule)
        self.grad_clip = grad_clip

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss * self.ctx.world_size, scale_wrt_gas=False)

    def step(self) -> float:
        self.engine.step()
        self.scheduler.step()
        return float(self.engine.get_global_grad_norm())

    @contextmanager
    def output_weight(self, model: torch.nn.Module) -> Iterator[torch.Tensor]:
        """Under ZeRO-3 the LM head is partitioned and the fused losses use its weight without calling the
        module (so DeepSpeed's hooks never gather it): gather it for the forward and backward of the losses;
        its gradient is reduced and partitioned like any other.

        A head tied to the input embeddings is one parameter that the embedding module also uses, and
        that module's hooks partition its parameters after each of its forwards and backwards, which
        would free the weight the losses still hold. So while the context is open the weight carries
        DeepSpeed's ``is_external_param`` mark, the one it gives a parameter used outside its module
        (such parameters are left to whoever gathered them): this context partitions it on exit."""
        weight = lm_head_weight(model)
        if not (self.zero3 and model is self.model):  # whole weights
            yield weight
            return
        with self.deepspeed.zero.GatheredParameters([weight]), _held_by_caller(weight):
            yield weight

    def state_dict(self) -> dict[str, torch.Tensor]:
        if not self.zero3:
            # copies (the tensors are views of DeepSpeed's flat buffers), on the CPU: a clone on the GPU would be
            # a second whole model there, on top of the partitions, gradients and rank 0's share of optimizer state
            return {name: t.detach().to("cpu", copy=True) for name, t in self.model.state_dict().items()}
        return self._gathered_state_dict(keep=True)

    def main_state_dict(self) -> dict[str, torch.Tensor] | None:
        if not self.zero3:
            return super().main_state_dict()
        return self._gathered_state_dict(keep=self.ctx.is_main)

    def _gathered_state_dict(self, keep: bool) -> dict[str, torch.Tensor] | None:
        """ZeRO-3: the model's state dict on CPU where ``keep`` (else None), gathering one parameter at a
        time, so a rank holds at most one whole parameter besides its partitions. Every rank calls it;
        a tied parameter is gathered once and stays one tensor under both names, as in ``torch.save``."""
        state: dict[str, torch.Tensor] = {}
        copies: dict[int, torch.Tensor | None] = {}
        for name, tensor in self.model.state_dict(keep_vars=True).items():
            if id(tensor) not in copies:
                with self.deepspeed.zero.GatheredParameters([tensor]):  # a no-op for buffers
                    copies[id(tensor)] = tensor.detach().to("cpu", copy=True) if keep else None
            state[name] = copies[id(tensor)]
        return state if keep else None

    def full_parameters(self) -> Iterable[tuple[str, torch.Tensor]]:
        if not self.zero3:
            return self.model.named_parameters()
        return self._streamed_parameters()

    def _streamed_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """ZeRO-3: (name, whole copy) of one parameter at a time; every rank must consume all of them, in order."""
        for name, param in self.model.named_parameters():
            with self.deepspeed.zero.GatheredParameters([param]):
                whole = param.detach().clone()
            yield name, whole

    def frozen_copy(self) -> torch.nn.Module:
        if self.zero3:
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

    def load_weights(self, path: str | Path) -> None:
        if self.zero3:
            scatter_whole_weights(self.model, (lambda: checkpoint_weights(path)) if self.ctx.is_main else None)
        else:
            super().load_weights(path)
        # DeepSpeed steps fp32 copies of the weights: without this, its next step would put the old ones back
        self.engine.optimizer.refresh_fp32_params()


@dataclass
class WholeWeights:
    """Whole tensors by parameter name, read when asked for: rank 0's side of ``scatter_whole_weights``."""

    shape: Callable[[str], tuple[int, ...]]  # KeyError for a name it lacks, ValueError for one it cannot build
    read: Callable[[str], torch.Tensor]
    close: Callable[[], None] = lambda: None


def checkpoint_weights(path: str | Path) -> WholeWeights:
    """The weights of a checkpoint folder's ``model.pt``, memory-mapped: each is read as it is used."""
    state = model_weights(path, mmap=True)
    return WholeWeights(lambda name: tuple(state[name].shape), state.__getitem__)


def safetensors_weights(name: str) -> WholeWeights:
    """The weights of a pretrained checkpoint's safetensors files (sharded or not; a local folder or a hub id)
    by the names of the model's parameters: where transformers builds a parameter from several checkpoint
    tensors (the fused experts of a Mixture-of-Experts model, e.g. ``qwen3_moe``), it is built from them
    when read (:class:`qwenlong.integrations.hf_checkpoint.ModelWeights`; the conversion comes from the
    folder's ``config.json``: without one, the names are the checkpoint's own)."""
    from safetensors import safe_open

    from qwenlong.integrations.hf_checkpoint import CheckpointFormat

    folder = Path(name)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors"]))
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    elif (folder / "model.safetensors").exists():
        with safe_open(folder / "model.safetensors", framework="pt") as single:
            weight_map = dict.fromkeys(single.keys(), "model.safetensors")
    else:
        raise FileNotFoundError(f"{name} has no model.safetensors or model.safetensors.index.json "
                                "(ZeRO-3 loading reads safetensors checkpoints only)")
    files = ExitStack()
    handles: dict[str, Any] = {}

    def handle(key: str) -> Any:
        file = weight_map[key]  # KeyError: the checkpoint lacks it
        if file not in handles:
            handles[file] = files.enter_context(safe_open(folder / file, framework="pt"))
        return handles[file]

    try:
        weights = CheckpointFormat.of_folder(folder).model_weights(
            weight_map, lambda key: tuple(handle(key).get_slice(key).get_shape()),
            lambda key: handle(key).get_tensor(key))
    except BaseException:
        files.close()
        raise
    return WholeWeights(weights.shape, weights.read, files.close)


def scatter_whole_weights(model: torch.nn.Module, open_weights: Callable[[], WholeWeights] | None) -> None:
    """ZeRO-3: set each parameter of a partitioned ``model`` from whole weights that rank 0 alone opens
    (``open_weights``; None on the other ranks) and reads one parameter at a time; every rank calls it.
    A tied parameter is set once, under its first name (the input embeddings').

    Rank 0 first checks every name and shape: weights that cannot be opened, or lack a parameter or
    have another shape, raise the same ValueError on every rank (rather than leaving the others waiting
    in the next gather)."""
    deepspeed = import_deepspeed()
    params = list(model.named_parameters())
    weights, problem = open_checked_on_rank0(open_weights, lambda weights: _mismatches(weights, params))
    try:
        if problem is not None:
            raise ValueError(f"weights: {problem}")
        for name, param in params:
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if weights is not None:
                    param.data.copy_(weights.read(name))
    finally:
        if weights is not None:
            weights.close()


def shape_problems(weights: WholeWeights, tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """What keeps ``weights`` from filling each of the named ``tensors`` (partitioned: their whole shape is
    ``ds_shape``): a missing name, checkpoint tensors that do not fit together, or another shape."""
    problems = []
    for name, tensor in tensors:
        expected = tuple(getattr(tensor, "ds_shape", tensor.shape))
        try:
            shape = weights.shape(name)
        except KeyError:
            problems.append(f"{name} is missing")
            continue
        except ValueError as error:  # the checkpoint tensors it is built from do not fit together
            problems.append(str(error))
            continue
        if shape != expected:
            problems.append(f"{name} has shape {shape}, the model's is {expected}")
    return problems


def _mismatches(weights: WholeWeights, params: list[tuple[str, torch.nn.Parameter]]) -> str | None:
    """What keeps ``weights`` from filling ``params``, or None."""
    problems = shape_problems(weights, params)
    if not problems:
        return None
    return f"{len(problems)} of {len(params)} parameters do not fit: {'; '.join(problems[:5])}"


def from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (the value itself without a process group of several ranks)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def open_checked_on_rank0(open_source: Callable[[], Any] | None, check: Callable[[Any], str | None]
                          ) -> tuple[Any, str | None]:
    """``(source, problem)``: rank 0 opens a source (``open_source``; None on the other ranks, whose source is
    None) and checks it (``check`` returns a problem or None). A failure there, opening included, becomes the
    problem, and every rank gets rank 0's problem: a bad source then fails on every rank instead of leaving
    the others waiting in the next collective."""
    source, problem = None, None
    if open_source is not None:
        try:
            source = open_source()
            problem = check(source)
        except Exception as error:  # any failure here must reach every rank, not rank 0 alone
            problem = f"{type(error).__name__}: {error}"
    return source, from_rank0(problem)


def load_pretrained_partitioned(name: str, *, dtype: torch.dtype, attn_implementation: str,
                                cfg: DistributedConfig) -> torch.nn.Module:
    """A pretrained causal LM (a local folder or a hub id with safetensors weights) under ZeRO-3 without
    any rank ever holding it whole: every parameter is partitioned as it is created
    (``deepspeed.zero.Init``), then rank 0 reads the checkpoint one tensor at a time and each is
    scattered to its partitions. The process group must be up; every rank calls it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights

    deepspeed = import_deepspeed()
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    ds_config = deepspeed_config(cfg, grad_clip=0.0, bf16=dtype == torch.bfloat16)
    # no random init: it would write into parameters already partitioned, and the checkpoint replaces it
    with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=zero_init_dtype(dtype)):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(name), dtype=dtype,
                                                 attn_implementation=attn_implementation)
    model.tie_weights()  # skipped with the init, as from_pretrained ties after loading
    buffers = set(model.state_dict()) - {n for n, _ in model.named_parameters(remove_duplicate=False)}
    if buffers:
        raise ValueError(f"model.name: {name} has persistent buffers ({', '.join(sorted(buffers))}), which ZeRO-3 "
                         "loading does not read; use deepspeed_stage 2")
    is_main = torch.distributed.get_rank() == 0
    try:
        scatter_whole_weights(model, (lambda: safetensors_weights(name)) if is_main else None)
    except ValueError as error:
        raise ValueError(f"model.name: {name}: {error}") from None
    return model


def zero_init_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """The ``dtype=`` for ``deepspeed.zero.Init`` that creates the parameters in ``dtype``. Given None it takes the
    config's (bfloat16 with bf16 enabled, float16 with fp16, else float32: a float16 model would become float32,
    twice its memory, as our config has no fp16 section). An explicit dtype is honoured only where the accelerator
    has fp16 (zero.Init reads ``dtype or float16 if is_fp16_supported() else bfloat16 ...``), as CUDA's has;
    elsewhere (DeepSpeed's CPU accelerator) it would become bfloat16, so there the config decides."""
    from deepspeed.accelerator import get_accelerator

    return dtype if get_accelerator().is_fp16_supported() else None


@contextmanager
def _held_by_caller(param: torch.nn.Parameter) -> Iterator[None]:
    """Keep DeepSpeed's module hooks from partitioning ``param`` while the caller holds it gathered."""
    marked = param.is_external_param
    param.is_external_param = True
    try:
        yield
    finally:
        param.is_external_param = marked
