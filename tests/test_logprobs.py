"""Fused linear log-probs, entropy and cross-entropy against float64 references on materialized logits.

Both paths run: ``torch`` (the chunked PyTorch implementation, large T and V) and ``triton``
(the kernels, under the CPU interpreter without a GPU, so small shapes there).
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qwenlong.kernels import linear_cross_entropy, linear_logprobs
from qwenlong.kernels.logprobs import chunked
from qwenlong.kernels.logprobs.compile_specs import compile_specs
from qwenlong.kernels.logprobs.linear_logprobs import (
    HostCount,
    _combine_kernel,
    _dlogits_kernel,
    _forward_kernel,
    _grad_hidden_kernel,
    _grad_weight_kernel,
    compact_rows,
    fused_linear_loss,
    fused_linear_stats,
)
from qwenlong.kernels.logprobs.reference import (
    reference_linear_cross_entropy,
    reference_linear_logprobs,
    reference_log_softmax,
)
from qwenlong.kernels.utils.checks import CHECK_ENV_VAR

IGNORE = -100
KERNELS = importlib.import_module("qwenlong.kernels.logprobs.linear_logprobs")  # the package exports a function
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# forward: absolute tolerance on log-probs / entropy; backward: max error relative to the largest gradient
FWD_ATOL = {torch.float32: 1e-4, torch.bfloat16: 2e-3, torch.float16: 2e-3}
BWD_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
# (T, d, V): V never a multiple of a tile (Triton: 128, chunked: 4096)
TORCH_SHAPES = [(1, 16, 100), (777, 24, 5003), (3000, 16, 4099)]
TRITON_SHAPES = [(1, 16, 130), (37, 32, 700), (64, 64, 517)]
LARGE_VOCAB = {"torch": (64, 8, 70001, torch.float32), "triton": (2, 16, 66001, torch.float16)}
TEMPERATURES = (1.0, 0.6, 1.5)


def make_inputs(num_tokens, dim, vocab, dtype, seed, scale=1.0, ignore_frac=0.15, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(num_tokens, dim, generator=gen) * scale).to(device, dtype)
    weight = (torch.randn(vocab, dim, generator=gen) / dim**0.5).to(device, dtype)
    targets = torch.randint(0, vocab, (num_tokens,), generator=gen)
    targets[torch.rand(num_tokens, generator=gen) < ignore_frac] = IGNORE
    return hidden.requires_grad_(), weight.requires_grad_(), targets.to(device)


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.abs().max().clamp(min=1e-12)).item()


def shapes_for(backend):
    return TORCH_SHAPES if backend == "torch" else TRITON_SHAPES


def check_against_reference(num_tokens, dim, vocab, dtype, temperature, seed, device, weight_grad=True, weight=None):
    """``weight``: a given (V, d) weight instead of a fresh one."""
    hidden, fresh, targets = make_inputs(num_tokens, dim, vocab, dtype, seed, device=device)
    weight = fresh if weight is None else weight.detach()
    weight.requires_grad_(weight_grad)
    logp, entropy = linear_logprobs(hidden, weight, targets, temperature, return_entropy=True, ignore_index=IGNORE)
    ref_logp, ref_entropy = reference_linear_logprobs(hidden, weight, targets, temperature, True, IGNORE)
    assert logp.dtype == entropy.dtype == torch.float32 and logp.shape == entropy.shape == (num_tokens,)
    torch.testing.assert_close(logp.double(), ref_logp, atol=FWD_ATOL[dtype], rtol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_entropy, atol=FWD_ATOL[dtype], rtol=1e-5)
    ignored = targets == IGNORE
    assert (logp[ignored] == 0).all() and (entropy[ignored] == 0).all()

    gen = torch.Generator().manual_seed(seed + 7)
    grad_logp, grad_entropy = torch.randn(2, num_tokens, generator=gen).to(device)
    inputs = (hidden, weight) if weight_grad else (hidden,)
    grads = torch.autograd.grad((logp * grad_logp + entropy * grad_entropy).sum(), inputs)
    ref_grads = torch.autograd.grad((ref_logp * grad_logp + ref_entropy * grad_entropy).sum(), inputs)
    for name, got, want in zip(("hidden", "weight"), grads, ref_grads, strict=False):
        assert got.dtype == dtype and torch.isfinite(got).all(), name
        assert relative_error(got, want) < BWD_RTOL[dtype], name


@pytest.mark.parametrize("shape_index", range(3))
@pytest.mark.parametrize("dtype", DTYPES)
def test_logprobs_and_entropy_match_reference(backend, shape_index, dtype, device):
    num_tokens, dim, vocab = shapes_for(backend)[shape_index]
    seed = 1000 * shape_index + DTYPES.index(dtype)
    check_against_reference(num_tokens, dim, vocab, dtype, TEMPERATURES[shape_index], seed, device)


def test_vocabulary_above_65536(backend, device):
    """The interpreter is slow over 500+ vocabulary tiles: there, a frozen head (no weight gradient)."""
    num_tokens, dim, vocab, dtype = LARGE_VOCAB[backend]
    check_against_reference(num_tokens, dim, vocab, dtype, 0.75, seed=99, device=device, weight_grad=backend == "torch")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_logprobs_alone_skip_entropy_and_match(backend, dtype, device):
    num_tokens, dim, vocab = shapes_for(backend)[1]
    hidden, weight, targets = make_inputs(num_tokens, dim, vocab, dtype, seed=5, device=device)
    logp, entropy, mean_logp = fused_linear_stats(hidden, weight, targets, 0.7, IGNORE)
    assert entropy is None and mean_logp is None
    ref_logp = reference_linear_logprobs(hidden, weight, targets, 0.7, ignore_index=IGNORE)
    torch.testing.assert_close(logp.double(), ref_logp, atol=FWD_ATOL[dtype], rtol=1e-5)
    grads = torch.autograd.grad(logp.sum(), (hidden, weight))
    ref_grads = torch.autograd.grad(ref_logp.sum(), (hidden, weight))
    for got, want in zip(grads, ref_grads, strict=True):
        assert relative_error(got, want) < BWD_RTOL[dtype]


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_extreme_logits_stay_finite(backend, dtype, device):
    """Hidden states that make logits of magnitude ~1e4: no overflow, still accurate."""
    hidden, weight, targets = make_inputs(24, 16, 600, dtype, seed=11, scale=1e4, device=device)
    logits = reference_log_softmax(hidden, weight)
    assert logits.abs().max() > 1e4
    logp, entropy = linear_logprobs(hidden, weight, targets, return_entropy=True)
    ref_logp, ref_entropy = reference_linear_logprobs(hidden, weight, targets, return_entropy=True)
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all()
    torch.testing.assert_close(logp.double(), ref_logp, atol=0.05, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_entropy, atol=1e-3, rtol=0)
    grads = torch.autograd.grad((logp + entropy).sum(), (hidden, weight))
    ref_grads = torch.autograd.grad((ref_logp + ref_entropy).sum(), (hidden, weight))
    for got, want in zip(grads, ref_grads, strict=True):
        assert torch.isfinite(got).all()
        assert relative_error(got, want) < BWD_RTOL[dtype]


@pytest.mark.parametrize("label_smoothing", (0.0, 0.1))
@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
def test_cross_entropy_matches_torch(backend, reduction, label_smoothing, device):
    num_tokens, dim, vocab = (500, 16, 3001) if backend == "torch" else (37, 32, 700)
    hidden, weight, targets = make_inputs(num_tokens, dim, vocab, torch.float32, seed=21, device=device)
    loss = linear_cross_entropy(hidden, weight, targets, IGNORE, reduction, label_smoothing)
    ref = reference_linear_cross_entropy(hidden, weight, targets, IGNORE, reduction, label_smoothing)
    torch.testing.assert_close(loss.double(), ref, atol=1e-4, rtol=1e-5)
    if reduction != "none":
        upstream = torch.ones_like(ref)
    else:
        upstream = torch.linspace(-1, 1, num_tokens, device=device).double()
    grads = torch.autograd.grad(loss, (hidden, weight), upstream.float())
    ref_grads = torch.autograd.grad(ref, (hidden, weight), upstream)
    for got, want in zip(grads, ref_grads, strict=True):
        assert relative_error(got, want) < 1e-4


def test_cross_entropy_bf16_with_smoothing(backend, device):
    hidden, weight, targets = make_inputs(40, 32, 700, torch.bfloat16, seed=31, device=device)
    loss = linear_cross_entropy(hidden, weight, targets, label_smoothing=0.2)
    ref = reference_linear_cross_entropy(hidden, weight, targets, label_smoothing=0.2)
    torch.testing.assert_close(loss.double(), ref, atol=2e-3, rtol=1e-4)
    grads = torch.autograd.grad(loss, (hidden, weight))
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    for got, want in zip(grads, ref_grads, strict=True):
        assert relative_error(got, want) < BWD_RTOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_batch_invariance(backend, dtype, device):
    """A token's outputs and hidden gradient are the same bits alone and inside a larger batch."""
    num_tokens = 1100 if backend == "torch" else 50  # torch: the token sits in the 2nd, partial chunk
    position = 700 if backend == "torch" else 37
    hidden, weight, targets = make_inputs(num_tokens, 32, 700, dtype, seed=41, ignore_frac=0.0, device=device)

    def outputs(rows):
        h = hidden.detach()[rows].clone().requires_grad_()
        logp, entropy = linear_logprobs(h, weight.detach(), targets[rows], 0.8, return_entropy=True)
        (grad_hidden,) = torch.autograd.grad((logp + entropy).sum(), h)
        return logp, entropy, grad_hidden

    batch = outputs(slice(None))
    alone = outputs(slice(position, position + 1))
    for in_batch, single in zip(batch, alone, strict=True):
        assert torch.equal(in_batch[position : position + 1], single)


def test_every_row_written_and_ignored_rows_pass_no_gradient(backend, device):
    hidden, weight, targets = make_inputs(45, 16, 300, torch.float32, seed=51, ignore_frac=0.5, device=device)
    logp, entropy = linear_logprobs(hidden, weight, targets, return_entropy=True)
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all()
    (grad_hidden,) = torch.autograd.grad((logp + entropy).sum(), hidden)
    ignored = targets == IGNORE
    assert ignored.any() and (grad_hidden[ignored] == 0).all() and (grad_hidden[~ignored] != 0).any()


def test_chunk_boundaries_on_torch_path(monkeypatch):
    """Tiny chunk sizes: many partial token and vocabulary chunks still give the reference."""
    monkeypatch.setenv("QWENLONG_BACKEND", "torch")
    monkeypatch.setattr(chunked, "TOKEN_CHUNK", 7)
    monkeypatch.setattr(chunked, "VOCAB_CHUNK", 13)
    hidden, weight, targets = make_inputs(30, 8, 101, torch.float32, seed=61)
    logp, entropy = linear_logprobs(hidden, weight, targets, 1.3, return_entropy=True)
    ref_logp, ref_entropy = reference_linear_logprobs(hidden, weight, targets, 1.3, True)
    torch.testing.assert_close(logp.double(), ref_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_entropy, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad((logp - 2 * entropy).sum(), (hidden, weight))
    ref_grads = torch.autograd.grad((ref_logp - 2 * ref_entropy).sum(), (hidden, weight))
    for got, want in zip(grads, ref_grads, strict=True):
        assert relative_error(got, want) < 1e-5


class _LargestFloat32(TorchDispatchMode):
    """Records the most elements of any fp32 tensor an op creates while it is active."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
                self.numel = max(self.numel, value.numel())
        return out


@pytest.mark.parametrize("grad_in_forward", (False, True))
def test_gradients_summed_over_chunks(backend, grad_in_forward, device, monkeypatch):
    """Several token chunks and several vocabulary chunks, bf16: d(hidden) and d(weight) match the float64
    reference. The recomputing backward makes no fp32 buffer as large as the weight (each gradient is summed in
    fp32 over one chunk of rows at a time and rounded to bf16 once); gradients in the forward keep a chunk's fp32
    logits (LOGITS_TOKEN_CHUNK x V, chunked.KEPT_ROWS x V) by design, and sum d(weight) in fp32 over the chunks."""
    if backend == "torch":
        monkeypatch.setattr(chunked, "TOKEN_CHUNK", 64)
        monkeypatch.setattr(chunked, "VOCAB_CHUNK", 256)
        monkeypatch.setattr(chunked, "KEPT_ROWS", 128)
    else:
        monkeypatch.setattr(KERNELS, "TOKEN_CHUNK", 128)  # bf16's GEMM tiles are 128 rows
        monkeypatch.setattr(KERNELS, "LOGITS_TOKEN_CHUNK", 128)
        monkeypatch.setattr(KERNELS, "VOCAB_CHUNK", 256)
    # ~240 valid rows; an fp32 V x d: 44,800 elements; the largest chunk sums: 256 x 64 (and 240 x 64)
    num_tokens, dim, vocab = 300, 64, 700
    hidden, weight, targets = make_inputs(num_tokens, dim, vocab, torch.bfloat16, seed=47, ignore_frac=0.2,
                                          device=device)
    largest = _LargestFloat32()
    with largest:
        loss = linear_cross_entropy(hidden, weight, targets, reduction="sum", grad_in_forward=grad_in_forward)
        grads = torch.autograd.grad(loss, (hidden, weight))
    if not grad_in_forward:
        assert 0 < largest.numel < vocab * dim // 2
    ref = reference_linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE, reduction="sum")
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    for name, got, want in zip(("hidden", "weight"), grads, ref_grads, strict=True):
        assert got.dtype == torch.bfloat16, name
        assert relative_error(got, want) < BWD_RTOL[torch.bfloat16], name


@pytest.mark.parametrize("dtype", DTYPES)
def test_host_gradients_in_forward_are_the_recomputing_paths_bits(dtype, monkeypatch):
    """The chunked PyTorch path with gradients made in the forward (kept logits, no recompute) over three chunks of
    valid rows, the last one a partial tile, with entropy and mean log-prob terms and per-token weights: d(hidden)
    and d(weight) are bitwise those of the recomputing backward, the statistics too, the loss as close as a sum
    in another order; the forward holds no fp32 buffer beyond KEPT_ROWS x V but d(weight)'s fp32 sum."""
    monkeypatch.setenv("QWENLONG_BACKEND", "torch")
    monkeypatch.setattr(chunked, "TOKEN_CHUNK", 32)
    monkeypatch.setattr(chunked, "VOCAB_CHUNK", 128)
    monkeypatch.setattr(chunked, "KEPT_ROWS", 64)
    num_tokens, dim, vocab = 200, 24, 300
    hidden, weight, targets = make_inputs(num_tokens, dim, vocab, dtype, seed=61, ignore_frac=0.35)
    num_valid = int((targets != IGNORE).sum())
    assert 2 * 64 < num_valid < 3 * 64 and num_valid % 32
    token_weights = torch.rand(num_tokens, generator=torch.Generator().manual_seed(62)) + 0.5

    def token_loss(rows, logp, entropy, mean_logp):
        return -token_weights[rows] * logp - 0.1 * entropy + 0.05 * mean_logp

    largest = _LargestFloat32()
    with largest:
        loss, *stats = fused_linear_loss(hidden, weight, targets, token_loss, 0.9, IGNORE, with_entropy=True,
                                         with_mean_logp=True)
    assert largest.numel <= max(64 * vocab, vocab * dim)
    grads = torch.autograd.grad(loss, (hidden, weight))
    recomputed = fused_linear_stats(hidden, weight, targets, 0.9, IGNORE, with_entropy=True, with_mean_logp=True)
    rows = torch.arange(num_tokens)
    expected = torch.where(targets != IGNORE, token_loss(rows, *recomputed), 0.0).sum()
    expected_grads = torch.autograd.grad(expected, (hidden, weight))
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-6, atol=1e-6)
    for name, got, want in zip(("logp", "entropy", "mean_logp"), stats, recomputed, strict=True):
        assert torch.equal(got, want.detach()), name
    for name, got, want in zip(("hidden", "weight"), grads, expected_grads, strict=True):
        assert got.dtype == dtype and torch.equal(got, want), name
        assert got.abs().max() > 0, name


def test_gradients_in_forward_are_not_made_where_nothing_differentiates(backend, device, monkeypatch):
    """Under torch.no_grad() (an evaluation) or with inputs that need no gradient, grad_in_forward runs the forward
    alone: no gradient step launches, and the loss is the one made with gradients."""
    hidden, weight, targets = make_inputs(40, 16, 150, torch.float32, seed=64, device=device)
    with_grads = linear_cross_entropy(hidden, weight, targets, label_smoothing=0.1, grad_in_forward=True)

    def refuse(*args, **kwargs):
        raise AssertionError("a gradient was made for a loss nothing differentiates")

    monkeypatch.setattr(chunked, "backward", refuse)
    monkeypatch.setattr(KERNELS, "_ChunkGradients", refuse)
    with torch.no_grad():
        evaluated = linear_cross_entropy(hidden, weight, targets, label_smoothing=0.1, grad_in_forward=True)
    constants = linear_cross_entropy(hidden.detach(), weight.detach(), targets, label_smoothing=0.1,
                                     grad_in_forward=True)
    for loss in (evaluated, constants):
        assert not loss.requires_grad
        torch.testing.assert_close(loss, with_grads.detach(), atol=1e-6, rtol=1e-6)


class _ExtensionOnChunked:
    """Stands in for ``qwenlong._C.cuda`` on CPU: the extension's two log-prob entry points with its pybind
    signatures, computed by the chunked path, the kept logits in the extension's buffer (a whole 4096-row token
    chunk, rows padded to 4 columns), which it checks as the extension does."""

    def linear_logprobs_forward(self, hidden, weight, targets, temperature, ignore_index, logits=None):
        if logits is None:
            return list(chunked.forward(hidden, weight, targets, temperature, ignore_index, True, True))
        self._check(logits, hidden, weight)
        kept = logits[: self._tiles(hidden), : weight.shape[0]]
        return list(chunked.forward(hidden, weight, targets, temperature, ignore_index, True, True, kept_logits=kept))

    def linear_logprobs_backward(self, hidden, weight, targets, lse, entropy, grad_logp, grad_entropy,
                                 grad_mean_logp, temperature, logits=None, grad_weight_sum=None):
        kept = None
        if logits is not None:
            self._check(logits, hidden, weight)
            kept = logits[: self._tiles(hidden), : weight.shape[0]]
        if grad_weight_sum is not None:
            assert grad_weight_sum.dtype == torch.float32 and grad_weight_sum.shape == weight.shape
        return list(chunked.backward(hidden, weight, targets, lse, entropy, grad_logp, grad_entropy, grad_mean_logp,
                                     temperature, kept_logits=kept, grad_weight_sum=grad_weight_sum))

    @staticmethod
    def _tiles(hidden):  # the chunked path's rows: whole tiles
        return -(-hidden.shape[0] // chunked.TOKEN_CHUNK) * chunked.TOKEN_CHUNK

    @staticmethod
    def _check(logits, hidden, weight):
        assert hidden.shape[0] <= 4096 and logits.dtype == torch.float32
        assert logits.shape == (4096, -(-weight.shape[0] // 4) * 4) and logits.stride() == (logits.shape[1], 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gradients_in_forward_drive_the_extension_in_token_chunks(dtype, monkeypatch):
    """ValidRowLoss over the CUDA extension's interface (here computed by the chunked path): 4,700 valid rows go in
    two calls of at most 4,096 rows with the extension's kept-logits buffer, d(weight) summed in fp32 across them;
    loss, statistics and gradients as ValidRowLoss over the chunked path in its 1,024-row calls (bitwise: both cut
    at whole 256-row tiles)."""
    from qwenlong.kernels.logprobs import cuda_backend
    from qwenlong.kernels.logprobs.valid_rows import ValidRowLoss

    monkeypatch.setattr(cuda_backend._C, "cuda", _ExtensionOnChunked())
    hidden, weight, targets = make_inputs(5000, 8, 50, dtype, seed=65, ignore_frac=0.06)
    assert 4096 < int((targets != IGNORE).sum()) < 5000

    def token_loss(rows, logp, entropy, mean_logp):
        return -logp * (1.0 + (rows % 3)) - 0.1 * entropy

    results = {}
    for name, impl in (("cuda", cuda_backend), ("torch", chunked)):
        loss, *stats = ValidRowLoss.apply(hidden, weight, targets, 1.0, IGNORE, True, False, token_loss, impl)
        results[name] = (loss, *stats[:2], *torch.autograd.grad(loss, (hidden, weight)))
    for what, got, expected in zip(("loss", "logp", "entropy", "hidden", "weight"), *results.values(), strict=True):
        assert got.dtype == expected.dtype, what
        torch.testing.assert_close(got, expected, atol=0, rtol=1e-6 if what == "loss" else 0, msg=what)


def test_bf16_gradients_in_forward_meet_the_scale_in_fp32(backend, device, monkeypatch):
    """bf16 ``(loss / 3).backward()`` on a loss whose gradients were made in the forward (and stored in bf16):
    every element is the gradient ``loss.backward()`` gives times 1/3, taken in fp32 and rounded once; the scale
    is never rounded to bf16 first (bf16's 1/3 is 0.2% off: a bias on every element). Over three blocks of
    ``scaled_gradients``' rows. (fp16 keeps fp32 gradients until scaled: the loss-scale test below.)"""
    from qwenlong.kernels.logprobs import valid_rows

    monkeypatch.setattr(valid_rows, "SCALE_ROWS", 16)
    dtype = torch.bfloat16
    hidden, weight, targets = make_inputs(40, 16, 150, dtype, seed=66, device=device)
    whole = torch.autograd.grad(linear_cross_entropy(hidden, weight, targets, grad_in_forward=True), (hidden, weight))
    third = torch.autograd.grad(linear_cross_entropy(hidden, weight, targets, grad_in_forward=True) / 3,
                                (hidden, weight))
    for name, got, unscaled in zip(("hidden", "weight"), third, whole, strict=True):
        assert got.dtype == dtype, name
        assert torch.equal(got, (unscaled.float() * torch.tensor(1 / 3)).to(dtype)), name


def test_a_token_loss_that_ignores_the_statistics_gives_zero_gradients(backend, device):
    """A token loss that uses none of the statistics (a constant per token): its gradients are zeros, not an
    autograd error."""
    hidden, weight, targets = make_inputs(30, 16, 100, torch.float32, seed=67, device=device)
    loss, *_ = fused_linear_loss(hidden, weight, targets, lambda rows, logp, entropy, mean_logp: torch.ones_like(logp))
    assert loss.item() == float((targets != IGNORE).sum())
    for grad in torch.autograd.grad(loss, (hidden, weight), allow_unused=True, materialize_grads=True):
        assert torch.equal(grad, torch.zeros_like(grad))


def test_kept_logits_too_small_for_the_rows_are_refused():
    hidden, weight, targets = make_inputs(300, 8, 50, torch.float32, seed=63)
    kept = chunked.kept_logits(100, 50, "cpu")
    with pytest.raises(ValueError, match="kept_logits has 256 rows, too few for 300 tokens"):
        chunked.forward(hidden, weight, targets, 1.0, IGNORE, False, False, kept_logits=kept)


def test_gradient_gemms_read_by_descriptor_only_where_one_fits(device, monkeypatch):
    """The gradient GEMMs take tensor descriptors for bf16/fp16 weights whose base and rows are whole 16-byte units;
    a weight view starting 2 bytes in, rows of 24 bytes, or fp32 keep masked loads, and each gives the
    reference's gradients."""
    config = KERNELS.block_config(64, torch.bfloat16, 80)
    storage = torch.randn(701 * 64 + 1, device=device).to(torch.bfloat16)
    aligned, shifted = storage[: 700 * 64].view(700, 64), storage[1 : 1 + 700 * 64].view(700, 64)
    assert KERNELS.gemm_reads_by_descriptor(aligned, config)
    assert not KERNELS.gemm_reads_by_descriptor(shifted, config)
    assert not KERNELS.gemm_reads_by_descriptor(aligned[:, :12], KERNELS.block_config(12, torch.bfloat16, 80))
    assert not KERNELS.gemm_reads_by_descriptor(aligned.float(), KERNELS.block_config(64, torch.float32, 80))
    monkeypatch.setenv("QWENLONG_BACKEND", "triton")
    chosen, choose = [], KERNELS.gemm_reads_by_descriptor
    monkeypatch.setattr(KERNELS, "gemm_reads_by_descriptor", lambda *args: chosen.append(choose(*args)) or chosen[-1])
    for weight in (aligned, shifted):  # the launcher's .contiguous() keeps a contiguous view where it starts
        check_against_reference(37, 64, 700, torch.bfloat16, 1.0, seed=53, device=device, weight=weight)
    assert chosen == [True, False]


def _bad_inputs(device="cpu"):
    hidden, weight, targets = make_inputs(6, 8, 20, torch.float32, seed=71, ignore_frac=0.0, device=device)
    hidden, weight = hidden.detach(), weight.detach()
    out_of_range = targets.clone()
    out_of_range[2] = 20
    negative = targets.clone()
    negative[0] = -1
    return [
        ("hidden", dict(hidden=hidden[0])),
        ("hidden", dict(hidden=hidden.long())),
        ("weight", dict(weight=weight[:, :4])),
        ("weight", dict(weight=weight.double())),
        ("weight", dict(weight=weight.half())),
        ("weight", dict(weight=weight.to("meta"))),
        ("targets", dict(targets=targets[:5])),
        ("targets", dict(targets=targets.float())),
        ("targets", dict(targets=out_of_range)),
        ("targets", dict(targets=negative)),
        ("temperature", dict(temperature=0.0)),
    ], dict(hidden=hidden, weight=weight, targets=targets)


@pytest.mark.parametrize("case", range(11))
def test_bad_input_names_the_argument(backend, case, device, monkeypatch):
    monkeypatch.setenv(CHECK_ENV_VAR, "1")  # on a GPU, the target range check reads values only when asked for
    cases, good = _bad_inputs(device)
    name, change = cases[case]
    with pytest.raises(ValueError, match=name):
        linear_logprobs(**(good | change))


@pytest.mark.parametrize("change", [dict(reduction="avg"), dict(label_smoothing=1.5)])
def test_cross_entropy_bad_options(change):
    _, good = _bad_inputs()
    with pytest.raises(ValueError, match=next(iter(change))):
        linear_cross_entropy(**good, **change)


def test_compile_specs_match_kernel_signatures():
    specs = compile_specs()
    kernels = {_forward_kernel, _dlogits_kernel, _grad_hidden_kernel, _grad_weight_kernel}
    assert {spec.fn for spec in specs} == kernels | {_combine_kernel}  # the slice merge: fp32 only, one build
    for kernel in kernels:  # every kernel built for every input dtype (its first argument holds that dtype)
        dtypes = {next(iter(spec.signature.values())) for spec in specs if spec.fn is kernel}
        assert dtypes == {"*bf16", "*fp16", "*fp32"}
    combine = [(spec.constexprs["WITH_ENTROPY"], spec.constexprs["WITH_MEAN"]) for spec in specs
               if spec.fn is _combine_kernel]
    assert sorted(combine) == [(False, False), (False, True), (True, False), (True, True)]
    for spec in specs:
        assert list(spec.signature) == list(spec.fn.arg_names), spec.name
        constexprs = {name for name, kind in spec.signature.items() if kind == "constexpr"}
        assert constexprs == set(spec.constexprs), spec.name


@pytest.mark.parametrize("frozen", ("hidden", "weight"))
def test_gradient_of_one_input_only(backend, frozen, device):
    """Only the gradient asked for is computed (a frozen head, or frozen hidden states), and it is right."""
    hidden, weight, targets = make_inputs(30, 16, 300, torch.float32, seed=81, device=device)
    (hidden if frozen == "hidden" else weight).requires_grad_(False)
    wanted = weight if frozen == "hidden" else hidden
    logp, entropy = linear_logprobs(hidden, weight, targets, 1.2, return_entropy=True)
    ref_logp, ref_entropy = reference_linear_logprobs(hidden, weight, targets, 1.2, True)
    (got,) = torch.autograd.grad((logp - entropy).sum(), wanted)
    (want,) = torch.autograd.grad((ref_logp - ref_entropy).sum(), wanted)
    assert relative_error(got, want) < BWD_RTOL[torch.float32]


def test_cuda_backend_on_cpu_tensors_is_refused(monkeypatch):
    from qwenlong.kernels import linear_logprobs

    monkeypatch.setenv("QWENLONG_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cuda"):
        linear_logprobs(torch.randn(3, 8), torch.randn(11, 8), torch.tensor([1, 2, 3]))


@pytest.mark.parametrize("smoothing", (0.0, 0.1))
def test_nan_hidden_rows_at_ignored_positions_reach_nothing(backend, smoothing, device):
    """A NaN or inf hidden row whose target is ignored changes no output and no gradient bit."""
    hidden, weight, targets = make_inputs(40, 16, 300, torch.float32, seed=91, ignore_frac=0.4, device=device)
    ignored = targets == IGNORE
    assert ignored.any() and not ignored.all()

    def run(hidden_in):
        h, w = hidden_in.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        loss = linear_cross_entropy(h, w, targets, label_smoothing=smoothing)
        logp, entropy = linear_logprobs(h, w, targets, 0.9, return_entropy=True)
        return (loss, logp, entropy, *torch.autograd.grad(loss + (logp - entropy).sum(), (h, w)))

    clean = run(hidden)
    poison = torch.tensor([float("nan"), float("inf"), float("-inf")], device=device).repeat(16)[:16]
    poisoned = run(torch.where(ignored[:, None], poison, hidden.detach()))
    for got, want in zip(poisoned, clean, strict=True):
        assert torch.isfinite(got).all() and torch.equal(got, want)
    assert (poisoned[3][ignored] == 0).all()
    ref = reference_linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE, label_smoothing=smoothing)
    torch.testing.assert_close(clean[0].double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_rl_shaped_batch_matches_rows_alone(backend, dtype, device):
    """Most rows ignored (a long prompt, short responses): every valid token's outputs and hidden
    gradient are the same bits as when it is computed alone, and ignored rows get exactly 0."""
    num_tokens = 1100 if backend == "torch" else 150
    hidden, weight, targets = make_inputs(num_tokens, 32, 700, dtype, seed=43, ignore_frac=0.0, device=device)
    targets[: num_tokens * 4 // 5] = IGNORE  # the prompt
    targets[num_tokens - 9 :: 4] = IGNORE  # and a few inside the responses

    def outputs(rows):
        h = hidden.detach()[rows].clone().requires_grad_()
        logp, entropy = linear_logprobs(h, weight.detach(), targets[rows], 0.8, return_entropy=True)
        (grad_hidden,) = torch.autograd.grad((logp + 2 * entropy).sum(), h)
        return logp, entropy, grad_hidden

    batch = outputs(slice(None))
    ignored = targets == IGNORE
    for values in batch:
        assert (values[ignored] == 0).all()
    for position in (num_tokens * 4 // 5, num_tokens - 2):
        alone = outputs(slice(position, position + 1))
        for in_batch, single in zip(batch, alone, strict=True):
            assert torch.equal(in_batch[position : position + 1], single), position
    ref_logp, ref_entropy = reference_linear_logprobs(hidden, weight, targets, 0.8, True, IGNORE)
    torch.testing.assert_close(batch[0].double(), ref_logp, atol=FWD_ATOL[dtype], rtol=1e-5)
    torch.testing.assert_close(batch[1].double(), ref_entropy, atol=FWD_ATOL[dtype], rtol=1e-5)


@pytest.mark.parametrize("reduction", ("mean", "sum"))
@pytest.mark.parametrize("label_smoothing", (0.0, 0.1))
def test_cross_entropy_gradients_in_forward(backend, reduction, label_smoothing, device):
    hidden, weight, targets = make_inputs(45, 16, 300, torch.float32, seed=95, device=device)
    loss = linear_cross_entropy(hidden, weight, targets, reduction=reduction, label_smoothing=label_smoothing,
                                grad_in_forward=True)
    ref = reference_linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE, reduction=reduction,
                                         label_smoothing=label_smoothing)
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(loss * 0.5, (hidden, weight))
    ref_grads = torch.autograd.grad(ref * 0.5, (hidden, weight))
    for got, want in zip(grads, ref_grads, strict=True):
        assert relative_error(got, want) < BWD_RTOL[torch.float32]
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, targets, reduction="none", grad_in_forward=True)


@pytest.mark.parametrize("table", [80, 90])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gradients_in_forward_on_each_tile_table(table, dtype, device, monkeypatch):
    """The forward that keeps its logits, with each GPU generation's tiles: sm_90's (90) stores 128-row tiles
    through a tensor descriptor into a buffer whose rows are padded to 16 bytes (V = 301 is not), the others'
    64-row tiles by pointer. 150 tokens make a partial last token tile, V = 301 three vocabulary slices, the
    last one partial. Loss and gradients as the float64 reference."""
    from qwenlong.kernels.backend import tile_table

    if device == "cuda" and tile_table(torch.device(device)) != table:
        pytest.skip(f"this GPU does not run tile table {table}")
    monkeypatch.setenv("QWENLONG_BACKEND", "triton")
    monkeypatch.setattr(KERNELS, "tile_table", lambda device: table)
    # descriptors need Triton's scratch allocator on a GPU (a launch without one raises there): the kept logits'
    # store on sm_90, the gradient GEMMs' loads on every table
    allocator_checks, ensure = [], KERNELS.ensure_scratch_allocator
    monkeypatch.setattr(KERNELS, "ensure_scratch_allocator", lambda device: allocator_checks.append(device) or
                        ensure(device))
    hidden, weight, targets = make_inputs(150, 32, 301, dtype, seed=table, device=device)
    loss = linear_cross_entropy(hidden, weight, targets, label_smoothing=0.1, grad_in_forward=True)
    assert len(allocator_checks) == 1 + (table == 90)
    ref = reference_linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE, label_smoothing=0.1)
    torch.testing.assert_close(loss.double(), ref, atol=FWD_ATOL[dtype], rtol=1e-4)
    grads = torch.autograd.grad(loss, (hidden, weight))
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    for name, got, want in zip(("hidden", "weight"), grads, ref_grads, strict=True):
        assert got.dtype == dtype and relative_error(got, want) < BWD_RTOL[dtype], name


@pytest.mark.gpu
def test_host_count_reads_a_device_count_later():
    """The count of valid rows the backward reads: copied in forward behind the kernel that makes it."""
    targets = torch.full((10_000,), IGNORE, device="cuda")
    targets[1234:1300] = 7
    _, num_valid = compact_rows(targets, IGNORE)
    assert HostCount(num_valid).value() == 66


@pytest.mark.gpu
@pytest.mark.parametrize(("num_tokens", "num_valid"), [(9000, 9000), (20_000, 3000)])
def test_backward_memory_on_the_gpu_is_the_closed_form(monkeypatch, num_tokens, num_valid):
    """Measured by the CUDA caching allocator, the recomputing Triton backward's peak beyond its two gradients is
    the work meter's closed form (``benchmarks/work/lm_head.py``, counted on CPU), allocator rounding aside: all
    valid over three token chunks, and an RL-shaped batch."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/ is not an installed package
    from benchmarks.work.lm_head import backward_buffer_bytes
    from qwenlong.kernels.backend import tile_table

    monkeypatch.setenv("QWENLONG_BACKEND", "triton")
    dim, vocab = 256, 20_000  # three vocabulary chunks
    hidden, weight, targets = make_inputs(num_tokens, dim, vocab, torch.bfloat16, seed=5, ignore_frac=0.0,
                                          device="cuda")
    targets[: num_tokens - num_valid] = IGNORE
    logp, entropy = linear_logprobs(hidden, weight, targets, return_entropy=True)
    grad_outputs = torch.ones_like(logp), torch.full_like(entropy, -0.1)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    grads = torch.autograd.grad((logp, entropy), (hidden, weight), grad_outputs)
    torch.cuda.synchronize()
    held = torch.cuda.max_memory_allocated() - before - sum(g.numel() * g.element_size() for g in grads)
    expected = backward_buffer_bytes(num_tokens, num_valid, dim, vocab, torch.bfloat16, table=tile_table(hidden.device))
    assert abs(held - expected) <= 0.01 * expected, (held, expected)


def test_host_count_of_a_cpu_count():
    targets = torch.full((50,), IGNORE)
    targets[::7] = 3
    assert HostCount(compact_rows(targets, IGNORE)[1]).value() == 8


@pytest.mark.parametrize("valid", [100, 0])
def test_gradients_in_forward_stop_after_the_valid_chunks(valid, device, monkeypatch):
    """An ignored 300-row prompt, then ``valid`` response rows, in 64-row chunks: the chunks past the valid rows
    are skipped and loss and gradients are still the float64 reference's (0 and zero gradients without any)."""
    monkeypatch.setenv("QWENLONG_BACKEND", "triton")
    monkeypatch.setattr(KERNELS, "LOGITS_TOKEN_CHUNK", 64)
    hidden, weight, targets = make_inputs(300 + valid, 16, 200, torch.float32, seed=valid, ignore_frac=0.0,
                                          device=device)
    targets[:300] = IGNORE
    loss = linear_cross_entropy(hidden, weight, targets, reduction="sum", grad_in_forward=True)
    ref = reference_linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE, reduction="sum")
    torch.testing.assert_close(loss.double(), ref, atol=1e-4, rtol=1e-5)
    grads = torch.autograd.grad(loss, (hidden, weight))
    ref_grads = torch.autograd.grad(ref, (hidden, weight), allow_unused=True, materialize_grads=True)
    for name, got, want in zip(("hidden", "weight"), grads, ref_grads, strict=True):
        if valid:
            assert relative_error(got, want) < BWD_RTOL[torch.float32], name
        else:
            assert torch.equal(got, torch.zeros_like(got)), name


@pytest.mark.parametrize("scale", [65536.0, 32768.0])
def test_fp16_gradients_in_forward_under_a_loss_scale(backend, scale, device):
    """fp16 with a GradScaler-style scale: ``(loss * scale).backward()`` on the loss whose gradients were made in
    the forward. Hidden states and weight of 2**-16 put the unscaled gradients (2**-20 and below) under fp16's
    normal range (2**-14): kept in fp16 they lost their low bits before the scale was applied (32768: 5% off),
    and 65536 itself is inf in fp16 (NaN gradients). Both gradients as the float64 reference's (5e-4 now)."""
    hidden, weight, targets = make_inputs(20, 16, 130, torch.float32, seed=97, device=device)
    hidden = (hidden.detach() * 2**-16).half().requires_grad_()
    weight = (weight.detach() * 2**-16).half().requires_grad_()
    with pytest.warns(UserWarning, match="fp16 inputs with gradients made in the forward"):
        loss = linear_cross_entropy(hidden, weight, targets, grad_in_forward=True)
    grads = torch.autograd.grad(loss * scale, (hidden, weight))
    exact = [t.detach().double().requires_grad_() for t in (hidden, weight)]
    ref = reference_linear_cross_entropy(*exact, targets, ignore_index=IGNORE)
    ref_grads = torch.autograd.grad(ref * scale, exact)
    torch.testing.assert_close(loss.double(), ref, atol=FWD_ATOL[torch.float16], rtol=1e-4)
    for name, got, want in zip(("hidden", "weight"), grads, ref_grads, strict=True):
        assert got.dtype == torch.float16 and torch.isfinite(got).all(), name
        assert relative_error(got, want) < 2e-3, name


def test_fp16_gradients_in_forward_warn_of_their_precision(backend, device):
    """The logit gradients made in the forward come before any loss scale (about p / T_valid each) and the GEMMs
    take them in the inputs' dtype: fp16 flushes most of a large vocabulary's to zero. A warning says so, for fp16
    only, and only where gradients are made (bf16 has fp32's range; an evaluation makes none)."""
    import warnings

    hidden, weight, targets = make_inputs(8, 16, 40, torch.float32, seed=96, device=device)
    for dtype, warns in ((torch.float16, True), (torch.bfloat16, False), (torch.float32, False)):
        h, w = (t.detach().to(dtype).requires_grad_() for t in (hidden, weight))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            linear_cross_entropy(h, w, targets, grad_in_forward=True)
            with torch.no_grad():
                linear_cross_entropy(h, w, targets, grad_in_forward=True)
        messages = [str(c.message) for c in caught if "gradients made in the forward" in str(c.message)]
        assert len(messages) == warns, (dtype, messages)


def _double_backward(make_loss, inputs):
    """A gradient taken with create_graph=True, differentiated again (a gradient penalty)."""
    (first,) = torch.autograd.grad(make_loss(), inputs[:1], create_graph=True)
    penalty = (first.float() ** 2).sum() + sum(x.float().sum() for x in inputs)
    return torch.autograd.grad(penalty, inputs)


@pytest.mark.parametrize("op", ["logprobs", "entropy", "cross_entropy", "cross_entropy_grad_in_forward"])
def test_double_backward_is_refused(backend, op, device):
    """The fused LM head's backward is not differentiable again: differentiating its gradient raises, naming
    the op (before: a wrong or silently missing second derivative, or an unrelated in-place error)."""
    hidden, weight, targets = make_inputs(6, 16, 40, torch.float32, seed=98, device=device)
    losses = {
        "logprobs": lambda: linear_logprobs(hidden, weight, targets).sum(),
        "entropy": lambda: linear_logprobs(hidden, weight, targets, return_entropy=True)[1].sum(),
        "cross_entropy": lambda: linear_cross_entropy(hidden, weight, targets),
        "cross_entropy_grad_in_forward": lambda: linear_cross_entropy(hidden, weight, targets, grad_in_forward=True),
    }
    with pytest.raises(RuntimeError, match="fused LM head .* does not support double backward"):
        _double_backward(losses[op], (hidden, weight))
    (plain,) = torch.autograd.grad(losses[op](), hidden)  # a single backward is untouched
    assert torch.isfinite(plain).all()


@pytest.mark.parametrize("grad_in_forward", [False, True])
def test_zero_tokens(backend, grad_in_forward, device):
    """T = 0: empty log-probs and entropies, a 0 loss and zero gradients, on both paths (the Triton path raised
    'range() arg 3 must not be zero')."""
    _, weight, _ = make_inputs(1, 16, 40, torch.float32, seed=99, device=device)
    hidden = torch.zeros((0, 16), device=device, requires_grad=True)
    targets = torch.zeros((0,), dtype=torch.int64, device=device)
    logp, entropy = linear_logprobs(hidden, weight, targets, return_entropy=True)
    assert logp.shape == entropy.shape == (0,)
    grads = torch.autograd.grad((logp + entropy).sum(), (hidden, weight))
    for reduction in ("mean", "sum"):
        loss = linear_cross_entropy(hidden, weight, targets, reduction=reduction, grad_in_forward=grad_in_forward)
        assert loss.item() == 0.0
        grads += torch.autograd.grad(loss, (hidden, weight))
    for grad, like in zip(grads, (hidden, weight) * 3, strict=True):
        assert grad.shape == like.shape and torch.equal(grad, torch.zeros_like(like))


def _bad_scalars():
    return [
        ("temperature", dict(temperature=float("inf"))),  # was uniform log-probs, -log V
        ("temperature", dict(temperature=1e-40)),  # 1 / temperature is inf in fp32: was NaN
        ("temperature", dict(temperature=float("nan"))),
        ("temperature", dict(temperature="1.0")),
        ("ignore_index", dict(ignore_index=1.5)),  # was truncated to 1
        ("ignore_index", dict(ignore_index=-100.0)),
    ]


@pytest.mark.parametrize("case", range(len(_bad_scalars())))
def test_bad_scalar_arguments_name_the_argument(backend, case, device):
    name, change = _bad_scalars()[case]
    _, good = _bad_inputs(device)
    with pytest.raises(ValueError, match=name):
        linear_logprobs(**(good | change))
    if name == "ignore_index":
        for grad_in_forward in (False, True):
            with pytest.raises(ValueError, match=name):
                linear_cross_entropy(**good, **change, grad_in_forward=grad_in_forward)
    assert linear_logprobs(**good, temperature=1e-30).isfinite().all()  # the smallest temperatures still run


def test_cuda_backend_without_the_extension_says_it_is_not_built(monkeypatch):
    """``QWENLONG_BACKEND=cuda`` for the log-prob ops on a GPU whose ``qwenlong._C._cuda`` did not load: the error
    says the extension is not built and shows why it did not import (it said the op had no CUDA path); one built
    without the log-prob ops says that. The GPU is stood in for by the device the backend is chosen for."""
    import types

    from qwenlong import _C
    from qwenlong.kernels import backend

    def on_a_gpu(device, override=None, has_cuda_op=False):
        return backend.select_backend(torch.device("cuda"), override, has_cuda_op)

    monkeypatch.setattr(KERNELS, "select_backend", on_a_gpu)
    monkeypatch.setenv("QWENLONG_BACKEND", "cuda")
    _, good = _bad_inputs()
    monkeypatch.setattr(_C, "cuda", None)
    monkeypatch.setattr(_C, "cuda_error", "ImportError: libcudart.so.12: cannot open shared object file")
    for call in (linear_logprobs, linear_cross_entropy):
        with pytest.raises(RuntimeError, match=r"not built .*ImportError: libcudart\.so\.12"):
            call(**good)
    monkeypatch.setattr(_C, "cuda", types.SimpleNamespace())
    with pytest.raises(RuntimeError, match="built without the log-prob ops"):
        linear_logprobs(**good)


def test_triton_functions_launch_with_their_tensors_gpu_current(monkeypatch):
    """Triton launches on the current device: a tensor on another GPU (one process driving a model spread over GPUs)
    was read from the wrong one. Every Triton autograd Function's forward and backward makes its tensors' GPU
    current (the first tensor argument's, else the saved tensors'); CPU tensors change nothing."""
    from types import SimpleNamespace

    from qwenlong.kernels.attention.varlen import TritonVarlenAttention
    from qwenlong.kernels.logprobs.linear_logprobs import _TritonFusedLoss, _TritonLinearStats
    from qwenlong.kernels.utils.autograd import on_tensor_device

    entered = []

    class Current:  # stands in for torch.cuda.device: records the device made current
        def __init__(self, device):
            entered.append(torch.device(device))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class OnSecondGPU(torch.Tensor):
        @property
        def device(self):
            return torch.device("cuda", 1)

    monkeypatch.setattr(torch.cuda, "device", Current)
    gpu_tensor = torch.zeros(2).as_subclass(OnSecondGPU)
    method = on_tensor_device(lambda ctx, *args: len(args))
    assert method(None, None, gpu_tensor, 3) == 3 and entered == [torch.device("cuda", 1)]
    assert method(SimpleNamespace(saved_tensors=(None, gpu_tensor)), None, None) == 2  # a backward given no tensor
    assert entered == [torch.device("cuda", 1)] * 2
    assert method(None, torch.zeros(2)) == 1 and len(entered) == 2  # CPU: nothing made current
    for function in (TritonVarlenAttention, _TritonLinearStats, _TritonFusedLoss):
        for name in ("forward", "backward"):
            assert getattr(getattr(function, name), "launches_on_tensor_device", False), (function.__name__, name)
