"""The CUDA-extension backend of the LM-head statistics against the chunked PyTorch path,
values and gradients (GPU only: skipped without a GPU or without the CUDA extension)."""

from __future__ import annotations

import pytest
import torch

from qwenlong import _C
from qwenlong.kernels.logprobs import chunked, cuda_backend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not cuda_backend.available(), reason=f"qwenlong._C._cuda has no log-prob ops: {_C.cuda_error}"),
]
TOL = {torch.float32: 2e-4, torch.bfloat16: 2e-2}


def _problem(dtype, tokens=700, vocab=20_000, dim=64, logit_scale=1.0, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    hidden = (torch.randn(tokens, dim, device="cuda", generator=gen) * logit_scale).to(dtype)
    weight = (torch.randn(vocab, dim, device="cuda", generator=gen) / dim**0.5).to(dtype)
    targets = torch.randint(0, vocab, (tokens,), device="cuda", generator=gen)
    targets[::7] = -100  # ignored rows
    return hidden, weight, targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("logit_scale", [1.0, 300.0])  # 300: logits in the thousands
def test_forward_matches_chunked(dtype, logit_scale):
    hidden, weight, targets = _problem(dtype, logit_scale=logit_scale)
    got = cuda_backend.forward(hidden, weight, targets, 0.7, -100, True, True)
    expected = chunked.forward(hidden, weight, targets, 0.7, -100, True, True)
    for name, g, e in zip(("logp", "entropy", "mean_logp", "lse"), got, expected, strict=True):
        assert torch.isfinite(g).all(), name
        scale = 1.0 if name != "lse" and name != "mean_logp" else logit_scale
        torch.testing.assert_close(g, e, atol=TOL[dtype] * scale, rtol=TOL[dtype], msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_entropy_grad", [False, True])
def test_backward_matches_chunked(dtype, with_entropy_grad):
    hidden, weight, targets = _problem(dtype, seed=1)
    logp, entropy, _, lse = chunked.forward(hidden, weight, targets, 0.7, -100, True, True)
    valid = targets != -100
    gen = torch.Generator(device="cuda").manual_seed(2)
    grads = [torch.where(valid, torch.randn(targets.shape, device="cuda", generator=gen), 0.0) for _ in range(3)]
    grad_entropy = grads[1] if with_entropy_grad else None
    args = (hidden, weight, targets, lse, entropy, grads[0], grad_entropy, grads[2], 0.7)
    got = cuda_backend.backward(*args)
    expected = chunked.backward(*args)
    for g, e, grad_dtype in zip(got, expected, (torch.float32, dtype), strict=True):  # d(weight): weight's dtype
        assert g.dtype == e.dtype == grad_dtype and torch.isfinite(g).all()
        torch.testing.assert_close(g, e, atol=TOL[dtype], rtol=TOL[dtype])


TOKEN_CHUNK = 4096  # csrc/cuda/linear_logprobs.cu: kTokenChunk


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_several_token_chunks_match_chunked(dtype):
    """Two full token chunks read in place and a partial third one from the padded copy."""
    hidden, weight, targets = _problem(dtype, tokens=2 * TOKEN_CHUNK + 300, vocab=9000, dim=32, seed=3)
    got = cuda_backend.forward(hidden, weight, targets, 1.0, -100, True, True)
    expected = chunked.forward(hidden, weight, targets, 1.0, -100, True, True)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=TOL[dtype], rtol=TOL[dtype])
    lse, entropy = expected[3], expected[1]
    valid = targets != -100
    gen = torch.Generator(device="cuda").manual_seed(4)
    grads = [torch.where(valid, torch.randn(targets.shape, device="cuda", generator=gen), 0.0) for _ in range(3)]
    args = (hidden, weight, targets, lse, entropy, *grads, 1.0)
    for g, e in zip(cuda_backend.backward(*args), chunked.backward(*args), strict=True):
        torch.testing.assert_close(g, e, atol=TOL[dtype] * 4, rtol=TOL[dtype])


@pytest.mark.parametrize("rows", [slice(0, 500), slice(1000, 1500), slice(TOKEN_CHUNK, None)])
def test_a_token_does_not_depend_on_its_batch(rows):
    """Rows computed inside a batch of two chunks (the first read in place, the second a padded copy) and
    alone (one padded chunk, at other positions): bitwise the same statistics and d(hidden) rows, since
    every GEMM has one shape."""
    hidden, weight, targets = _problem(torch.bfloat16, tokens=TOKEN_CHUNK + 500, vocab=9000, dim=32, seed=6)
    whole = cuda_backend.forward(hidden, weight, targets, 1.0, -100, True, True)
    alone = cuda_backend.forward(hidden[rows], weight, targets[rows], 1.0, -100, True, True)
    for w, a in zip(whole, alone, strict=True):
        assert torch.equal(w[rows], a)
    valid = targets != -100
    grad_logp = torch.where(valid, torch.randn(targets.shape, device="cuda"), 0.0)
    grad_whole, _ = cuda_backend.backward(hidden, weight, targets, whole[3], None, grad_logp, None, None, 1.0)
    grad_alone, _ = cuda_backend.backward(hidden[rows], weight, targets[rows], alone[3], None, grad_logp[rows],
                                          None, None, 1.0)  # fmt: skip
    assert torch.equal(grad_whole[rows], grad_alone)


def test_empty_batch():
    hidden, weight, _ = _problem(torch.float32, tokens=0)
    logp, entropy, mean_logp, lse = cuda_backend.forward(
        hidden, weight, torch.zeros(0, dtype=torch.long, device="cuda"), 1.0, -100, True, True
    )
    assert logp.shape == entropy.shape == mean_logp.shape == lse.shape == (0,)


def test_public_op_selects_the_cuda_backend(monkeypatch):
    """QWENLONG_BACKEND=cuda routes linear_logprobs through the extension: same values and
    gradients as the PyTorch chunked path."""
    from qwenlong.kernels import linear_logprobs

    gen = torch.Generator(device="cuda").manual_seed(5)
    hidden = torch.randn(300, 64, device="cuda", generator=gen, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(5000, 64, device="cuda", generator=gen) / 8).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 5000, (300,), device="cuda", generator=gen)
    results = {}
    for backend in ("cuda", "torch"):
        monkeypatch.setenv("QWENLONG_BACKEND", backend)
        logp, entropy = linear_logprobs(hidden, weight, targets, temperature=0.8, return_entropy=True)
        grads = torch.autograd.grad((logp + 0.5 * entropy).sum(), (hidden, weight))
        results[backend] = (logp, entropy, *grads)
    for got, expected in zip(results["cuda"], results["torch"], strict=True):
        torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_logits_give_the_recomputing_paths_results(dtype):
    """One token chunk with kept logits (V = 20,001: the buffer's rows padded to 20,004 columns): the forward's
    statistics are the plain forward's and the buffer holds hidden @ weight.T / tau (the padded rows 0); the
    backward that reads it instead of recomputing gives the recomputing backward's gradients, and with an fp32
    grad_weight_sum adds d(weight) to it and returns that tensor."""
    tokens, vocab = 700, 20_001
    hidden, weight, targets = _problem(dtype, tokens=tokens, vocab=vocab, seed=8)
    kept = cuda_backend.kept_logits(tokens, vocab, hidden.device)
    assert kept.shape == (TOKEN_CHUNK, 20_004)
    got = cuda_backend.forward(hidden, weight, targets, 0.7, -100, True, True, kept_logits=kept)
    plain = cuda_backend.forward(hidden, weight, targets, 0.7, -100, True, True)
    for name, g, p in zip(("logp", "entropy", "mean_logp", "lse"), got, plain, strict=True):
        torch.testing.assert_close(g, p, atol=1e-5, rtol=1e-6, msg=name)
    expected_logits = hidden.double() @ weight.double().T / 0.7
    torch.testing.assert_close(kept[:tokens, :vocab].double(), expected_logits, atol=TOL[dtype] * 5, rtol=TOL[dtype])
    assert torch.equal(kept[tokens:, :vocab], torch.zeros_like(kept[tokens:, :vocab]))
    valid = targets != -100
    gen = torch.Generator(device="cuda").manual_seed(9)
    grads = [torch.where(valid, torch.randn(targets.shape, device="cuda", generator=gen), 0.0) for _ in range(3)]
    args = (hidden, weight, targets, plain[3], plain[1], *grads, 0.7)
    recomputed = cuda_backend.backward(*args)
    from_kept = cuda_backend.backward(*args, kept_logits=kept)
    for g, e in zip(from_kept, recomputed, strict=True):  # bf16: a logit's last bit may round dz the other way
        assert g.dtype == e.dtype
        torch.testing.assert_close(g, e, atol=TOL[dtype] / 10, rtol=TOL[dtype] / 10)
    weight_sum = torch.full(weight.shape, 0.5, device="cuda")
    _, summed = cuda_backend.backward(*args, kept_logits=kept, grad_weight_sum=weight_sum)
    assert summed is weight_sum
    torch.testing.assert_close(summed, 0.5 + recomputed[1].float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gradients_in_forward_through_the_extension(dtype, monkeypatch):
    """linear_cross_entropy(grad_in_forward=True) on the extension: 2 x 4096 + 500 tokens, a sixth of them ignored,
    so the valid rows take three kept-logits chunks and d(weight) an fp32 sum over them: loss and gradients as the
    chunked PyTorch path's (which tests bit for bit against its recomputing backward)."""
    from qwenlong.kernels import linear_cross_entropy

    hidden, weight, targets = _problem(dtype, tokens=2 * TOKEN_CHUNK + 500, vocab=9000, dim=32, seed=10)
    targets[1::6] = -100
    results = {}
    for backend in ("cuda", "torch"):
        monkeypatch.setenv("QWENLONG_BACKEND", backend)
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        loss = linear_cross_entropy(h, w, targets, label_smoothing=0.1, grad_in_forward=True)
        results[backend] = (loss, *torch.autograd.grad(loss * 2.0, (h, w)))
    # the gradients are small (max |d hidden| ~2e-4, |d weight| ~2e-3: the mean over ~6,300 valid rows), so an absolute
    # 2e-3 would pass zeros: atol is a share of the largest expected entry. The extension rounds dz to the inputs'
    # dtype: emulated on CPU that costs 0.17% of the largest entry in bf16, 2.7% in fp16 (2/3 of dz's entries, ~1e-8,
    # flush to 0 in fp16 before the loss scale is applied: a known precision limit of fp16 gradients in the forward)
    share = {torch.bfloat16: 1e-2, torch.float16: 6e-2}[dtype]
    for name, got, expected in zip(("loss", "hidden", "weight"), results["cuda"], results["torch"], strict=True):
        assert got.dtype == expected.dtype, name
        atol = 2e-3 if name == "loss" else share * expected.float().abs().max().item()
        torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=atol, msg=name)
