"""Work the fused LM-head ops issue, counted under the Triton interpreter (benchmarks/work/counting.py):
ignored rows cost no GEMM work on either path, and the meter's closed form equals the count."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/ is not an installed package

from benchmarks.work import lm_head  # noqa: E402
from benchmarks.work.counting import count_work, interpreter_active  # noqa: E402
from qwenlong.kernels.logprobs import chunked  # noqa: E402

pytestmark = pytest.mark.skipif(not interpreter_active(), reason="counts only under TRITON_INTERPRET=1")


def _count(monkeypatch, path, op, num_tokens, num_valid, dim, vocab, dtype, torch_ops=True):
    monkeypatch.setenv("QWENLONG_BACKEND", path)
    hidden, weight, targets = lm_head._inputs(num_tokens, num_valid, dim, vocab, dtype, seed=num_tokens)
    return count_work(lm_head.run_op, op, hidden, weight, targets, torch_ops=torch_ops)


@pytest.mark.parametrize("path", ["triton", "torch"])
@pytest.mark.parametrize("op", ["logprobs+entropy", "grpo_loss"])
def test_ignored_rows_cost_no_gemm_work(monkeypatch, path, op):
    """A batch of 40 valid rows behind a 200-row ignored prompt issues the FLOPs of the 40 rows alone."""
    all_valid = _count(monkeypatch, path, op, 40, 40, 32, 300, torch.float32)
    rl_shaped = _count(monkeypatch, path, op, 240, 40, 32, 300, torch.float32)
    assert all_valid.flops > 0 and rl_shaped.flops == all_valid.flops
    if path == "triton":  # fwd + one recompute + two gradient GEMMs: 8 T_valid d V, up to tile padding
        minimum = 8 * 40 * 32 * 300
        assert minimum <= rl_shaped.flops <= minimum * (64 / 40) * (384 / 300)


@pytest.mark.parametrize("op", ["cross-entropy", "cross-entropy, grad in forward", "grpo_loss, grad in forward"])
def test_chunked_path_issues_its_closed_form(monkeypatch, op):
    """The chunked PyTorch path's GEMM FLOPs, counted, are its closed form: 8 T_valid d V recomputing, 6 with the
    gradients made in the forward (here over three chunks of kept logits), up to the padding of 256-row tiles."""
    monkeypatch.setattr(chunked, "KEPT_ROWS", 256)
    work = _count(monkeypatch, "torch", op, 900, 600, 32, 300, torch.float32)
    expected = lm_head.chunked_closed_form_flops(600, 32, 300, grad_in_forward="grad in forward" in op)
    assert work.flops == expected == 2 * 768 * 32 * 300 * (3 if "grad in forward" in op else 4)


@pytest.mark.parametrize("table", [80, 90])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("op", "chunks"), [("logprobs+entropy", None), ("cross-entropy (label smoothing)", None),
                                             ("grpo_loss", (128, 256)), ("logprobs+entropy", (128, 256)),
                                             ("grpo_loss, grad in forward", None),
                                             ("cross-entropy, grad in forward", (128, 256))])
def test_closed_form_equals_the_count(monkeypatch, op, chunks, dtype, table):
    """FLOPs, bytes loaded and stored, and programs of the Triton kernels, with one or several chunks, under
    either tile table (sm_90's keeps the logits of 128-row tiles through a descriptor)."""
    kernels = lm_head.kernel_module()
    monkeypatch.setattr(kernels, "tile_table", lambda device: table)
    if chunks:
        monkeypatch.setattr(kernels, "TOKEN_CHUNK", chunks[0])
        monkeypatch.setattr(kernels, "LOGITS_TOKEN_CHUNK", chunks[0])
        monkeypatch.setattr(kernels, "VOCAB_CHUNK", chunks[1])
    num_tokens, num_valid, dim, vocab = 200, 70, 40, 300
    work = _count(monkeypatch, "triton", op, num_tokens, num_valid, dim, vocab, dtype, torch_ops=False)
    (with_entropy, with_mean), (_, grad_entropy, grad_mean) = lm_head.OPS[op]
    in_forward = "grad in forward" in op
    expected = lm_head.triton_closed_form(num_tokens, num_valid, dim, vocab, dtype, with_entropy=with_entropy,
                                          with_mean=with_mean, grad_entropy=grad_entropy, grad_mean=grad_mean,
                                          grad_in_forward=in_forward, table=table)
    assert {key: getattr(work, key) for key in expected} == expected
    token_chunks = -(-num_tokens // kernels.TOKEN_CHUNK) if chunks else 1
    valid_chunks = -(-num_valid // kernels.TOKEN_CHUNK) if chunks else 1
    vocab_chunks = -(-vocab // kernels.VOCAB_CHUNK) if chunks else 1
    # a forward is two launches (the sliced forward and its merge), a vocabulary chunk of backward three; both
    # paths visit only the token chunks with valid rows (of the 200 rows' token_chunks)
    assert work.launches == valid_chunks * (2 * in_forward + 3 * vocab_chunks) + 2 * (not in_forward)
    assert valid_chunks < token_chunks or not chunks


@pytest.mark.parametrize("op", ["logprobs+entropy", "grpo_loss, grad in forward"])
def test_only_the_chunks_with_valid_rows_run(monkeypatch, op):
    """With 64-row token chunks, 40 valid rows behind a 600-row ignored prompt: the gradient kernels run once,
    with the programs of the 40 rows alone (all ten chunks ran before), as does the grad-in-forward path's
    chunked forward."""
    kernels = lm_head.kernel_module()
    monkeypatch.setattr(kernels, "TOKEN_CHUNK", 64)
    monkeypatch.setattr(kernels, "LOGITS_TOKEN_CHUNK", 64)
    all_valid = _count(monkeypatch, "triton", op, 40, 40, 32, 300, torch.float32)
    rl_shaped = _count(monkeypatch, "triton", op, 640, 40, 32, 300, torch.float32)
    chunked = ["_dlogits_kernel", "_grad_hidden_kernel", "_grad_weight_kernel"]
    chunked += ["_forward_kernel", "_combine_kernel"] if "in forward" in op else []
    assert [rl_shaped.by_kernel[name].launches for name in chunked] == [1] * len(chunked)
    assert [rl_shaped.by_kernel[name].programs for name in chunked] == [
        all_valid.by_kernel[name].programs for name in chunked
    ]
    assert rl_shaped.launches == all_valid.launches


def test_gradients_in_forward_issue_six_gemm_passes(monkeypatch):
    """The scalar-loss path: 6 T_valid d V FLOPs (up to tile padding), against 8 with the recompute."""
    plain = _count(monkeypatch, "triton", "grpo_loss", 240, 64, 32, 256, torch.float32)
    fused = _count(monkeypatch, "triton", "grpo_loss, grad in forward", 240, 64, 32, 256, torch.float32)
    assert fused.flops == 6 * 64 * 32 * 256 and plain.flops == 8 * 64 * 32 * 256


def test_closed_form_meets_the_flop_budget_at_120k():
    """At T = 122,880, d = 5120, V = 152,064: fwd + bwd within the one-recompute budget 8 T_valid d V
    (+2% tile padding), on the RL-shaped batch and on all-valid rows."""
    for row in lm_head.closed_form_rows():
        assert row["FLOPs / 8TdV"] <= 1.02, row



def test_forward_fills_the_gpu_on_an_rl_batch():
    """The forward's vocabulary slices: an RL batch's 4,096 valid rows (32 token tiles) keep at least an
    H100's 132 SMs busy; without slices they were 32 programs."""
    rows = lm_head.closed_form_rows()
    rl = [row for row in rows if row["batch"] == "RL-shaped" and "grad in forward" not in row["op"]]
    assert rl and all(row["forward programs with rows / launch"] >= 132 for row in rl)


@pytest.mark.parametrize("chunks", [None, (128, 256)])
@pytest.mark.parametrize(("num_tokens", "num_valid"), [(200, 200), (500, 150), (300, 300)])
def test_backward_memory_equals_its_closed_form(monkeypatch, chunks, num_tokens, num_valid):
    """The recomputing backward holds, beyond its two gradients, exactly the closed form's buffers (counted storage,
    one or several token and vocabulary chunks): fp32 sums of d(hidden) for the valid rows and of one vocabulary
    chunk of d(weight), the dz chunk and a per-token vector."""
    kernels = lm_head.kernel_module()
    monkeypatch.setattr(kernels, "tile_table", lambda device: 80)
    if chunks:
        monkeypatch.setattr(kernels, "TOKEN_CHUNK", chunks[0])
        monkeypatch.setattr(kernels, "VOCAB_CHUNK", chunks[1])
    dim, vocab = 40, 700
    held = lm_head.backward_held_bytes("triton", num_tokens, num_valid, dim, vocab, torch.bfloat16)
    assert held == lm_head.backward_buffer_bytes(num_tokens, num_valid, dim, vocab, torch.bfloat16, table=80)
