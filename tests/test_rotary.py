"""Rotary embedding on packed q/k: the PyTorch path against a complex128 reference and
Hugging Face's Qwen2 rotary, gradients, in-place use on views, errors; the CUDA path
against the PyTorch path on a GPU."""

from __future__ import annotations

import pytest
import torch

from qwenlong import _C
from qwenlong.kernels import apply_rotary_packed, build_position_ids

THETA = 1_000_000.0
TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def reference_rotary(x: torch.Tensor, position_ids: torch.Tensor, theta: float) -> torch.Tensor:
    """Independent float64 reference: each pair (x[i], x[i + d/2]) as the complex number
    x[i] + j x[i + d/2], multiplied by exp(j p theta^(-2i/d))."""
    half = x.shape[-1] // 2
    x = x.double()
    exponent = torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1]
    angle = position_ids.double()[:, None] * theta ** (-exponent)
    z = torch.complex(x[..., :half], x[..., half:]) * torch.polar(torch.ones_like(angle), angle)[:, None, :]
    return torch.cat([z.real, z.imag], dim=-1)


def packed_batch(lengths, q_heads, k_heads, head_dim, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(total, q_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    k = torch.randn(total, k_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    return q, k, build_position_ids(lengths, device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("q_heads", "k_heads", "head_dim"), [(4, 2, 64), (3, 1, 80), (2, 2, 2), (1, 1, 256)])
def test_torch_path_matches_reference(dtype, q_heads, k_heads, head_dim):
    q, k, position_ids = packed_batch([37, 0, 120, 5, 90], q_heads, k_heads, head_dim, dtype)
    q_out, k_out = apply_rotary_packed(q, k, position_ids, theta=THETA)
    assert q_out.dtype == dtype and k_out.dtype == dtype
    tol = TOL[dtype]
    torch.testing.assert_close(q_out.double(), reference_rotary(q, position_ids, THETA), atol=tol, rtol=tol)
    torch.testing.assert_close(k_out.double(), reference_rotary(k, position_ids, THETA), atol=tol, rtol=tol)


def test_long_positions_match_reference_and_hugging_face():
    """Up to position 131k the fp32 angle carries ~1e-2 rad of rounding; Hugging Face forms
    it the same way, so against HF the match is tight, against the exact angle it is loose."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding, apply_rotary_pos_emb

    heads, head_dim = 2, 128
    far = torch.randint(4, 131_072, (60,), generator=torch.Generator().manual_seed(0))
    position_ids = torch.cat([torch.arange(4), far])
    q, k, _ = packed_batch([position_ids.numel()], heads, heads, head_dim, torch.float32)
    q_out, k_out = apply_rotary_packed(q, k, position_ids, theta=THETA)

    config = transformers.Qwen2Config(hidden_size=heads * head_dim, num_attention_heads=heads,
                                      num_key_value_heads=heads, rope_parameters={"rope_type": "default",
                                                                                  "rope_theta": THETA})
    cos, sin = Qwen2RotaryEmbedding(config=config)(q, position_ids[None])
    q_hf, k_hf = apply_rotary_pos_emb(q[None], k[None], cos, sin, unsqueeze_dim=2)
    torch.testing.assert_close(q_out, q_hf[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(k_out, k_hf[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(q_out.double(), reference_rotary(q, position_ids, THETA), atol=5e-2, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_match_reference(dtype):
    q, k, position_ids = packed_batch([50, 1, 70], 4, 2, 64, dtype, seed=1)
    q.requires_grad_(True)
    k.requires_grad_(True)
    q_out, k_out = apply_rotary_packed(q, k, position_ids, theta=10_000.0)
    grad_q, grad_k = torch.randn_like(q_out), torch.randn_like(k_out)
    torch.autograd.backward((q_out, k_out), (grad_q, grad_k))

    q64 = q.detach().double().requires_grad_(True)
    k64 = k.detach().double().requires_grad_(True)
    torch.autograd.backward(
        (reference_rotary(q64, position_ids, 10_000.0), reference_rotary(k64, position_ids, 10_000.0)),
        (grad_q.double(), grad_k.double()),
    )
    tol = TOL[dtype]
    torch.testing.assert_close(q.grad.double(), q64.grad, atol=tol, rtol=tol)
    torch.testing.assert_close(k.grad.double(), k64.grad, atol=tol, rtol=tol)


def test_only_q_used_still_differentiates():
    q, k, position_ids = packed_batch([9, 4], 2, 1, 16, torch.float32)
    q.requires_grad_(True)
    q_out, _ = apply_rotary_packed(q, k, position_ids)
    q_out.sum().backward()
    expected = reference_rotary(torch.ones_like(q), -position_ids, THETA)  # backward = rotation by -angle
    torch.testing.assert_close(q.grad.double(), expected, atol=1e-5, rtol=1e-5)


def test_inplace_refuses_one_tensor_as_q_and_k():
    """It would be rotated twice; out of place it is rotated once for each output."""
    x, _, position_ids = packed_batch([5, 7], 2, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="q and k are the same memory"):
        apply_rotary_packed(x, x, position_ids, inplace=True)
    q_out, k_out = apply_rotary_packed(x, x, position_ids)
    torch.testing.assert_close(q_out.double(), reference_rotary(x, position_ids, THETA), atol=1e-5, rtol=1e-5)
    assert torch.equal(q_out, k_out)


def test_inplace_on_views_of_a_fused_projection():
    """q and k as strided views of one qkv tensor: rotated in place, v untouched, gradients flow."""
    total_heads, q_heads, k_heads, head_dim = 8, 4, 2, 32
    _, _, position_ids = packed_batch([20, 30], 1, 1, 2, torch.float32)
    weight = torch.randn(50, total_heads, head_dim, requires_grad=True)
    qkv = weight * 1.0
    q, k, v = qkv[:, :q_heads], qkv[:, q_heads : q_heads + k_heads], qkv[:, q_heads + k_heads :]
    expected_q = reference_rotary(q.detach(), position_ids, THETA)
    expected_k = reference_rotary(k.detach(), position_ids, THETA)
    v_before = v.detach().clone()

    q_out, k_out = apply_rotary_packed(q, k, position_ids, inplace=True)
    assert q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr()
    torch.testing.assert_close(qkv[:, :q_heads].detach().double(), expected_q, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(qkv[:, q_heads : q_heads + k_heads].detach().double(), expected_k, atol=1e-4, rtol=1e-4)
    assert torch.equal(qkv[:, q_heads + k_heads :].detach(), v_before)

    qkv.sum().backward()
    rotated_ones = reference_rotary(torch.ones(50, q_heads + k_heads, head_dim), -position_ids, THETA)
    torch.testing.assert_close(weight.grad[:, : q_heads + k_heads].double(), rotated_ones, atol=1e-5, rtol=1e-5)
    assert torch.equal(weight.grad[:, q_heads + k_heads :], torch.ones(50, 2, head_dim))


def test_out_of_place_leaves_inputs_alone():
    q, k, position_ids = packed_batch([10, 10], 2, 2, 8, torch.float32)
    q_before, k_before = q.clone(), k.clone()
    apply_rotary_packed(q, k, position_ids, backend="torch")
    assert torch.equal(q, q_before) and torch.equal(k, k_before)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda q, k, p: (q[..., :7], k[..., :7], p), r"q.shape\[2\] \(head_dim\) must be even"),
        (lambda q, k, p: (q.new_zeros(10, 1, 258), k.new_zeros(10, 1, 258), p), r"at most 256"),
        (lambda q, k, p: (q, k[:5], p), r"k.shape\[0\] must equal q.shape\[0\]"),
        (lambda q, k, p: (q, k, p[:5]), r"position_ids.shape\[0\] must equal"),
        (lambda q, k, p: (q, k, p.float()), r"position_ids must have dtype in \(int32, int64\)"),
        (lambda q, k, p: (q, k.half(), p), r"k must have dtype in \(float32\)"),
        (lambda q, k, p: (q.transpose(1, 2), k.transpose(1, 2), p), r"q.shape\[2\] must equal|must be contiguous"),
        (lambda q, k, p: (q[0], k, p), r"q must have 3 dimensions"),
    ],
)
def test_errors_name_the_argument(make, message):
    q, k, position_ids = packed_batch([4, 6], 2, 2, 8, torch.float32)
    with pytest.raises(ValueError, match=message):
        apply_rotary_packed(*make(q, k, position_ids))


def test_bad_theta_and_backend():
    q, k, position_ids = packed_batch([4], 1, 1, 8, torch.float32)
    with pytest.raises(ValueError, match="theta must be positive"):
        apply_rotary_packed(q, k, position_ids, theta=0.0)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        apply_rotary_packed(q, k, position_ids, backend="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(_C.cuda is None, reason=f"qwenlong._C._cuda not built: {_C.cuda_error}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
# head_dim 0: nothing to rotate (the extension divided by zero on the host choosing its block shape)
@pytest.mark.parametrize(("q_heads", "k_heads", "head_dim"),
                         [(8, 2, 128), (5, 1, 80), (2, 2, 256), (3, 3, 2), (2, 1, 0)])
@pytest.mark.parametrize("position_dtype", [torch.int32, torch.int64])
def test_cuda_path_matches_torch_path(dtype, q_heads, k_heads, head_dim, position_dtype):
    lengths = [1, 300, 0, 4000, 77]
    q, k, position_ids = packed_batch(lengths, q_heads, k_heads, head_dim, dtype, device="cuda", seed=3)
    position_ids = position_ids.to(position_dtype)
    outputs, grads = {}, {}
    for backend in ("cuda", "torch"):
        q_in, k_in = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
        q_out, k_out = apply_rotary_packed(q_in, k_in, position_ids, theta=THETA, backend=backend)
        gen = torch.Generator(device="cuda").manual_seed(4)
        grad_q = torch.randn(q_out.shape, generator=gen, device="cuda").to(dtype)
        grad_k = torch.randn(k_out.shape, generator=gen, device="cuda").to(dtype)
        torch.autograd.backward((q_out, k_out), (grad_q, grad_k))
        outputs[backend], grads[backend] = (q_out, k_out), (q_in.grad, k_in.grad)
    tol = TOL[dtype] if dtype != torch.float32 else 2e-5
    for got, expected in zip(outputs["cuda"] + grads["cuda"], outputs["torch"] + grads["torch"], strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


@pytest.mark.gpu
@pytest.mark.skipif(_C.cuda is None, reason=f"qwenlong._C._cuda not built: {_C.cuda_error}")
def test_cuda_inplace_on_fused_view_writes_every_element_once():
    qkv = torch.randn(2000, 12, 64, device="cuda", dtype=torch.bfloat16)
    position_ids = build_position_ids([500, 1500], device="cuda")
    expected_q, expected_k = apply_rotary_packed(qkv[:, :8], qkv[:, 8:10], position_ids, backend="torch")
    v_before = qkv[:, 10:].clone()
    apply_rotary_packed(qkv[:, :8], qkv[:, 8:10], position_ids, inplace=True, backend="cuda")
    torch.testing.assert_close(qkv[:, :8], expected_q, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(qkv[:, 8:10], expected_k, atol=3e-2, rtol=3e-2)
    assert torch.equal(qkv[:, 10:], v_before)
