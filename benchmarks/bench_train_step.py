"""Training step: forward + backward of real-shaped Qwen2.5 decoder layers on one packed batch,
our stack against what users run today.

Model: a transformers ``Qwen2Config`` with the Qwen2.5-7B or -32B layer shape (``--shape``),
``--layers`` decoder layers and the 152,064-token vocabulary, random weights
(``AutoModelForCausalLM.from_config``), bf16 on a GPU, fp32 on CPU. Batch: one packed row of
documents of mixed lengths (position ids restart per document), ``--lengths`` total tokens, a
causal-LM loss on every next token inside a document. Stacks, in the same process:

- ``qwenlong``: attention ``"qwenlong"`` (our varlen kernel, one causal block per document),
  the fused LM-head loss (``apply_qwenlong``: no logits tensor), activation checkpointing;
- ``hf-sdpa (one row)``: transformers ``"sdpa"`` on the same packed row and the plain loss on
  materialized logits. The mask transformers builds for it from restarting position ids is
  plain causal over the whole row (checked with transformers 5.24's eager attention weights):
  documents attend to the ones before them. Same tokens, not the same function;
- ``hf-sdpa (padded)``: ``"sdpa"`` with one row per document, right-padded to the longest, an
  attention mask and the plain loss: the same function as ours, padding computed too;
- ``flex (doc mask)``: transformers ``"flex_attention"`` with a document-causal ``BlockMask``
  passed as the attention mask (built outside the timed step) and the plain loss. FlexAttention
  has no backward on CPU: reported "not available" there.

Each row reports tokens/s (real tokens, padding excluded), model TFLOP/s (formula in
:func:`train_step_flops`; activation-checkpointing recompute is not counted), peak memory and
the loss (ours, padded and flex should agree). Then, per stack, the largest context that fits:
doubling total lengths until a step runs out of GPU memory (on CPU: until its peak memory
passes ``--max-memory-gib``), then bisecting down to ``--search-step`` tokens.

    python -m benchmarks.bench_train_step --shape 7b --layers 4            # GPU
    python -m benchmarks.bench_train_step --quick                          # CPU smoke: tiny shapes
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch

from benchmarks.common import (
    NOT_AVAILABLE,
    OOM,
    RESULTS_DIR,
    PeakMemory,
    default_device,
    document_lengths,
    environment,
    memory_method,
    time_ms,
    write_results,
)

VOCAB = 152_064
SHAPES = {  # hidden, heads, kv heads, intermediate, vocab
    "7b": (3584, 28, 4, 18944, VOCAB),
    "32b": (5120, 40, 8, 27648, VOCAB),
    "tiny": (64, 4, 2, 128, 2048),  # --quick: CPU smoke test
}
SHAPE_TITLES = {"7b": "Qwen2.5-7B layer shape", "32b": "Qwen2.5-32B layer shape", "tiny": "tiny shape (CPU)"}
IGNORE_INDEX = -100
OVER_CAP = "over the memory cap"  # CPU: the search's stand-in for out of memory


@dataclass(frozen=True)
class Stack:
    name: str
    attention: str  # transformers attn_implementation
    padded: bool  # one row per document (padded) instead of one packed row
    fused_loss: bool
    checkpointing: bool
    what: str


STACKS = (
    Stack("qwenlong", "qwenlong", False, True, True,
          "varlen attention per document + fused linear cross-entropy + activation checkpointing"),
    Stack("hf-sdpa (one row)", "sdpa", False, False, False,
          "sdpa + materialized logits; causal over the whole row (attends across documents: not the same function)"),
    Stack("hf-sdpa (padded)", "sdpa", True, False, False,
          "sdpa + materialized logits, one right-padded row per document (same function, padding computed)"),
    Stack("flex (doc mask)", "flex_attention", False, False, False,
          "FlexAttention with a document-causal BlockMask + materialized logits"),
)


def qwen2_config(shape: str, layers: int):
    from transformers import Qwen2Config

    hidden, heads, kv_heads, intermediate, vocab = SHAPES[shape]
    return Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1 << 20,
                       tie_word_embeddings=False, use_cache=False)


def train_step_flops(config, lengths: list[int]) -> float:
    """Model FLOPs of one forward + backward over packed documents of ``lengths`` tokens.

    forward = 2 T P + L 4 H h sum_i n_i (n_i + 1) / 2, backward = 2 x forward, so the step is 3 x forward.
    T = sum_i n_i tokens; P = L (d H h + 2 d K h + H h d + 3 d I) + V d, the multiply-adds per token of the
    q, k, v, o projections, the gated MLP and the LM head (biases, norms, rotary, softmax and embedding
    lookups left out); the attention term counts QK^T and PV over each document's causal triangle.
    L layers, d hidden, H heads, K kv heads, h head dim, I intermediate, V vocab. Activation
    checkpointing's recomputed forward and padding are not counted: the same work for every stack.
    """
    d, heads, layers = config.hidden_size, config.num_attention_heads, config.num_hidden_layers
    kv_heads, inter, vocab = config.num_key_value_heads, config.intermediate_size, config.vocab_size
    head_dim = d // heads
    per_token = layers * (d * heads * head_dim + 2 * d * kv_heads * head_dim + heads * head_dim * d + 3 * d * inter)
    per_token += vocab * d
    attention = layers * 4 * heads * head_dim * sum(n * (n + 1) / 2 for n in lengths)
    return 3 * (2 * sum(lengths) * per_token + attention)


# ----------------------------------------------------------------------------- stacks
def flex_unavailable(device: str) -> str | None:
    """Why FlexAttention cannot train here (None when it can), from a tiny eager call."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as exc:
        return f"{NOT_AVAILABLE} ({exc})"
    q = torch.randn(1, 1, 128, 16, device=device, requires_grad=True)
    try:
        flex_attention(q, q, q).sum().backward()
    except (NotImplementedError, RuntimeError) as exc:
        return f"{NOT_AVAILABLE} ({str(exc).splitlines()[0].split('. ')[0][:100]})"
    return None


def build_model(stack: Stack, config, device: str, dtype: torch.dtype, seed: int = 0):
    from transformers import AutoModelForCausalLM

    if stack.attention == "qwenlong":
        from qwenlong.integrations.hf_attention import register

        register()
    torch.manual_seed(seed)  # the same weights for every stack
    model = AutoModelForCausalLM.from_config(config, attn_implementation=stack.attention, dtype=dtype).to(device)
    if stack.fused_loss:
        from qwenlong.integrations.hf import apply_qwenlong

        apply_qwenlong(model, attention=True, fused_loss=True)
    if stack.checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name is deprecated
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def make_batch(stack: Stack, lengths: list[int], vocab: int, device: str) -> dict:
    """Model inputs for one step on fresh random tokens: the packed row, or padded rows."""
    tokens = [torch.randint(0, vocab, (n,)) for n in lengths]
    if stack.padded:
        longest = max(lengths)
        input_ids = torch.zeros(len(lengths), longest, dtype=torch.long)
        mask = torch.zeros(len(lengths), longest, dtype=torch.long)
        for row, t in enumerate(tokens):
            input_ids[row, : len(t)] = t
            mask[row, : len(t)] = 1
        labels = input_ids.masked_fill(mask == 0, IGNORE_INDEX)
        return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
    input_ids = torch.cat(tokens)[None]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = input_ids.masked_fill(position_ids == 0, IGNORE_INDEX)  # no label crosses a document boundary
    batch = {"input_ids": input_ids.to(device), "position_ids": position_ids.to(device), "labels": labels.to(device)}
    if stack.attention == "flex_attention":
        batch["attention_mask"] = document_block_mask(lengths, device)
    return batch


def document_block_mask(lengths: list[int], device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    document = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))

    def document_causal(b, h, q_idx, kv_idx):
        return (document[q_idx] == document[kv_idx]) & (q_idx >= kv_idx)

    total = sum(lengths)
    return create_block_mask(document_causal, None, None, total, total, device=device)


def step(model, batch: dict) -> float:
    loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.item()


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc)


def measure(model, stack: Stack, lengths: list[int], vocab: int, device: str, repeats: int,
            cap_mib: float | None) -> dict:
    """Peak memory and loss of one step, then the median step time of ``repeats`` more (when it fits)."""
    try:
        batch = make_batch(stack, lengths, vocab, device)
        with PeakMemory(device) as peak:
            loss = step(model, batch)
        del batch
        if cap_mib is not None and peak.mib > cap_mib:
            return {"peak MiB": peak.mib, "status": f"{OVER_CAP} ({cap_mib / 1024:g} GiB)"}
        row = {"peak MiB": peak.mib, "loss": round(loss, 4), "status": "ok"}
        if repeats:  # the measured step above was the warm-up
            row["step ms"] = round(time_ms(lambda b: step(model, b), device=device, warmup=0, repeats=repeats,
                                           setup=lambda: (make_batch(stack, lengths, vocab, device),)), 2)
        return row
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not is_oom(exc):
            raise
    # out of memory: free what the failed step held (its traceback is gone once the handler ends)
    model.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"status": OOM}


def largest_fitting(model, stack: Stack, fits: int, limit: int, granularity: int, vocab: int, device: str,
                    cap_mib: float | None) -> dict:
    """Double the total length from ``fits`` (known to fit) until a step does not (or ``limit``), then bisect."""
    fails = None
    total = fits * 2
    while total <= limit:
        if measure(model, stack, document_lengths(total), vocab, device, 0, cap_mib)["status"] != "ok":
            fails = total
            break
        fits, total = total, total * 2
    while fails is not None and fails - fits > granularity:
        middle = (fits + fails) // 2 // granularity * granularity
        if measure(model, stack, document_lengths(middle), vocab, device, 0, cap_mib)["status"] == "ok":
            fits = middle
        else:
            fails = middle
    return {"stack": stack.name, "largest fitting tokens": fits,
            "first failing tokens": fails if fails is not None else f"none up to {limit}"}


def run(args) -> tuple[list[dict], list[dict]]:
    device = default_device()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = qwen2_config(args.shape, args.layers)
    cap_mib = args.max_memory_gib * 1024 if device == "cpu" else None
    rows, largest = [], []
    flex_reason = flex_unavailable(device)
    for stack in STACKS:
        if stack.attention == "flex_attention" and flex_reason:
            rows += [{"stack": stack.name, "total tokens": t, "status": flex_reason} for t in args.lengths]
            largest.append({"stack": stack.name, "largest fitting tokens": flex_reason})
            continue
        model = build_model(stack, config, device, dtype)
        step(model, make_batch(stack, document_lengths(min(args.lengths)), config.vocab_size, device))  # warm-up
        for total in args.lengths:
            lengths = document_lengths(total)
            row = {"stack": stack.name, "total tokens": total, "documents": len(lengths)}
            row |= measure(model, stack, lengths, config.vocab_size, device, args.repeats, cap_mib)
            if "step ms" in row:
                row["tokens/s"] = round(total / (row["step ms"] * 1e-3))
                row["TFLOP/s"] = float(f"{train_step_flops(config, lengths) / (row['step ms'] * 1e-3) / 1e12:.4g}")
            rows.append(row)
            print(row, flush=True)
        fitting = [row["total tokens"] for row in rows if row["stack"] == stack.name and row["status"] == "ok"]
        if args.search and fitting:
            largest.append(largest_fitting(model, stack, max(fitting), args.search_limit, args.search_step,
                                           config.vocab_size, device, cap_mib))
        elif args.search:
            largest.append({"stack": stack.name, "largest fitting tokens": f"< {min(args.lengths)}"})
        if args.search:
            print(largest[-1], flush=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows, largest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU smoke: tiny shape, 1 layer, 256 tokens, search to 1K")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (as many as fit)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072], help="total tokens")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps (median)")
    parser.add_argument("--no-search", dest="search", action="store_false", help="skip the largest-context search")
    parser.add_argument("--search-limit", type=int, default=1 << 20, help="largest total length tried")
    parser.add_argument("--search-step", type=int, default=4096, help="bisection granularity in tokens")
    parser.add_argument("--max-memory-gib", type=float, default=4.0, help="CPU: the memory cap of the search")
    parser.add_argument("--out", default=str(RESULTS_DIR), help="results directory")
    args = parser.parse_args(argv)
    if args.quick:
        args.shape, args.layers, args.lengths, args.repeats = "tiny", 1, [256], 1
        args.search_limit, args.search_step, args.max_memory_gib = 1024, 256, 0.05
    rows, largest = run(args)
    config = qwen2_config(args.shape, args.layers)
    device = default_device()
    setup = {"shape": f"{args.shape}: hidden {config.hidden_size}, heads {config.num_attention_heads}/"
                      f"{config.num_key_value_heads}, intermediate {config.intermediate_size}, "
                      f"vocab {config.vocab_size}",
             "layers": args.layers, "dtype": "bf16" if device == "cuda" else "fp32",
             "batch": "one packed row of documents of mixed lengths (64 tokens to a quarter of the total)",
             "timing": f"median of {args.repeats} steps on fresh tokens after warm-up steps (one per stack at the "
                       "shortest length, then the memory-measuring step at each length)",
             "TFLOP/s": "3 x (2 T P + L 4 H h sum n_i(n_i+1)/2) / step time (train_step_flops; no recompute)",
             "peak memory": memory_method(device),
             "search": (f"doubling from the longest measured length that fits to at most {args.search_limit} "
                        f"tokens, bisection to {args.search_step}; limit: "
                        + (f"{args.max_memory_gib:g} GiB peak memory" if device == "cpu" else "out of memory"))
             if args.search else "skipped"}
    notes = [f"{stack.name}: {stack.what}" for stack in STACKS]
    write_results(f"train-step-{args.shape}", f"Training step, {SHAPE_TITLES[args.shape]}", rows, setup=setup,
                  out_dir=args.out, env=environment(), notes=notes,
                  tables={"Largest context that fits": largest} if largest else None,
                  plot={"x": "total tokens", "series": ["stack"], "metrics": ["tokens/s", "peak MiB"]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
