// Rotary position embedding, applied in place to packed q or k.
//
// For token t at position p = position_ids[t] and pair i < d/2 of a head of size d, with
// angle a = p * inv_freq[i] (inv_freq[i] = theta^(-2i/d), computed by the caller exactly as
// the PyTorch path does):
//     x[i]       <- x[i] cos a - x[i + d/2] sin a
//     x[i + d/2] <- x[i + d/2] cos a + x[i] sin a
// The backward pass is the same rotation by -a (a rotation's transpose is its inverse).
//
// One block per token: thread x owns pair i and computes its sine and cosine once, then
// walks the heads (threads y split them). Loads widen to fp32, stores round once.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "rotary.h"

namespace qwenlong::cuda {
namespace {

constexpr int kMaxHeadDim = 256;

template <typename scalar_t, typename position_t>
__global__ void rotary_packed_kernel(scalar_t* __restrict__ x, const position_t* __restrict__ position_ids,
                                     const float* __restrict__ inv_freq, int64_t token_stride,
                                     int64_t head_stride, int heads, int half, float sin_sign) {
  const int64_t token = blockIdx.x;
  const int i = threadIdx.x;
  if (i >= half) return;
  // The angle is formed in fp32 like the PyTorch path; its sine and cosine are taken in
  // fp64 because --use_fast_math turns sincosf into an intrinsic without range reduction,
  // and angles reach position_ids.max() radians.
  const float angle = static_cast<float>(position_ids[token]) * inv_freq[i];
  double sin_d, cos_d;
  sincos(static_cast<double>(angle), &sin_d, &cos_d);
  const float cos_a = static_cast<float>(cos_d);
  const float sin_a = sin_sign * static_cast<float>(sin_d);
  for (int h = threadIdx.y; h < heads; h += blockDim.y) {
    scalar_t* pair = x + token * token_stride + h * head_stride;
    const float x1 = static_cast<float>(pair[i]);
    const float x2 = static_cast<float>(pair[i + half]);
    pair[i] = static_cast<scalar_t>(x1 * cos_a - x2 * sin_a);
    pair[i + half] = static_cast<scalar_t>(x2 * cos_a + x1 * sin_a);
  }
}

}  // namespace

void rotary_packed_(torch::Tensor x, const torch::Tensor& position_ids, const torch::Tensor& inv_freq,
                    bool inverse) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 3, "x must be (total, heads, head_dim), got ", x.sizes());
  TORCH_CHECK(x.stride(2) == 1, "x must be contiguous in head_dim, got strides ", x.strides());
  const int64_t total = x.size(0);
  const int64_t head_dim = x.size(2);
  TORCH_CHECK(head_dim % 2 == 0 && head_dim <= kMaxHeadDim, "head_dim must be even and at most ", kMaxHeadDim,
              ", got ", head_dim);
  TORCH_CHECK(position_ids.dim() == 1 && position_ids.size(0) == total, "position_ids must be (", total, "), got ",
              position_ids.sizes());
  TORCH_CHECK(position_ids.is_contiguous() && position_ids.device() == x.device(),
              "position_ids must be contiguous and on x's device");
  TORCH_CHECK(inv_freq.scalar_type() == torch::kFloat32 && inv_freq.is_contiguous() &&
                  inv_freq.numel() == head_dim / 2 && inv_freq.device() == x.device(),
              "inv_freq must be contiguous fp32 with head_dim / 2 entries on x's device");
  if (x.numel() == 0) return;  // also head_dim 0: threads_x would be 0 and 256 / threads_x divide by zero

  const c10::cuda::CUDAGuard guard(x.device());
  const int half = static_cast<int>(head_dim / 2);
  const int threads_x = std::min(128, (half + 31) / 32 * 32);
  const dim3 block(threads_x, std::max(1, 256 / threads_x));
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rotary_packed_", [&] {
    AT_DISPATCH_INDEX_TYPES(position_ids.scalar_type(), "rotary_packed_positions", [&] {
      rotary_packed_kernel<scalar_t, index_t><<<total, block, 0, stream>>>(
          x.data_ptr<scalar_t>(), position_ids.data_ptr<index_t>(), inv_freq.data_ptr<float>(), x.stride(0),
          x.stride(1), static_cast<int>(x.size(1)), half, inverse ? -1.0f : 1.0f);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace qwenlong::cuda
