// CUDA backend of the fused LM-head statistics (csrc/cuda/linear_logprobs.cu): cuBLAS
// computes one fp32 logits tile at a time, a fused epilogue consumes it.
#pragma once

#include <torch/types.h>

#include <optional>
#include <vector>

namespace qwenlong::cuda {

// Per-token fp32 {logp, entropy, mean_logp, lse} of z = hidden weight^T / temperature,
// with logp, entropy and mean_logp zero where targets == ignore_index. Same contract as
// kernels/logprobs/chunked.py::forward (which computes entropy / mean_logp only on request;
// here they cost nothing extra and are always returned). `logits` (fp32, kTokenChunk x >= V,
// the batch one token chunk): the logits are also kept there, for a backward without recompute.
std::vector<torch::Tensor> linear_logprobs_forward(const torch::Tensor& hidden, const torch::Tensor& weight,
                                                   const torch::Tensor& targets, double temperature,
                                                   int64_t ignore_index, const std::optional<torch::Tensor>& logits);

// {grad_hidden (fp32), grad_weight (the weight's dtype)}; the output gradients must already be
// zero on ignored rows; entropy is needed with grad_entropy. Same contract as chunked.py::backward:
// `logits` kept by the forward are read instead of recomputed; d(weight) is added to
// `grad_weight_sum` (fp32, the weight's shape) when given, and that tensor returned.
std::vector<torch::Tensor> linear_logprobs_backward(const torch::Tensor& hidden, const torch::Tensor& weight,
                                                    const torch::Tensor& targets, const torch::Tensor& lse,
                                                    const std::optional<torch::Tensor>& entropy,
                                                    const torch::Tensor& grad_logp,
                                                    const std::optional<torch::Tensor>& grad_entropy,
                                                    const std::optional<torch::Tensor>& grad_mean_logp,
                                                    double temperature, const std::optional<torch::Tensor>& logits,
                                                    const std::optional<torch::Tensor>& grad_weight_sum);

}  // namespace qwenlong::cuda
