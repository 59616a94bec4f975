"""Work meter of the fused LM-head ops: FLOPs, bytes and programs issued, against the op's minimum.

Each op runs forward + backward at small shapes (Triton kernels under the CPU interpreter, and the
chunked PyTorch path), counted by :mod:`benchmarks.work.counting`, on two batches with the same
number of valid rows: all rows valid, and RL-shaped (most rows an ignored prompt). The minimum of an
op is what any implementation must do:

- FLOPs: ``2 * T_valid * d * V`` per GEMM pass; forward + backward needs three passes (logits,
  d(hidden), d(weight)): ``6 T_valid d V``. A design that recomputes the logits once in backward
  issues ``8 T_valid d V`` (the issue's budget), so both ratios are reported;
- bytes: inputs and outputs once: valid hidden rows and the weight read, every per-token value
  read or written once, d(hidden) (all T rows) and d(weight) written.

:func:`triton_closed_form` gives the Triton kernels' FLOPs, bytes and programs as a formula of
(T, T_valid, d, V, dtype) (tested equal to the count at small shapes in ``tests/test_logprobs_work.py``);
the meter evaluates it at the 120K shapes the kernels exist for. :func:`chunked_closed_form_flops` does
the same for the chunked PyTorch path's GEMMs.

    python -m benchmarks --only work          # every meter; this one writes *-work-lm-head.{json,md}
"""

from __future__ import annotations

import argparse
import importlib
import sys

import torch

from benchmarks.common import RESULTS_DIR, environment, kernel_backend, write_results
from benchmarks.work.counting import count_work, counting, require_interpreter

IGNORE = -100
BIG = {"T": 122_880, "d": 5120, "V": 152_064, "dtype": torch.bfloat16}
RL_VALID = 8 * 512  # one 116K-token prompt + 8 responses of 512 tokens
SM90 = 90  # the closed form's default tile table: an H100/H200's (kernels.backend.tile_table)
# (op name, forward flags (entropy, mean), backward gradients (logp, entropy, mean))
OPS = {
    "logprobs+entropy": ((True, False), (True, True, False)),
    "cross-entropy": ((False, False), (True, False, False)),
    "cross-entropy (label smoothing)": ((False, True), (True, False, True)),
    "grpo_loss": ((False, False), (True, False, False)),
    "cross-entropy, grad in forward": ((False, False), (True, False, False)),
    "grpo_loss, grad in forward": ((False, False), (True, False, False)),
}


def kernel_module():
    """The module of the Triton kernels (the package exports a function of the same name)."""
    return importlib.import_module("qwenlong.kernels.logprobs.linear_logprobs")


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _up(a: int, b: int) -> int:
    return _ceil(a, b) * b


def triton_closed_form(num_tokens, num_valid, dim, vocab, dtype, *, with_entropy=False, with_mean=False,
                       grad_entropy=False, grad_mean=False, needs_hidden=True, needs_weight=True,
                       grad_in_forward=False, table=SM90) -> dict:
    """FLOPs, bytes loaded / stored and programs of the Triton kernels (forward + backward), from the
    tile and chunk sizes of :mod:`qwenlong.kernels.logprobs.linear_logprobs` (PyTorch ops not included)
    under the tile table ``table`` (90: sm_90; 80: every other GPU and the interpreter).

    ``grad_in_forward``: the scalar-loss path (:func:`fused_linear_loss`): the forward runs per logits
    chunk and keeps the fp32 logits, dz is read from them (no recompute); the output-gradient flags
    are then the forward's."""
    lp = kernel_module()
    c = lp.block_config(dim, dtype, table)
    size = torch.tensor([], dtype=dtype).element_size()
    # the gradients' dtype: the inputs', but fp32 for fp16 made in the forward (kept unscaled until backward)
    grad_size = 4 if grad_in_forward and dtype == torch.float16 else size
    bt, bv, bd, bm, bn, bk = (c[k] for k in ("BLOCK_T", "BLOCK_V", "BLOCK_D", "BLOCK_M", "BLOCK_N", "BLOCK_K"))
    out = {"flops": 0, "bytes_loaded": 0, "bytes_stored": 0, "programs": 0}

    def add(**amounts):
        for key, value in amounts.items():
            out[key] += value

    def forward(launched_tiles, rows):
        """``launched_tiles`` token tiles x vocabulary slices of programs over ``rows`` valid rows (programs
        past them read the count and return), then the slice merge over the same positions."""
        bt = c["BLOCK_T_KEEP_LOGITS"] if grad_in_forward else c["BLOCK_T"]
        tiles = _ceil(rows, bt)
        splits, _ = lp.vocab_slices(vocab, bv)
        grid = launched_tiles * splits
        partial_bytes = 4 * rows * splits * (3 + with_entropy + with_mean)  # max, sum, target (+ entropy, mean)
        add(programs=grid, bytes_loaded=8 * grid)
        add(flops=2 * tiles * bt * _up(vocab, bv) * _up(dim, bd),
            bytes_loaded=16 * rows * splits + _ceil(vocab, bv) * rows * dim * size + tiles * vocab * dim * size,
            bytes_stored=partial_bytes + grad_in_forward * tiles * bt * vocab * 4)
        merge_grid = _ceil(launched_tiles * bt, lp.COMBINE_BLOCK)
        add(programs=merge_grid, bytes_loaded=8 * merge_grid + 8 * rows + partial_bytes,
            bytes_stored=4 * rows * (2 + with_entropy + with_mean))

    if grad_in_forward:
        chunk_rows = min(lp.LOGITS_TOKEN_CHUNK, _up(num_tokens, bm))
        grad_entropy, grad_mean = with_entropy, with_mean
    else:
        forward(_ceil(num_tokens, bt), num_valid)
        chunk_rows = min(lp.TOKEN_CHUNK, _up(num_tokens, bm))
    # per (token chunk, vocabulary chunk) of the compacted rows
    chunk_cols = min(lp.VOCAB_CHUNK, _up(vocab, bv))
    per_row = 8 + 8 + 4 + 4 + 8 * grad_entropy + 4 * grad_mean  # order, target, lse, g_logp, (H, g_H), (g_mean)
    dh_tiles = _ceil(dim, bn)
    # only the token chunks with valid rows (their count copied to the host behind the compaction); the
    # grad-in-forward path always runs its first chunk (if any), before it reads the count
    visited_rows = max(num_valid, min(num_tokens, chunk_rows) if grad_in_forward else 0)
    for token_start in range(0, visited_rows, chunk_rows):
        rows = max(0, min(chunk_rows, num_valid - token_start))
        if grad_in_forward:
            forward(chunk_rows // c["BLOCK_T_KEEP_LOGITS"], rows)
        for vocab_start in range(0, vocab, chunk_cols):
            cols = min(chunk_cols, vocab - vocab_start)
            grid = chunk_rows // bt * _ceil(cols, bv)
            active = _ceil(rows, bt) * _ceil(cols, bv)
            add(programs=grid, bytes_loaded=8 * grid, bytes_stored=active * bt * bv * size)
            if grad_in_forward:  # dz from the kept logits
                add(bytes_loaded=_ceil(cols, bv) * rows * per_row + rows * cols * 4)
            else:  # dz from recomputed logits
                add(flops=2 * active * bt * bv * _up(dim, bd),
                    bytes_loaded=_ceil(cols, bv) * rows * (dim * size + per_row) + _ceil(rows, bt) * cols * dim * size)
            # each gradient is summed in fp32 and stored in grad_size at its last step: d(hidden) rows (at their
            # own indices, read from `order`) at the last vocabulary chunk, d(weight) rows at the last token chunk
            if needs_hidden:
                grid, active = chunk_rows // bm * dh_tiles, _ceil(rows, bm) * dh_tiles
                final = vocab_start + chunk_cols >= vocab
                add(programs=grid, bytes_loaded=8 * grid)
                add(flops=2 * active * bm * bn * _up(cols, bk),
                    bytes_loaded=final * dh_tiles * 8 * rows + dh_tiles * _ceil(rows, bm) * bm * cols * size
                    + _ceil(rows, bm) * cols * dim * size + (vocab_start > 0) * rows * dim * 4,
                    bytes_stored=rows * dim * (grad_size if final else 4))
            if needs_weight:
                grid = _ceil(cols, bm) * dh_tiles
                final = token_start + chunk_rows >= num_valid
                add(programs=grid, bytes_loaded=8 * grid)
                if rows:
                    add(flops=2 * grid * bm * bn * _up(rows, bk),
                        bytes_loaded=grid * 8 * rows + dh_tiles * rows * cols * size
                        + _ceil(cols, bm) * rows * dim * size + (token_start > 0) * cols * dim * 4,
                        bytes_stored=cols * dim * (grad_size if final else 4))
    return out


def backward_buffer_bytes(num_tokens, num_valid, dim, vocab, dtype, table=SM90) -> int:
    """Bytes the recomputing backward (:class:`_TritonLinearStats`) allocates beyond its two gradients (d(hidden),
    d(weight) in the input dtype, which every implementation returns), all alive at its peak: the dz chunk
    buffer, fp32 sums of d(hidden) for the valid rows when V spans several vocabulary chunks, fp32 sums of one
    vocabulary chunk of d(weight) when the valid rows span several token chunks, and the fp32 zeros standing in
    for an output gradient that is not given. Tested equal to the held bytes counted under the interpreter."""
    lp = kernel_module()
    c = lp.block_config(dim, dtype, table)
    chunk_rows = lp._chunk_rows(num_tokens, lp.TOKEN_CHUNK, c)
    chunk_cols = min(lp.VOCAB_CHUNK, _up(vocab, c["BLOCK_V"]))
    held = 4 * num_tokens + chunk_rows * chunk_cols * dtype.itemsize
    if vocab > chunk_cols:
        held += 4 * num_valid * dim
    if num_valid > chunk_rows:
        held += 4 * chunk_cols * dim
    return held


def backward_held_bytes(path, num_tokens, num_valid, dim, vocab, dtype) -> int:
    """Counted: the most bytes the backward of log-probs + entropy holds at once beyond its two gradients (both
    output gradients given, made before it; :mod:`benchmarks.work.counting` follows the storage)."""
    from qwenlong.kernels import linear_logprobs

    hidden, weight, targets = _inputs(num_tokens, num_valid, dim, vocab, dtype)
    with kernel_backend(path):
        logp, entropy = linear_logprobs(hidden, weight, targets, 0.9, return_entropy=True)
        grad_outputs = torch.ones_like(logp), torch.full_like(entropy, -0.1)
        with counting() as work:
            grads = torch.autograd.grad((logp, entropy), (hidden, weight), grad_outputs)
    return work.peak_held - sum(g.numel() * g.element_size() for g in grads)


def forward_busy_programs(num_valid, dim, vocab, dtype, grad_in_forward=False, table=SM90) -> int:
    """Programs of one forward launch that have valid rows (token tiles x vocabulary slices): what keeps the
    GPU's SMs busy when only a few rows are valid (132 SMs on an H100)."""
    lp = kernel_module()
    c = lp.block_config(dim, dtype, table)
    rows = min(num_valid, lp.LOGITS_TOKEN_CHUNK) if grad_in_forward else num_valid
    block_t = c["BLOCK_T_KEEP_LOGITS"] if grad_in_forward else c["BLOCK_T"]
    return _ceil(rows, block_t) * lp.vocab_slices(vocab, c["BLOCK_V"])[0]


def chunked_closed_form_flops(num_valid, dim, vocab, backward=True, grad_in_forward=False) -> int:
    """GEMM FLOPs of the chunked PyTorch path: valid rows in zero-padded TOKEN_CHUNK blocks, one pass
    forward, three backward (recompute, d(hidden), d(weight)), or two when the gradients are made in the forward
    from kept logits (its KEPT_ROWS chunks are whole TOKEN_CHUNK blocks: the same padding)."""
    from qwenlong.kernels.logprobs import chunked

    passes = 1 + (0 if not backward else 2 if grad_in_forward else 3)
    return 2 * _up(num_valid, chunked.TOKEN_CHUNK) * dim * vocab * passes


def minimum(num_tokens, num_valid, dim, vocab, size, outputs=1, grads_in=1) -> dict:
    """The op's minimum work, forward + backward: 3 GEMM passes over the valid rows; inputs and outputs once."""
    return {
        "flops": 6 * num_valid * dim * vocab,
        "bytes": (num_valid * dim + vocab * dim) * size + num_tokens * (8 + 4 * outputs + 4 * grads_in)
        + (num_tokens * dim + vocab * dim) * size,
    }


def _inputs(num_tokens, num_valid, dim, vocab, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, dim, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=gen) / dim**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (num_tokens,), generator=gen)
    targets[: num_tokens - num_valid] = IGNORE  # the prompt comes first
    return hidden, weight, targets


def run_op(op: str, hidden, weight, targets) -> None:
    """Forward + backward of one op (gradients of hidden and weight)."""
    from qwenlong.kernels import grpo_loss, linear_cross_entropy, linear_logprobs

    if op == "logprobs+entropy":
        logp, entropy = linear_logprobs(hidden, weight, targets, 0.9, return_entropy=True)
        loss = (logp - 0.1 * entropy).sum()
    elif op.startswith("cross-entropy"):
        loss = linear_cross_entropy(hidden, weight, targets, label_smoothing=0.1 if "smoothing" in op else 0.0,
                                    grad_in_forward="grad in forward" in op)
    else:
        mask = targets != IGNORE
        num = hidden.shape[0]
        old = torch.full((num,), -3.0)
        loss, _ = grpo_loss(hidden, weight, targets, torch.linspace(-1, 1, num), old, mask,
                            grad_in_forward="grad in forward" in op)
    loss.backward()


def measure(op, path, num_tokens, num_valid, dim, vocab, dtype) -> dict:
    hidden, weight, targets = _inputs(num_tokens, num_valid, dim, vocab, dtype)
    with kernel_backend(path):  # the next meter in this process (attention) counts its Triton kernels
        work = count_work(run_op, op, hidden, weight, targets)
    kernels = [name for name in work.by_kernel if not name.startswith("aten.")]
    kernel_flops = sum(work.by_kernel[k].flops for k in kernels)
    size = hidden.element_size()
    (with_entropy, _), (_, grad_entropy, _) = OPS[op]
    floor = minimum(num_tokens, num_valid, dim, vocab, size, outputs=1 + with_entropy, grads_in=1 + grad_entropy)
    moved = work.bytes_loaded + work.bytes_stored
    return {"op": op, "path": path, "T": num_tokens, "T_valid": num_valid, "d": dim, "V": vocab,
            "dtype": str(dtype).replace("torch.", ""), "FLOPs": work.flops, "FLOPs / 6TdV": work.flops / floor["flops"],
            "bytes": moved, "bytes / min": moved / floor["bytes"],
            "torch-op FLOPs": work.flops - kernel_flops, "programs": work.programs, "launches": work.launches}


def closed_form_rows() -> list[dict]:
    """The Triton kernels' closed form at the 120K shapes: all-valid and RL-shaped batches."""
    rows = []
    dim, vocab, dtype = BIG["d"], BIG["V"], BIG["dtype"]
    lp = kernel_module()
    config = lp.block_config(dim, dtype, SM90)
    bv, bm = config["BLOCK_V"], config["BLOCK_M"]
    for op, ((with_entropy, with_mean), (_, grad_entropy, grad_mean)) in OPS.items():
        for label, num_tokens, num_valid in (("all valid", RL_VALID, RL_VALID), ("RL-shaped", BIG["T"], RL_VALID),
                                             ("all valid", BIG["T"], BIG["T"])):
            work = triton_closed_form(num_tokens, num_valid, dim, vocab, dtype, with_entropy=with_entropy,
                                      with_mean=with_mean, grad_entropy=grad_entropy, grad_mean=grad_mean,
                                      grad_in_forward="grad in forward" in op)
            floor = minimum(num_tokens, num_valid, dim, vocab, 2, 1 + with_entropy, 1 + grad_entropy)
            rows.append({"op": op, "batch": label, "T": num_tokens, "T_valid": num_valid,
                         "FLOPs": work["flops"], "FLOPs / 6TdV": work["flops"] / floor["flops"],
                         "FLOPs / 8TdV": work["flops"] / (floor["flops"] * 8 / 6),
                         "issued load+store TB": (work["bytes_loaded"] + work["bytes_stored"]) / 1e12,
                         "d(hidden) writes / element": _ceil(vocab, min(lp.VOCAB_CHUNK, _up(vocab, bv))),
                         "d(weight) writes / element": _ceil(num_valid, min(_up(num_tokens, bm), (
                             lp.LOGITS_TOKEN_CHUNK if "grad in forward" in op else lp.TOKEN_CHUNK))),
                         "programs": work["programs"],
                         "forward programs with rows / launch": forward_busy_programs(num_valid, dim, vocab, dtype,
                                                                                      "grad in forward" in op),
                         "chunked torch FLOPs / 6TdV": chunked_closed_form_flops(
                             num_valid, dim, vocab, grad_in_forward="grad in forward" in op) / floor["flops"]})
            if "grad in forward" not in op:  # the recomputing backward's buffers (see backward_buffer_bytes)
                held = backward_buffer_bytes(num_tokens, num_valid, dim, vocab, dtype)
                rows[-1] |= {"backward buffers GiB": held / 2**30,
                             "backward buffers / bf16 logits": held / (2 * num_tokens * vocab)}
    return rows


def backward_memory_rows(shapes, dim, vocab) -> list[dict]:
    """Counted backward memory beyond the gradients (log-probs + entropy), both paths, with the closed form."""
    rows = []
    for num_tokens, num_valid in shapes:
        for path in ("triton", "torch"):
            row = {"path": path, "T": num_tokens, "T_valid": num_valid, "d": dim, "V": vocab,
                   "held beyond gradients (bytes)": backward_held_bytes(path, num_tokens, num_valid, dim, vocab,
                                                                         torch.bfloat16)}
            if path == "triton":
                row["closed form (bytes)"] = backward_buffer_bytes(num_tokens, num_valid, dim, vocab, torch.bfloat16,
                                                                   table=80)
            rows.append(row)
            print(row, flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small shape")
    parser.add_argument("--out", default=str(RESULTS_DIR), help="results directory")
    args = parser.parse_args(argv)
    require_interpreter()
    from qwenlong.kernels.utils.interpreter import install_interpreter_fixes

    install_interpreter_fixes()
    dim, vocab = 32, 300
    shapes = [(64, 64), (256, 64)] if args.quick else [(128, 128), (512, 128)]  # (T, T_valid): all valid, RL-shaped
    rows = []
    for op in OPS:
        for path in ("triton", "torch"):
            for num_tokens, num_valid in shapes:
                row = measure(op, path, num_tokens, num_valid, dim, vocab, torch.bfloat16)
                rows.append(row)
                print(row, flush=True)
    big = closed_form_rows()
    memory = backward_memory_rows(shapes, dim, vocab)
    notes = [
        "FLOPs and bytes are issued work (tl.dot operand shapes, masked tl.load/tl.store bytes, PyTorch ops "
        "reading inputs and writing outputs once), not HBM traffic: loads served by L2 count too.",
        "Minimum: 6 T_valid d V FLOPs (logits, d(hidden), d(weight) once each); the one-recompute design "
        "issues 8 T_valid d V, so FLOPs / 6TdV ~ 1.33 is its floor. Bytes minimum: valid hidden rows and the "
        "weight read once, d(hidden) (all rows) and d(weight) written once, per-token values once. Any tiled "
        "GEMM issues far more loads than that (each operand tile is re-read per output tile, mostly from L2), "
        "so bytes / min measures tile reuse, not HBM traffic.",
        "d(hidden) / d(weight) writes per element: how often the fp32 gradient buffers are read and rewritten "
        "(once per vocabulary chunk / per token chunk of valid rows; the previous kernels did it per tile: "
        "V/128 = 1,188 and T/64 = 1,920 times at these shapes).",
        "RL-shaped: one long ignored prompt + responses; the same number of valid rows as the all-valid batch. "
        "Only the token chunks that hold valid rows run (the count is copied to the host behind the compaction); "
        "every chunk of T ran before: 3,304,320 programs for the RL batch's log-probs + entropy, 4,729,920 with "
        "grad in forward.",
        "Forward programs with rows / launch: token tiles of valid rows x vocabulary slices (VOCAB_SPLITS); "
        "without slices an RL batch's 4,096 valid rows were 32 programs, a quarter of an H100's 132 SMs.",
        "grad in forward: the scalar-loss option (linear_cross_entropy / grpo_loss grad_in_forward=True): the "
        "forward keeps each chunk's fp32 logits (LOGITS_TOKEN_CHUNK x V) and makes the gradients from them, "
        "6 T_valid d V FLOPs; loss.backward() only scales them.",
        "Backward buffers: what the recomputing backward holds at once beyond d(hidden) and d(weight) (bf16, which "
        "every implementation returns): fp32 sums of d(hidden) for the valid rows and of one 8,192-row vocabulary "
        "chunk of d(weight), the dz chunk buffer and a per-token vector; counted at small shapes (the memory table, "
        "equal to the closed form for the Triton path) and given by the closed form at 120K shapes. Before, the "
        "backward summed d(hidden) of every row (4 T d bytes) and the whole d(weight) (4 V d) in fp32: 5.3 GiB "
        "here, RL-shaped or not.",
        "Closed form (120K shapes): Triton kernels only, bf16, the tile and chunk sizes of "
        "kernels/logprobs/linear_logprobs.py for sm_90 (its tile table); equal to the interpreter's count at small "
        "shapes with either tile table (tests/test_logprobs_work.py). The counted rows above run the interpreter's "
        "own table (80).",
    ]
    setup = {"counted shapes": f"d={dim}, V={vocab}, bf16, (T, T_valid) in {shapes}",
             "closed form shapes": f"T={BIG['T']} (RL: {RL_VALID} valid) and all-valid, d={BIG['d']}, V={BIG['V']}",
             "hook": "benchmarks/work/counting.py (Triton interpreter + TorchDispatchMode)"}
    write_results("work-lm-head", "LM-head work meter: issued work / the op's minimum", rows, setup=setup,
                  out_dir=args.out, env=environment(), notes=notes,
                  tables={"closed form at 120K shapes": big,
                          "backward memory beyond the gradients (log-probs + entropy, counted)": memory})
    return 0


if __name__ == "__main__":
    sys.exit(main())
