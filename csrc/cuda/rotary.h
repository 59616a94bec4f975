// Rotary position embedding on packed q and k (csrc/cuda/rotary.cu).
#pragma once

#include <torch/types.h>

namespace qwenlong::cuda {

// Rotates x (total, heads, head_dim), packed q or k, in place by the angles
// position_ids[t] * inv_freq[i] (rotate-half layout), or by their negatives when `inverse`
// (the backward pass). fp16 / bf16 / fp32, fp32 math, head_dim <= 256, any token and head
// strides (head_dim contiguous).
void rotary_packed_(torch::Tensor x, const torch::Tensor& position_ids, const torch::Tensor& inv_freq,
                    bool inverse);

}  // namespace qwenlong::cuda
