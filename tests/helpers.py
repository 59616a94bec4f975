"""Helpers shared by several test files: gloo process groups on CPU, ranks as threads, tiny Hugging Face models,
the learning rates an optimizer stepped with, the xdist worker count.

Plain functions, not fixtures (those live in ``conftest.py``): a module that the ranks of a process group
import by name. ``torch.multiprocessing`` pickles a rank's entry point by reference, so the entry point
must live in an ordinary importable module; pytest puts ``tests/`` on ``sys.path`` and the started
processes inherit it.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import threading
from collections.abc import Callable, Sequence
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Each xdist worker holds torch, transformers and the Triton interpreter, and the multi-process tests start
# 2-4 ranks of their own: more workers than this would trade memory for little time.
MAX_AUTO_WORKERS = 8


def auto_test_workers() -> int:
    """How many xdist workers a plain ``pytest`` starts: one per core this process may use, at most
    ``MAX_AUTO_WORKERS``."""
    return max(1, min(len(os.sched_getaffinity(0)), MAX_AUTO_WORKERS))


def free_tcp_port() -> int:
    """A free loopback TCP port for a gloo process group's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(check: Callable[[], None], world_size: int, port: int, *, preload: Sequence[str] = (),
          timeout_s: float = 60, torchrun_env: bool = False) -> None:
    """Run ``check()`` on ``world_size`` processes joined in a gloo process group on ``127.0.0.1:port``.

    Each rank uses the kernels' PyTorch paths (``QWENLONG_BACKEND=torch``: batch invariant, and no Triton
    interpreter) and one thread. ``preload``: modules a fork server imports once, so each rank forks from it
    (a clean, thread-free process) instead of importing them again; name the calling test module so that
    ``check`` unpickles at once. ``timeout_s``: how long a collective waits for a missing rank.
    ``torchrun_env``: also set the variables torchrun sets (``RANK``, ``WORLD_SIZE``, ``MASTER_PORT``, ...),
    for code under test that reads them. Raises ``torch.multiprocessing.ProcessRaisedException`` (with the
    rank's traceback) when ``check`` raises on any rank.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    multiprocessing.set_forkserver_preload(["torch", *preload, __name__])
    mp.start_processes(_entry, args=(check, world_size, port, timeout_s, torchrun_env), nprocs=world_size,
                       join=True, start_method="forkserver")


def _entry(rank: int, check: Callable[[], None], world_size: int, port: int, timeout_s: float,
           torchrun_env: bool) -> None:
    """One rank of :func:`spawn`: join the group, run the check, always leave the group."""
    os.environ["QWENLONG_BACKEND"] = "torch"
    if torchrun_env:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    try:
        check()
    finally:
        dist.destroy_process_group()


def tiny_causal_lm(family: str = "qwen2", *, seed: int = 0, vocab_size: int = 64, heads: int = 4, kv_heads: int = 2,
                   head_dim: int = 8, hidden_size: int | None = None, layers: int = 2, max_positions: int = 64,
                   attention: str = "sdpa", **config):
    """A seeded, randomly initialised float32 causal LM of ``family`` ('qwen2', 'qwen3', 'llama', 'mistral'
    or 'qwen3_moe') small enough for CPU tests: hidden size ``heads * head_dim`` unless given, MLP width 64.
    ``attention`` is the attention implementation it is built with (``"qwenlong"`` registers ours first);
    further keyword arguments go to the model config (for example ``initializer_range=0.2`` for sharp
    attention, where a key from the wrong sequence changes the output)."""
    import transformers

    if attention == "qwenlong":
        from qwenlong.integrations.hf_attention import register

        register()
    config_classes = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
                      "llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                      "qwen3_moe": transformers.Qwen3MoeConfig}
    if family == "qwen3_moe":  # 4 experts of width 16, 2 per token
        config = {"moe_intermediate_size": 16, "num_experts": 4, "num_experts_per_tok": 2, **config}
    if family not in config_classes:
        raise ValueError(f"family must be one of {sorted(config_classes)}, got {family!r}")
    model_config = config_classes[family](
        vocab_size=vocab_size, hidden_size=hidden_size or heads * head_dim, intermediate_size=64,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=max_positions, **config)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(model_config, attn_implementation=attention,
                                                         dtype=torch.float32)


def assert_sft_step_matches_reference(trainer, model: torch.nn.Module, reference: torch.nn.Module,
                                      pairs: Sequence[tuple[list[int], list[int]]]) -> None:
    """The SFT trainer's first step, as its micro-batches pack it (our attention, the fused LM head on the
    decoder's hidden states), against ``reference`` (a copy of ``model`` on sdpa) run one sequence at a time on
    materialized logits with a float64 loss: the token-mean loss and every parameter's gradient agree. Leaves
    both models' gradients set."""
    from qwenlong.kernels import linear_cross_entropy
    from qwenlong.trainers.packed import forward_hidden, lm_head_weight

    batches = trainer._step_micro_batches(0)
    used = [pairs[i] for ids in batches for i in ids]
    total, count = torch.zeros((), dtype=torch.float64), sum(len(response) for _, response in used)
    for prompt, response in used:
        logits = reference(torch.tensor([prompt + response])).logits[0].double()
        total = total + torch.nn.functional.cross_entropy(logits[len(prompt) - 1:-1], torch.tensor(response),
                                                          reduction="sum")
    (total / count).backward()
    loss_sum = 0.0
    for ids in batches:
        batch = trainer._pack(ids)
        loss = linear_cross_entropy(forward_hidden(model, batch), lm_head_weight(model), batch.targets,
                                    reduction="sum") / count
        loss.backward()
        loss_sum += loss.item()
    assert loss_sum == pytest.approx(float(total.detach() / count), rel=1e-5)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad.to(p.grad.dtype), rtol=1e-4, atol=1e-6, msg=name)


def run_rank_threads(world: int, rank_main: Callable[[int, Callable], None], timeout_s: float = 60) -> None:
    """``rank_main(rank, gather)`` on ``world`` threads, ``gather(obj)`` returning every rank's ``obj`` in rank
    order (an all-gather, as a rank's context gives): for code that takes a gather function, no process group."""
    slots, barrier = [None] * world, threading.Barrier(world)

    def gather_for(rank: int) -> Callable:
        def gather(obj):
            slots[rank] = obj
            barrier.wait()
            out = list(slots)
            barrier.wait()
            return out

        return gather

    threads = [threading.Thread(target=rank_main, args=(rank, gather_for(rank))) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout_s)


def record_learning_rates(optimizer: torch.optim.Optimizer) -> list[float]:
    """The learning rate of each ``optimizer.step()`` from now on, as the step used it (its first group's)."""
    used = []
    real_step = optimizer.step

    def step(*args, **kwargs):
        used.append(optimizer.param_groups[0]["lr"])
        return real_step(*args, **kwargs)

    optimizer.step = step
    return used
