"""Fused LM-head ops (log-probs + entropy, cross-entropy, GRPO loss): time, TFLOP/s and peak memory.

GPU (default): forward + backward of three ops at T in {32K, 120K} tokens, d = 5120,
V = 152,064, bf16 (``--quick``: T = 8K only), on two batches: every row valid, and RL-shaped
(one long prompt whose targets are ignored + 8 responses of 512 tokens). Hidden states are drawn
so the logits are peaked like a trained model's (the target takes about half the probability
mass), not near-uniform: a gradient filter that skips small probabilities (CCE) then does its
real work. Variants: our Triton kernels and our CUDA-extension backend (when built), each also with
``grad_in_forward`` (the scalar losses' gradients made in the forward, one recompute fewer), our chunked
PyTorch path, plain PyTorch on materialized logits, and where they import: Liger-Kernel (fused
linear cross-entropy, its chunked GRPO loss), Cut Cross-Entropy, verl's ``linear_cross_entropy``
(log-probs + entropy). A variant that cannot run an op is recorded as "not available" (with the
reason), one that runs out of memory as "OOM", never estimated. TFLOP/s counts useful work only:
``6 * T_valid * d * V`` (one logits pass and two gradient GEMMs over the valid rows), so a variant
that computes ignored rows is not credited for them.

CPU (``--device cpu``): peak extra memory (``benchmarks.common.PeakMemory``) of the fused
(chunked) path against the materialized logits at T = 2K, 4K and 16K, V = 152,064, d = 128,
fp32 (with backward up to ``--backward-max-tokens``, recomputing and with ``grad_in_forward``), one
run each (its seconds reported too). The materialized variant is the leanest possible one: the logits tensor plus a
row-chunked log-softmax (HF's loss would also allocate a second T x V copy), so the ratio is
a lower bound. A second table times the chunked path on an RL-shaped batch against a batch of its
valid rows alone (the time should follow the valid rows). ``--quick``: T = 256 and 512, V = 32,768.

Results: JSON + markdown + a plot under ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.common import (
    NOT_AVAILABLE,
    OOM,
    RESULTS_DIR,
    PeakMemory,
    environment,
    kernel_backend,
    memory_method,
    time_ms,
    write_results,
)

VOCAB = 152_064
DIM = 5120
IGNORE = -100
RESPONSES, RESPONSE_LEN = 8, 512
OPS = ("logprobs+entropy", "cross-entropy", "grpo_loss")
PEAK = 12.0  # target logit ~ PEAK above the others: p(target) ~ e^12 / (e^12 + V) ~ 0.5 at V = 152K


# ----------------------------------------------------------------------------- inputs
def make_inputs(tokens, dim, vocab, dtype, device, requires_grad, seed=0, valid=None, peaked=False):
    """hidden (T, d), weight (V, d), targets (T,): the first ``T - valid`` targets ignored (a prompt).

    ``peaked``: hidden = PEAK * w[target] / |w[target]|^2 + noise, so the target logit stands ~PEAK above
    the rest, as in a trained model (random hidden states give near-uniform logits). Drawn on ``device``:
    on the host, the 152K x 5120 weight alone takes seconds per draw, and every timed run draws afresh."""
    gen = torch.Generator(device=device).manual_seed(seed)
    weight = torch.randn(vocab, dim, generator=gen, device=device) / dim**0.5
    targets = torch.randint(0, vocab, (tokens,), generator=gen, device=device)
    hidden = torch.randn(tokens, dim, generator=gen, device=device) * 0.5
    if peaked:
        rows = weight[targets]
        hidden = hidden / dim**0.5 + PEAK * rows / rows.pow(2).sum(1, keepdim=True)
    if valid is not None:
        targets[: tokens - valid] = IGNORE
    hidden = hidden.to(dtype).requires_grad_(requires_grad)
    weight = weight.to(dtype).requires_grad_(requires_grad)
    return hidden, weight, targets


def policy_inputs(targets):
    """Advantages, old log-probs and the response mask of a GRPO micro-batch (deterministic)."""
    mask = targets != IGNORE
    advantages = torch.linspace(-1.0, 1.0, targets.shape[0], device=targets.device)
    old = torch.full(targets.shape, -0.7, device=targets.device)
    return advantages, old, mask


# ----------------------------------------------------------------------------- variants
def materialized_logprobs(hidden, weight, targets):
    """Plain PyTorch: the full logits, fp32 log-softmax, gather; ignored rows computed and masked."""
    log_probs = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
    mask = targets != IGNORE
    logp = log_probs.gather(1, targets.clamp(min=0)[:, None])[:, 0] * mask
    entropy = -(log_probs.exp() * log_probs).sum(-1) * mask
    return logp, entropy


def lean_materialized_cross_entropy(hidden, weight, targets, rows=128):
    """Smallest footprint a materialized approach can have: the logits, then log-softmax by rows."""
    logits = hidden @ weight.T
    total = logits.new_zeros((), dtype=torch.float32)
    for start in range(0, logits.shape[0], rows):
        block = logits[start : start + rows].float()
        total += (torch.logsumexp(block, dim=-1) - block.gather(1, targets[start : start + rows, None])[:, 0]).sum()
    return total / targets.numel()


def materialized(op):
    if op == "logprobs+entropy":
        return materialized_logprobs
    if op == "cross-entropy":
        return lambda hidden, weight, targets: F.cross_entropy((hidden @ weight.T).float(), targets,
                                                               ignore_index=IGNORE)

    def grpo(hidden, weight, targets):
        from qwenlong.kernels.logprobs.policy_math import aggregate_tokens, policy_loss_per_token

        logp, _ = materialized_logprobs(hidden, weight, targets)
        advantages, old, mask = policy_inputs(targets)
        per_token, _ = policy_loss_per_token(logp, old, advantages)
        return aggregate_tokens(per_token, mask)

    return grpo


def ours(backend, op, grad_in_forward=False):
    """Our op on ``backend``; ``grad_in_forward``: the scalar losses' gradients made in the forward."""
    from qwenlong.kernels import grpo_loss, linear_cross_entropy, linear_logprobs

    if grad_in_forward and op == "logprobs+entropy":
        return f"{NOT_AVAILABLE}: gradients in the forward need a scalar loss"

    def run(hidden, weight, targets):
        with kernel_backend(backend):  # the backward runs the path its forward chose
            if op == "logprobs+entropy":
                return linear_logprobs(hidden, weight, targets, return_entropy=True)
            if op == "cross-entropy":
                return linear_cross_entropy(hidden, weight, targets, grad_in_forward=grad_in_forward)
            return grpo_loss(hidden, weight, targets, *policy_inputs(targets), grad_in_forward=grad_in_forward)[0]

    return run


def liger(op):
    """Liger-Kernel: fused linear cross-entropy; its chunked GRPO loss (batch of one sequence)."""
    try:
        if op == "cross-entropy":
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE)
            return lambda hidden, weight, targets: _first(loss_fn(weight, hidden, targets))
        if op == "grpo_loss":
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

            loss_fn = LigerFusedLinearGRPOLoss(beta=0.0, epsilon_low=0.2, epsilon_high=0.28, temperature=1.0,
                                               use_ref_model=False)

            def grpo(hidden, weight, targets):
                advantages, old, mask = policy_inputs(targets)
                return _first(loss_fn(hidden[None], weight, targets.clamp(min=0)[None], mask[None].int(),
                                      advantages[None], old_per_token_logps=old[None]))

            return grpo
    except ImportError as error:
        return f"{NOT_AVAILABLE}: {error}"
    return f"{NOT_AVAILABLE}: no Liger kernel for {op} here"


def cut_cross_entropy(op):
    if op != "cross-entropy":
        return f"{NOT_AVAILABLE}: CCE computes cross-entropy only"
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as error:
        return f"{NOT_AVAILABLE}: {error}"
    return lambda hidden, weight, targets: linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE)


def verl(op):
    """verl's fused log-probs + entropy (no ignore index: every row computed, ignored ones masked after)."""
    if op != "logprobs+entropy":
        return f"{NOT_AVAILABLE}: verl's kernel gives log-probs + entropy only"
    try:
        from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy
    except ImportError as error:
        return f"{NOT_AVAILABLE}: {error}"

    def run(hidden, weight, targets):
        mask = targets != IGNORE
        logp, entropy = linear_cross_entropy(hidden, weight, targets.clamp(min=0), 1.0, "none")
        return logp * mask, entropy * mask

    return run


def gpu_variants(op, device="cuda"):
    from qwenlong.kernels.backend import interpreter_enabled
    from qwenlong.kernels.logprobs import cuda_backend

    on_gpu = device == "cuda"
    no_triton = None if on_gpu or interpreter_enabled() else f"{NOT_AVAILABLE}: needs a GPU (or TRITON_INTERPRET=1)"
    no_extension = None if on_gpu and cuda_backend.available() else f"{NOT_AVAILABLE}: not built (or no GPU)"
    # in the order they are measured for each (op, batch) (SECONDARY_VARIANTS after all the others'; see
    # measurement_order): a spent --budget cuts the last ones first
    return {
        "fused triton (ours)": no_triton or ours("triton", op),
        "liger": liger(op),
        "cut cross-entropy": cut_cross_entropy(op),
        "verl linear_cross_entropy": verl(op),
        "cuda extension (ours)": no_extension or ours("cuda", op),
        # the same kernels, one recompute fewer
        "cuda extension, grad in forward (ours)": no_extension or ours("cuda", op, grad_in_forward=True),
        "fused triton, grad in forward (ours)": no_triton or ours("triton", op, grad_in_forward=True),
        "materialized logits (torch)": materialized(op),
        "chunked torch (ours)": ours("torch", op),
    }


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _scalar(out):
    """A scalar to differentiate: a loss as is; (logp, entropy) as logp.sum() - 0.01 * entropy.sum()."""
    if isinstance(out, tuple):
        return out[0].sum() - 0.01 * out[1].sum()
    return out


# ----------------------------------------------------------------------------- measurement
def measure_speed(run, tokens, valid, shape) -> tuple[float, float]:
    """Peak extra MiB of one forward + backward, then its median ms over fresh inputs."""
    seeds = itertools.count(1)

    def fresh():
        return make_inputs(tokens, shape["d"], shape["V"], shape["dtype"], shape["device"], True, seed=next(seeds),
                           valid=valid, peaked=True)

    def step(hidden, weight, targets):
        _scalar(run(hidden, weight, targets)).backward()

    step(*fresh())  # warm-up: kernel compilation
    inputs = fresh()
    with PeakMemory(shape["device"]) as peak:
        step(*inputs)
    del inputs
    return peak.mib, round(time_ms(step, setup=fresh, device=shape["device"], warmup=0, repeats=shape["repeats"]), 2)


def speed_shapes(args) -> tuple[dict, list[tuple[str, int, int]]]:
    """The shape and the batches (label, T, T_valid): the issue's sizes on a GPU; tiny ones for
    ``--device cpu --speed`` (a smoke run of the same code)."""
    on_gpu = args.device == "cuda"
    shape = {"d": DIM if on_gpu else 64, "V": VOCAB if on_gpu else 4096,
             "dtype": torch.bfloat16 if on_gpu else torch.float32, "device": args.device, "repeats": args.repeats}
    responses = RESPONSES * RESPONSE_LEN if on_gpu else 128
    batches = [("valid rows alone", responses, responses)]
    for tokens in ([8192] if args.quick else [32_768, 122_880]) if on_gpu else [1024]:
        batches += [("all valid", tokens, tokens), ("RL-shaped", tokens, responses)]
    return shape, batches


BATCH_ORDER = ("all valid", "RL-shaped", "valid rows alone")


# measured after every other variant's rows: the materialized logits and our PyTorch path (which exists for
# machines without a GPU) take seconds a run at T = 32K on an H200, the time of many fused rows
SECONDARY_VARIANTS = ("materialized logits (torch)", "chunked torch (ours)")


def speed_plan(batches: list[tuple[str, int, int]]) -> list[tuple[str, tuple[str, int, int]]]:
    """(op, batch) pairs in the order they are measured, most informative first, so that a spent --budget cuts
    the least: every op at the smallest T (all valid rows, the RL-shaped batch, its valid rows alone; the RL
    op, log-probs + entropy, first), then the larger T."""
    smallest = min(tokens for label, tokens, _ in batches if label != "valid rows alone")
    return sorted(itertools.product(OPS, batches), key=lambda pair: (
        pair[1][1] > smallest, OPS.index(pair[0]), BATCH_ORDER.index(pair[1][0]), pair[1][1]))


def measurement_order(variant_names: list[str], batches: list[tuple[str, int, int]]) -> list[tuple]:
    """(op, batch, variant) in the order they are measured: the fused kernels and the peers over the whole
    :func:`speed_plan`, then the secondary variants over it."""
    plan = speed_plan(batches)
    return [(op, batch, variant) for secondary in (False, True) for op, batch in plan for variant in variant_names
            if (variant in SECONDARY_VARIANTS) == secondary]


def run_speed(args) -> list[dict]:
    rows = []
    shape, batches = speed_shapes(args)
    dim, vocab = shape["d"], shape["V"]
    deadline = time.perf_counter() + args.budget
    variants = {op: gpu_variants(op, args.device) for op in OPS}
    for op, (batch, tokens, valid), variant in measurement_order(list(variants[OPS[0]]), batches):
        run = variants[op][variant]
        row = {"op": op, "variant": variant, "batch": batch, "T": tokens, "T_valid": valid, "d": dim,
               "V": vocab, "dtype": str(shape["dtype"]).replace("torch.", "")}
        if isinstance(run, str):
            row["status"] = run
        elif time.perf_counter() > deadline:
            row["status"] = f"{NOT_AVAILABLE}: the --budget of {args.budget:.0f} s was spent"
        else:
            try:
                row["peak MiB"], row["fwd+bwd ms"] = measure_speed(run, tokens, valid, shape)
                row["useful TFLOP/s"] = round(6 * valid * dim * vocab / (row["fwd+bwd ms"] * 1e-3) / 1e12, 4)
                # beyond d(hidden) and d(weight), which every variant must return (in the inputs' dtype)
                gradients = (tokens + vocab) * dim * shape["dtype"].itemsize / 2**20
                row["extra MiB"] = round(row["peak MiB"] - gradients, 1)
                row["extra / logits tensor"] = round(row["extra MiB"] / (tokens * vocab * 2 / 2**20), 4)
            except torch.OutOfMemoryError:
                row["status"] = OOM
            except Exception as error:  # a baseline whose API moved: say why instead of a number
                row["status"] = f"{NOT_AVAILABLE}: {type(error).__name__}: {str(error)[:120]}"
        if args.device == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
        print(row, flush=True)
    return rows


def rl_shaped_vs_valid_rows(rows: list[dict], time_key: str) -> list[str]:
    """Per op and variant: each RL-shaped batch's time over the time of its valid rows alone (target <= 1.2x)."""
    alone = {(r.get("op"), r["variant"]): r.get(time_key) for r in rows if r["batch"] == "valid rows alone"}
    notes = []
    for row in rows:
        base = alone.get((row.get("op"), row["variant"]))
        if row["batch"] == "RL-shaped" and isinstance(row.get(time_key), float) and isinstance(base, float):
            notes.append(f"{row.get('op', 'log-probs + entropy')}, {row['variant']}, T={row['T']}: RL-shaped batch "
                         f"{row[time_key]:.4g} vs its {row['T_valid']} valid rows alone {base:.4g} "
                         f"({row[time_key] / base:.2f}x)")
    return notes


def run_cpu(args) -> list[dict]:
    """One run per variant and T, in this process: peak extra memory and seconds."""
    os.environ["QWENLONG_BACKEND"] = "torch"
    import qwenlong.kernels.logprobs  # noqa: F401  (imports are not the op's memory)

    vocab, dim = (32_768 if args.quick else VOCAB), 128
    rows = []
    for tokens in args.tokens or ([256, 512] if args.quick else [2048, 4096, 16384]):
        for variant in ("materialized logits (lean)", "fused chunked (ours)", "fused chunked (ours) +backward",
                        "fused chunked, grad in forward (ours) +backward"):
            backward = variant.endswith("+backward")
            if backward and tokens > args.backward_max_tokens:
                continue
            run = (lean_materialized_cross_entropy if variant.startswith("materialized")
                   else ours("torch", OPS[1], grad_in_forward="grad in forward" in variant))
            hidden, weight, targets = make_inputs(tokens, dim, vocab, torch.float32, "cpu", backward)
            with PeakMemory("cpu") as peak:
                start = time.perf_counter()
                loss = run(hidden, weight, targets)
                if backward:
                    loss.backward()
                seconds = time.perf_counter() - start
            del hidden, weight
            row = {"variant": variant, "T": tokens, "d": dim, "V": vocab, "dtype": "fp32", "peak MiB": peak.mib,
                   "seconds": round(seconds, 2), "tokens/s": round(tokens / seconds), "loss": round(float(loss), 5),
                   "logits tensor MiB": round(tokens * vocab * 4 / 2**20, 1)}
            rows.append(row)
            print(row, flush=True)
    return rows


def run_cpu_rl_shaped(args) -> list[dict]:
    """Chunked path, fwd+bwd of log-probs + entropy: an RL-shaped batch (long ignored prompt) against a batch
    of its valid rows alone; seconds are the median of 3 runs."""
    os.environ["QWENLONG_BACKEND"] = "torch"
    vocab, dim, valid = (8192, 64, 256) if args.quick else (32_768, 128, 1024)
    rows = []
    for batch, tokens in (("valid rows alone", valid), ("RL-shaped", 8 * valid), ("RL-shaped", 32 * valid)):
        run = ours("torch", OPS[0])

        def step(hidden, weight, targets, run=run):
            _scalar(run(hidden, weight, targets)).backward()

        seeds = itertools.count(1)
        seconds = time_ms(step, device="cpu", warmup=1, repeats=3, setup=lambda tokens=tokens, seeds=seeds: make_inputs(
            tokens, dim, vocab, torch.float32, "cpu", True, seed=next(seeds), valid=valid, peaked=True)) / 1e3
        row = {"variant": "chunked torch (ours)", "batch": batch, "T": tokens, "T_valid": valid, "d": dim, "V": vocab,
               "fwd+bwd seconds": round(seconds, 3)}
        rows.append(row)
        print(row, flush=True)
    return rows


def run_cpu_grad_in_forward(args) -> list[dict]:
    """Chunked path, cross-entropy fwd+bwd with one recompute and with the gradients made in the forward, at a
    width where the GEMMs are most of the work (d = 1024); seconds are the median of 3 runs."""
    os.environ["QWENLONG_BACKEND"] = "torch"
    tokens, dim, vocab = (512, 1024, 8192) if args.quick else (2048, 1024, 32_768)
    rows = []
    for grad_in_forward in (False, True):
        run = ours("torch", OPS[1], grad_in_forward=grad_in_forward)

        def step(hidden, weight, targets, run=run):
            run(hidden, weight, targets).backward()

        seeds = itertools.count(1)
        seconds = time_ms(step, device="cpu", warmup=1, repeats=3, setup=lambda seeds=seeds: make_inputs(
            tokens, dim, vocab, torch.float32, "cpu", True, seed=next(seeds), peaked=True)) / 1e3
        row = {"variant": "chunked torch, grad in forward (ours)" if grad_in_forward else "chunked torch (ours)",
               "GEMM FLOPs": f"{6 if grad_in_forward else 8} T d V", "T": tokens, "d": dim, "V": vocab,
               "fwd+bwd seconds": round(seconds, 3)}
        rows.append(row)
        print(row, flush=True)
    return rows


def forward_memory_ratios(rows: list[dict]) -> list[str]:
    """Materialized over fused peak memory (forward) per T, as notes."""
    by_key = {(row["variant"], row["T"]): row["peak MiB"] for row in rows}
    return [f"T={t}: materialized / fused forward peak memory = "
            f"{by_key[('materialized logits (lean)', t)] / by_key[('fused chunked (ours)', t)]:.1f}x"
            for t in sorted({row["T"] for row in rows})]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="GPU: one size; CPU: T 256/512, V 32K")
    parser.add_argument("--tokens", type=int, nargs="+", help="CPU: the T values")
    parser.add_argument("--backward-max-tokens", type=int, default=4096, help="CPU: largest T run with backward")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=float("inf"),
                        help="speed mode: seconds after which no new row starts (the rest say so)")
    parser.add_argument("--speed", action="store_true",
                        help="CPU: run the GPU benchmark's code at tiny sizes (a smoke test of the script)")
    parser.add_argument("--out", default=str(RESULTS_DIR), help="results directory")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: use --device cpu")
    if args.device == "cpu" and not args.speed:
        rows = run_cpu(args)
        rl_rows = run_cpu_rl_shaped(args)
        loss_rows = run_cpu_grad_in_forward(args)
        tables = {"RL-shaped batch vs its valid rows alone (chunked torch path, fwd+bwd, log-probs + entropy)":
                  rl_rows,
                  "gradients in the forward vs one recompute (chunked torch path, cross-entropy fwd+bwd)": loss_rows}
        recompute, in_forward = (row["fwd+bwd seconds"] for row in loss_rows)
        notes = forward_memory_ratios(rows) + rl_shaped_vs_valid_rows(rl_rows, "fwd+bwd seconds") + [
            f"cross-entropy with its gradients made in the forward: {in_forward / recompute:.2f}x the time of the "
            f"recomputing path (6 vs 8 T d V GEMM FLOPs: 0.75x; the recompute's exponentials go too)"]
        plot = {"x": "T", "series": ["variant"], "metrics": ["peak MiB", "tokens/s"]}
        setup = {"mode": "memory: one run per variant and T", "peak memory": memory_method("cpu")}
    else:
        rows = run_speed(args)
        tables = None
        notes = rl_shaped_vs_valid_rows(rows, "fwd+bwd ms") + [
            "useful TFLOP/s = 6 T_valid d V / time: ignored rows a variant computes are not credited",
            "extra MiB: peak MiB less the d(hidden) and d(weight) every variant returns; extra / logits tensor: "
            "that over one bf16 T x V logits tensor (target <= 1%)"]
        plot = {"x": "T", "series": ["op", "variant", "batch"], "metrics": ["useful TFLOP/s", "peak MiB"]}
        setup = {"mode": "speed and memory", "timing": f"median of {args.repeats} runs on fresh inputs after a "
                 "warm-up", "peak memory": memory_method(args.device), "logits": f"peaked (target logit ~{PEAK} "
                 "above the rest)"}
    memory_mode = args.device == "cpu" and not args.speed
    bench = "logprobs-memory" if memory_mode else "logprobs" if args.device == "cuda" else "logprobs-speed-smoke"
    title = "Fused LM-head cross-entropy" if memory_mode else "Fused LM-head ops: log-probs, CE, GRPO"
    write_results(bench, title, rows, setup=setup, out_dir=args.out, env=environment(), notes=notes, plot=plot,
                  tables=tables)
    return 0


if __name__ == "__main__":
    sys.exit(main())
