"""The planner's memory model (``qwenlong plan``) against measured peaks of real training steps on CPU.

Each case runs in a fresh process: a Qwen2 model built from a config (attention ``"qwenlong"``,
optionally gradient checkpointing), plain PyTorch AdamW (ZeRO stage 0), one packed micro-batch of
documents: the decoder's final hidden states, the fused LM head's log-probs (``linear_logprobs``, the
op under the GRPO and SFT losses), backward, optimizer step. The first step allocates the AdamW moments;
the second is measured. Measured: the peak resident set (``VmHWM``, reset before the second step)
minus the resident set before the model was built, so weights, gradients, moments and every
transient of the step count, and library start-up does not. glibc runs with a fixed mmap threshold
(``MALLOC_MMAP_THRESHOLD_``), so every tensor of 64 KiB or more is its own mapping, returned on free:
the resident set is then the live bytes, which is what the planner models (with its default dynamic
threshold glibc keeps freed mid-size tensors in its heap; the checkpointed case measured 1288 MiB that
way against 932 MiB planned). Planned: ``memory_plan``'s training lines for the same config on ``cpu``,
without the fragmentation margin (the GPU caching allocator's slack, which this measurement excludes),
and with it.

ZeRO (``--zero``): the same step on 2 gloo processes (``TrainingBackend`` all-reduce for stage 0,
``DeepSpeedBackend`` for stages 1-3, DeepSpeed's defaults), every stage with a fresh model in the same
pair of processes, each rank measuring itself three ways. *Resident peak*: as above, VmHWM during the
second step over VmRSS before the model, after a warm-up engine of the same stage has run a step and
been dropped (without it the first DeepSpeed stage in a process carried DeepSpeed's one-time start-up
memory: stage 1 read 181 MiB first, 112 MiB warmed up). *Allocated peak*: during the third step, the
largest sum of the storage bytes of every live tensor, followed allocation by allocation
(``torch.distributed._tools.mem_tracker.MemTracker``, a dispatch mode, started with every tensor alive
then that was not alive before the model); this is what a GPU would have to hold, since a CPU leaves
the pages of a ``torch.empty`` that nobody writes unmapped (DeepSpeed's 5e8-element reduce bucket is
such a buffer). *Model states*: right after the backward of that third step, the storages (each once)
of every tensor the process references (``gc``) plus the parameters' gradients, less those alive
before the model and DeepSpeed's reduce bucket (read from its optimizer): weights, gradients, fp32
master copies and AdamW moments as DeepSpeed keeps them. None of the three uses the planner's formulas.
``measure_zero(..., resident=False)`` (``tests/test_plan_zero.py``) skips the warm-up engine and the
resident step.

    python -m benchmarks.bench_plan_memory            # all cases, results under benchmarks/results/
    python -m benchmarks.bench_plan_memory --zero     # ZeRO stages 0-3 on 2 gloo processes
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

MMAP_THRESHOLD = 65536
# the case tests/test_plan.py measures (its row in the bench's table too)
TEST_CASE = ({"vocab_size": 4096, "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2}, "float32", 4096, 512, True)
CASES = [
    # name, model (TinyModelConfig fields), dtype, tokens per micro-batch, document length, checkpointing
    ("tiny preset, no checkpointing", {"vocab_size": 2048, "hidden_size": 128, "intermediate_size": 384,
                                       "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
     "float32", 4096, 512, False),
    ("small, no checkpointing", {"vocab_size": 8192, "hidden_size": 512, "intermediate_size": 1536,
                                 "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2},
     "float32", 4096, 1024, False),
    ("small, checkpointing", {"vocab_size": 8192, "hidden_size": 512, "intermediate_size": 1536,
                              "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2},
     "float32", 8192, 1024, True),
    ("hidden 256, checkpointing (tests/test_plan.py)", *TEST_CASE),
]
TINY_MODEL, SMALL_MODEL = CASES[0][1], CASES[1][1]
ZERO_STAGES = (0, 1, 2, 3)
ZERO_CASES = [
    # name, model, dtype, tokens per micro-batch, document length, checkpointing, stages
    ("tiny preset", TINY_MODEL, "float32", 4096, 512, False, ZERO_STAGES),
    ("tiny preset, bf16", TINY_MODEL, "bfloat16", 4096, 512, False, (2, 3)),
    ("small", SMALL_MODEL, "float32", 4096, 1024, False, ZERO_STAGES),
]
ZERO_WORLD = 2
ZERO_SETUP = {
    "processes": f"{ZERO_WORLD} gloo ranks, 1 thread each; stage 0: TrainingBackend (gradient all-reduce), stages 1-3: "
                 "DeepSpeedBackend with DeepSpeed's defaults (reduce_bucket_size 5e8), torch AdamW",
    "resident": f"VmHWM during the second step minus VmRSS before the model (MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}), "
                "after a warm-up engine of the same stage ran a step and was dropped",
    "allocated": "peak of the live tensors' storage bytes during the third step (torch MemTracker, every tensor "
                 "alive since the model was built registered)",
    "states": "storages of every referenced tensor and gradient right after the third step's backward, less "
              "those before the model and DeepSpeed's reduce bucket",
    "planned": "qwenlong.plan.memory.memory_plan training lines, cpu, world 2, no margin; allocated: with the reduce "
               "bucket whole (as on a GPU); states: weights + gradients + optimizer lines",
    "larger of the ranks": "each measure is the larger of the two ranks' values",
}


PLAIN_NOTES = [
    "The planner counts every gradient at the backward's peak, as gradient accumulation over micro-batches holds "
    "them; this one-micro-batch step holds only the LM head's (and, checkpointed, the last layer's) there: most of "
    "what remains of the error (small, no checkpointing: 62 of its 78 MiB).",
    "Where the peak falls (an allocation trace of the step, TorchDispatchMode): checkpointed, in the last layer's "
    "backward of act * up (its recomputed saved tensors less the product, three intermediate-wide gradients); "
    "without checkpointing, in the fused LM head's backward beside every layer's saved tensors.",
]

ZERO_NOTES = [
    "allocated is dominated by DeepSpeed's reduce bucket under stages 1-3 (5e8 elements x the model dtype, "
    "allocated whole). On CPU only its written pages are resident: stages 1-2 allocate it afresh at every "
    "backward, so at the LM head's peak it holds nothing yet; stage 3 keeps one, written by the earlier steps.",
    "Each stage's resident peak follows a warm-up engine of the same stage; the stages measured in the order "
    "3, 2, 1, 0 read the same resident peaks within 1.1 MiB.",
]


def _case_config(model: dict, dtype: str, tokens: int, doc_len: int, checkpointing: bool, stage: int = 0):
    from qwenlong.config import load_config

    root = Path(__file__).resolve().parent.parent
    # the measured models have an untied LM head (tiny.yaml ties it): the planner must count the same parameters
    overrides = [f"model.tiny.{k}={v}" for k, v in model.items()] + [
        "model.tiny.tie_word_embeddings=false", f"model.dtype={dtype}",
        f"model.gradient_checkpointing={str(checkpointing).lower()}",
        f"rl.micro_batch_token_budget={tokens}", "sft.enabled=false", f"distributed.deepspeed_stage={stage}",
        f"rl.phases=[{{name: a, steps: 1, max_input_tokens: {doc_len // 2}, "
        f"max_output_tokens: {doc_len - doc_len // 2}}}]"]
    return load_config(root / "configs" / "tiny.yaml", overrides)


def _cpu_plan(model: dict, dtype: str, tokens: int, doc_len: int, checkpointing: bool, stage: int = 0,
              world: int = 1):
    from qwenlong.plan.hardware import host_device
    from qwenlong.plan.memory import memory_plan, settings
    from qwenlong.plan.models import model_shape

    cfg = _case_config(model, dtype, tokens, doc_len, checkpointing, stage)
    shape, s = model_shape(cfg.model), settings(cfg, world, cuda=False)
    return shape, s, memory_plan(shape, s, host_device())


def _margin(plan) -> int:
    return sum(line.bytes for line in plan.train if line.label == "fragmentation margin")


def planned(model: dict, dtype: str, tokens: int, doc_len: int, checkpointing: bool) -> tuple[int, int]:
    """The planner's training peak for the case (bytes): without and with the fragmentation margin."""
    _, _, plan = _cpu_plan(model, dtype, tokens, doc_len, checkpointing)
    return plan.train_bytes - _margin(plan), plan.train_bytes


STATE_LINES = ("policy weights", "gradients", "optimizer (AdamW m, v)", "optimizer (fp32 master + AdamW m, v)")


def planned_zero(model: dict, dtype: str, tokens: int, doc_len: int, checkpointing: bool, stage: int,
                 world: int = ZERO_WORLD) -> dict[str, int]:
    """The planner's per-rank bytes for the case under ZeRO ``stage`` on ``world`` CPU ranks, without the
    fragmentation margin: ``resident`` (the CPU plan: the reduce bucket's written pages), ``allocated`` (the
    bucket whole, as a GPU holds it) and ``states`` (weights, gradients, optimizer state)."""
    from qwenlong.plan.memory import reduce_bucket_bytes

    shape, s, plan = _cpu_plan(model, dtype, tokens, doc_len, checkpointing, stage, world)
    resident = plan.train_bytes - _margin(plan)
    pages = sum(line.bytes for line in plan.train if line.label == "gradient reduce buckets")
    whole = 0 if stage == 0 else reduce_bucket_bytes(shape, s, cuda=True) - pages
    states = sum(line.bytes for line in plan.train if line.label in STATE_LINES)
    return {"resident": resident, "allocated": resident + whole, "states": states}


def measure(model: dict, dtype: str, tokens: int, doc_len: int, checkpointing: bool) -> int:
    """Peak bytes of the case's second training step over the process's resident set before the model."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from benchmarks.common import _release_cpu_memory, _status_kib
    from qwenlong.integrations.hf_attention import register
    from qwenlong.kernels import linear_logprobs
    from qwenlong.state.optim import build_optimizer

    register()
    torch.manual_seed(0)
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]

    def batch():
        ids = torch.randint(0, model["vocab_size"], (tokens,))
        positions = torch.arange(tokens) % doc_len
        return ids, positions, torch.roll(ids, -1)

    def step(net, optimizer, ids, positions, targets):
        hidden = net.model(input_ids=ids[None], position_ids=positions[None], use_cache=False).last_hidden_state[0]
        loss = -linear_logprobs(hidden, net.lm_head.weight, targets).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def build():
        config = Qwen2Config(**model, max_position_embeddings=doc_len, tie_word_embeddings=False)
        net = AutoModelForCausalLM.from_config(config, dtype=dt, attn_implementation="qwenlong")
        if checkpointing:
            net.gradient_checkpointing_enable()
        net.train()
        return net, build_optimizer(net, lr=1e-4, weight_decay=0.0)

    warm = build()  # libraries' first-use allocations happen here, outside the measurement
    step(*warm, *batch())
    del warm
    inputs = batch()
    _release_cpu_memory()
    before = _status_kib("VmRSS") * 1024
    net, optimizer = build()
    step(net, optimizer, *inputs)
    _release_cpu_memory()
    Path("/proc/self/clear_refs").write_text("5")
    step(net, optimizer, *inputs)
    return _status_kib("VmHWM") * 1024 - before


def measure_in_subprocess(model: dict, dtype: str, tokens: int, doc_len: int, checkpointing: bool) -> int:
    root = Path(__file__).resolve().parent.parent
    case = json.dumps([model, dtype, tokens, doc_len, checkpointing])
    # a fixed mmap threshold: glibc otherwise raises it as large blocks are freed and keeps later mid-size
    # tensors in a heap it cannot give back, so the resident set would count freed memory (see the notes)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    # the PyTorch CPU path, as a CPU run takes it (under a test suite's TRITON_INTERPRET=1 the kernels would run
    # in the Triton interpreter: minutes per step, and not the memory a real run uses)
    env.pop("TRITON_INTERPRET", None)
    env["QWENLONG_BACKEND"] = "torch"
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_plan_memory", "--one", case], cwd=root,
                         capture_output=True, text=True, timeout=1800, check=True, env=env)
    return int(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- ZeRO on 2 gloo processes


def _live_storages(extra=()) -> dict[int, int]:
    """{storage address: bytes} of every tensor the process references (``gc``) and of ``extra``, each storage
    once (views and the parameters DeepSpeed lays into flat buffers share theirs)."""
    import gc

    import torch

    found = {}
    for tensor in [o for o in gc.get_objects() if isinstance(o, torch.Tensor)] + list(extra):
        storage = tensor.untyped_storage()
        if storage.device.type != "meta" and storage.nbytes():
            found[storage.data_ptr()] = storage.nbytes()
    return found


def _reduce_buckets(backend) -> list:
    """DeepSpeed's gradient reduce buckets (its ZeRO optimizer's ``ipg_buckets``: a tensor or a list each)."""
    engine = getattr(backend, "engine", None)
    buckets = getattr(getattr(engine, "optimizer", None), "ipg_buckets", {}) or {}
    out = []
    for bucket in buckets.values():
        buffer = bucket.buffer
        out += buffer if isinstance(buffer, list) else [buffer]
    return [b for b in out if b is not None]


def measure_zero_rank(model: dict, dtype: str, tokens: int, doc_len: int, checkpointing: bool,
                      stages: list[int], resident: bool = True) -> list[dict[str, int]]:
    """This rank's bytes for each ZeRO stage (a fresh model each): allocated peak and model states, and with
    ``resident`` the resident peak after a warm-up engine of the same stage (see the module's notes). The
    process group must be up."""
    import torch

    from qwenlong.integrations.hf_attention import register
    from qwenlong.kernels import linear_logprobs

    register()
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    torch.manual_seed(torch.distributed.get_rank())
    ids = torch.randint(0, model["vocab_size"], (tokens,))
    positions, targets = torch.arange(tokens) % doc_len, torch.roll(ids, -1)

    def step(net, backend, after_backward=lambda: None):
        hidden = net.model(input_ids=ids[None], position_ids=positions[None], use_cache=False).last_hidden_state[0]
        with backend.output_weight(net) as weight:
            backend.backward(-linear_logprobs(hidden, weight, targets).mean())
        del hidden
        after_backward()
        backend.step()

    return [_measure_stage(stage, model, dt, doc_len, checkpointing, step, resident) for stage in stages]


def _engine(stage: int, model: dict, dt, doc_len: int, checkpointing: bool):
    """A fresh model and its training backend for ``stage`` (0: ``TrainingBackend``, 1-3: ``DeepSpeedBackend``
    with DeepSpeed's defaults), started."""
    from datetime import timedelta

    from transformers import AutoModelForCausalLM, Qwen2Config

    from qwenlong.config.schema import DistributedConfig
    from qwenlong.distributed import TrainingBackend, init_distributed
    from qwenlong.distributed.zero import DeepSpeedBackend

    cfg = DistributedConfig(backend="gloo", deepspeed_stage=stage)
    ctx = init_distributed(cfg, timeout=timedelta(minutes=5))
    config = Qwen2Config(**model, max_position_embeddings=doc_len, tie_word_embeddings=False)
    net = AutoModelForCausalLM.from_config(config, dtype=dt, attn_implementation="qwenlong")
    if checkpointing:
        net.gradient_checkpointing_enable()
    net.train()
    backend = DeepSpeedBackend(net, ctx, cfg) if stage else TrainingBackend(net, ctx)
    backend.start(lr=1e-4, weight_decay=0.0, total_steps=10, warmup_steps=0, schedule="constant", grad_clip=1.0)
    return net, backend


def _discard(backend) -> None:
    """Drop an engine: DeepSpeed's ``destroy`` removes its hooks from the model, then the garbage goes."""
    import gc

    engine = getattr(backend, "engine", None)
    if engine is not None:
        engine.destroy()
    gc.collect()


def _measure_stage(stage: int, model: dict, dt, doc_len: int, checkpointing: bool, step,
                   resident: bool) -> dict[str, int]:
    """One stage of :func:`measure_zero_rank` on a fresh model; ``step(net, backend, after_backward)`` runs one
    training step. With ``resident``, a warm-up engine of the same stage runs a step first and is dropped, so
    the libraries' one-time allocations (DeepSpeed's modules and buffers on first use of a stage) are in the
    resident set before the model, not in its peak."""
    import gc

    import torch
    from torch.distributed._tools.mem_tracker import MemTracker

    from benchmarks.common import _release_cpu_memory, _status_kib

    if resident:
        warm = _engine(stage, model, dt, doc_len, checkpointing)
        step(*warm)
        _discard(warm[1])
        del warm
    _release_cpu_memory()
    before = _live_storages()
    resident_before = _status_kib("VmRSS") * 1024
    net, backend = _engine(stage, model, dt, doc_len, checkpointing)
    step(net, backend)  # AdamW's moments appear in the first step
    out = {"stage": stage}
    if resident:
        _release_cpu_memory()
        Path("/proc/self/clear_refs").write_text("5")
        step(net, backend)
        out["resident"] = _status_kib("VmHWM") * 1024 - resident_before
    states = {}

    def count_states():
        gc.collect()
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        buckets = {b.untyped_storage().data_ptr() for b in _reduce_buckets(backend)}
        states.update({k: v for k, v in _live_storages(grads).items() if k not in before and k not in buckets})

    gc.collect()
    alive = [t for t in gc.get_objects()
             if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in before]
    alive += [p.grad for p in net.parameters() if p.grad is not None]
    tracker = MemTracker()
    tracker.track_external(net, backend.optimizer, *alive)
    del alive
    with tracker:
        step(net, backend, count_states)
    out["allocated"] = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    out["states"] = sum(states.values())
    _discard(backend)
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure_zero(model: dict, dtype: str, tokens: int, doc_len: int, checkpointing: bool,
                 stages: tuple[int, ...] = ZERO_STAGES, resident: bool = True) -> list[dict[str, int]]:
    """Each stage's bytes on ``ZERO_WORLD`` gloo processes (started here, the PyTorch CPU path, glibc's mmap
    threshold fixed): per stage, the larger of the ranks' values for each measure (``resident`` False: only
    the allocated peak and the model states, without the warm-up engine and the resident step)."""
    root = Path(__file__).resolve().parent.parent
    case = json.dumps([model, dtype, tokens, doc_len, checkpointing, list(stages), resident])
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "QWENLONG_BACKEND": "torch",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(ZERO_WORLD),
           "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    ranks = [subprocess.Popen([sys.executable, "-m", "benchmarks.bench_plan_memory", "--zero-rank", case], cwd=root,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(ZERO_WORLD)]
    outputs = []
    for rank in ranks:
        out, err = rank.communicate(timeout=3600)
        if rank.returncode:
            raise RuntimeError(f"a --zero-rank process failed ({rank.returncode}):\n{err[-3000:]}")
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    return [{key: max(per_rank[i][key] for per_rank in outputs) for key in outputs[0][i]}
            for i in range(len(stages))]


def _zero_rank_main(case: str) -> None:
    from datetime import timedelta

    import torch

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", timeout=timedelta(minutes=5))
    try:
        print(json.dumps(measure_zero_rank(*json.loads(case))), flush=True)
    finally:
        torch.distributed.destroy_process_group()


def _pct(planned: int, measured: int) -> float:
    return round(100 * (planned - measured) / measured, 1)


def zero_rows() -> list[dict]:
    """One row per case and stage: the three measures and the planner's numbers for them."""
    rows = []
    for name, model, dtype, tokens, doc_len, checkpointing, stages in ZERO_CASES:
        for measured in measure_zero(model, dtype, tokens, doc_len, checkpointing, stages):
            plan = planned_zero(model, dtype, tokens, doc_len, checkpointing, measured["stage"])
            rows.append({"case": name, "stage": measured["stage"], "tokens": tokens,
                         **{f"{what} {kind} MiB": round(numbers[what] / 2**20, 1)
                            for what in ("resident", "allocated", "states")
                            for kind, numbers in (("measured", measured), ("planned", plan))},
                         **{f"{what} error %": _pct(plan[what], measured[what])
                            for what in ("resident", "allocated", "states")}})
            print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--one", help="(internal) measure one case given as JSON and print its bytes")
    parser.add_argument("--zero", action="store_true", help="ZeRO stages 0-3 on 2 gloo processes")
    parser.add_argument("--zero-rank", help="(internal) one rank of a --zero case given as JSON")
    args = parser.parse_args(argv)
    if args.one:
        print(measure(*json.loads(args.one)))
        return 0
    if args.zero_rank:
        _zero_rank_main(args.zero_rank)
        return 0
    from benchmarks.common import write_results

    if args.zero:
        write_results("plan-memory-zero", f"Planner memory model vs measured per-rank CPU peaks, ZeRO stages on "
                      f"{ZERO_WORLD} gloo processes (one training step)", zero_rows(), setup=ZERO_SETUP,
                      notes=ZERO_NOTES)
        return 0

    rows = []
    for name, model, dtype, tokens, doc_len, checkpointing in CASES:
        measured = measure_in_subprocess(model, dtype, tokens, doc_len, checkpointing)
        plain, with_margin = planned(model, dtype, tokens, doc_len, checkpointing)
        rows.append({"case": name, "tokens": tokens, "measured MiB": round(measured / 2**20, 1),
                     "planned MiB": round(plain / 2**20, 1), "planned + margin MiB": round(with_margin / 2**20, 1),
                     "error %": round(100 * (plain - measured) / measured, 1),
                     "error with margin %": round(100 * (with_margin - measured) / measured, 1)})
        print(rows[-1], flush=True)
    write_results("plan-memory", "Planner memory model vs measured CPU peaks (one training step)", rows,
                  setup={"measured": "VmHWM during the second step minus VmRSS before the model (fresh process, "
                                     f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD})",
                         "planned": "qwenlong.plan.memory.memory_plan training lines on cpu, stage 0, no margin",
                         "optimizer": "torch AdamW (qwenlong.state.optim), states in the model dtype"},
                  notes=PLAIN_NOTES)
    return 0


if __name__ == "__main__":
    sys.exit(main())
