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

    python -m benchmarks.bench_plan_memory            # all cases, results under benchmarks/results/
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

MMAP_THRESHOLD = 65536
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
]


def planned(model: dict, dtype: str, tokens: int, doc_len: int, checkpointing: bool) -> tuple[int, int]:
    """The planner's training peak for the case (bytes): without and with the fragmentation margin."""
    from qwenlong.config import load_config
    from qwenlong.plan.hardware import host_device
    from qwenlong.plan.memory import memory_plan, settings
    from qwenlong.plan.models import model_shape

    root = Path(__file__).resolve().parent.parent
    overrides = [f"model.tiny.{k}={v}" for k, v in model.items()] + [
        f"model.dtype={dtype}", f"model.gradient_checkpointing={str(checkpointing).lower()}",
        f"rl.micro_batch_token_budget={tokens}", "sft.enabled=false",
        f"rl.phases=[{{name: a, steps: 1, max_input_tokens: {doc_len // 2}, "
        f"max_output_tokens: {doc_len - doc_len // 2}}}]"]
    cfg = load_config(root / "configs" / "tiny.yaml", overrides)
    plan = memory_plan(model_shape(cfg.model), settings(cfg, 1, cuda=False), host_device())
    margin = sum(line.bytes for line in plan.train if line.label == "fragmentation margin")
    return plan.train_bytes - margin, plan.train_bytes


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--one", help="(internal) measure one case given as JSON and print its bytes")
    args = parser.parse_args(argv)
    if args.one:
        print(measure(*json.loads(args.one)))
        return 0
    from benchmarks.common import write_results

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
                         "optimizer": "torch AdamW (qwenlong.state.optim), states in the model dtype"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
