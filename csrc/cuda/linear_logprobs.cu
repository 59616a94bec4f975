// Fused LM-head statistics on CUDA: cuBLAS GEMM per tile, fused epilogue per tile.
//
// Tokens are cut into chunks of kTokenChunk rows, the vocabulary into chunks of kVocabChunk at
// fixed offsets. Full token chunks are read from hidden in place; only the last, partial one is
// copied into a zero-padded buffer, so every GEMM has the same shape whatever the batch (a
// token's results do not depend on its batch). The chunks are large (4096 x 8192) so the
// gradient GEMMs have K = 4096 or 8192 and each fp32 gradient block is rewritten only once per
// chunk of the other dimension. For each (vocabulary, token) chunk:
//
//   forward:  Z = H_c W_c^T / tau (fp32 out, fp32 accumulate), then one pass over each row
//             of Z merges (max m, s = sum e^(z-m), a = sum e^(z-m)(z-m)) into the running
//             per-token state, adds sum z and picks the target logit. At the end
//             lse = m + log s, logp = z_t - lse, H = log s - a/s, mean_logp = sum z / V - lse.
//             a is kept relative to the running max, so logits of 1e4 lose nothing.
//   backward: recompute Z; the epilogue writes the logit gradient in the inputs' dtype
//             dz = g_mean/V - p (g_logp + g_mean + g_H (log p + H)) + g_logp [j = t],
//             (fp16/bf16: a second tile, the GEMM operand as it is; fp32: in place), then
//             dH_c += dZ W_c / tau and dW_c += dZ^T H_c / tau (cuBLAS, fp32 accumulators).
//             The vocabulary loop is the outer one, so a chunk's dW_c is complete after its token
//             loop: it is summed in one fp32 chunk buffer and rounded into the weight's dtype then.
//             Extra memory is fp32 dH (T x d) and a few chunk buffers, never an fp32 copy of W.
//
// Gradients in the forward (a scalar loss, driven by kernels/logprobs/valid_rows.py::ValidRowLoss): the caller
// passes one token chunk of rows and a kept-logits buffer (kTokenChunk x V, fp32). The forward's GEMMs write
// their tiles there instead of into the scratch tile, and the backward reads them back instead of recomputing:
// 6 instead of 8 T d V FLOPs. An fp32 d(weight) sum passed in is added to (over the caller's token chunks).
//
// Every accumulation runs in a fixed order, so results are reproducible bit for bit.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublas_v2.h>

#include <cfloat>
#include <cstdint>

#include "linear_logprobs.h"

namespace qwenlong::cuda {
namespace {

constexpr int64_t kTokenChunk = 4096;
constexpr int64_t kVocabChunk = 8192;
constexpr int kThreads = 256;

// Softmax statistics of a set of logits, relative to their max.
struct SoftmaxStats {
  float max;      // m
  float sum;      // s = sum e^(z - m)
  float shifted;  // a = sum e^(z - m) (z - m)
};

// Both sides moved to the larger max: e^(m1-m) scales s1 and a1 + (m1 - m) s1. An empty
// side (max -FLT_MAX, sums 0) contributes exactly 0.
__device__ __forceinline__ SoftmaxStats merge(const SoftmaxStats& x, const SoftmaxStats& y) {
  const float m = fmaxf(x.max, y.max);
  const float ex = __expf(x.max - m), ey = __expf(y.max - m);
  return {m, x.sum * ex + y.sum * ey,
          ex * (x.shifted + (x.max - m) * x.sum) + ey * (y.shifted + (y.max - m) * y.sum)};
}

__device__ __forceinline__ SoftmaxStats shuffle_down(const SoftmaxStats& v, int offset) {
  return {__shfl_down_sync(0xffffffffu, v.max, offset), __shfl_down_sync(0xffffffffu, v.sum, offset),
          __shfl_down_sync(0xffffffffu, v.shifted, offset)};
}

// One block per token row of the tile: merges the row's statistics into the running state.
__global__ void logits_stats_kernel(const float* __restrict__ tile, int64_t ld, int64_t columns,
                                    const int64_t* __restrict__ targets, int64_t vocab_start,
                                    float* __restrict__ running_max, float* __restrict__ running_sum,
                                    float* __restrict__ running_shifted, float* __restrict__ logit_sum,
                                    float* __restrict__ target_logit) {
  const int64_t row = blockIdx.x;
  const float* z = tile + row * ld;
  const int64_t target = targets[row] - vocab_start;
  SoftmaxStats stats{-FLT_MAX, 0.0f, 0.0f};
  float total = 0.0f;
  for (int64_t j = threadIdx.x; j < columns; j += blockDim.x) {
    const float value = z[j];
    total += value;
    if (j == target) target_logit[row] += value;  // one thread of one vocabulary chunk
    if (value <= stats.max) {
      const float e = __expf(value - stats.max);
      stats.sum += e;
      stats.shifted += e * (value - stats.max);
    } else {  // a new max: move the state onto it (first column: the state is empty, stays 0)
      const float rescale = __expf(stats.max - value);
      stats.shifted = rescale * (stats.shifted + (stats.max - value) * stats.sum);
      stats.sum = rescale * stats.sum + 1.0f;
      stats.max = value;
    }
  }
  for (int offset = 16; offset > 0; offset >>= 1) {
    stats = merge(stats, shuffle_down(stats, offset));
    total += __shfl_down_sync(0xffffffffu, total, offset);
  }
  __shared__ SoftmaxStats warp_stats[kThreads / 32];
  __shared__ float warp_totals[kThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    warp_stats[warp] = stats;
    warp_totals[warp] = total;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    SoftmaxStats row_stats{running_max[row], running_sum[row], running_shifted[row]};
    float row_total = 0.0f;
    for (int w = 0; w < kThreads / 32; ++w) {
      row_stats = merge(row_stats, warp_stats[w]);
      row_total += warp_totals[w];
    }
    running_max[row] = row_stats.max;
    running_sum[row] = row_stats.sum;
    running_shifted[row] = row_stats.shifted;
    logit_sum[row] += row_total;
  }
}

// One block per token row: writes d(outputs)/d(tempered logits) of the logits tile (leading dimension
// `ld`) into `out` (leading dimension `out_ld`; `out` may be the tile itself). Rows at or past `rows` are
// padding and get 0. entropy / grad_entropy / grad_mean may be null.
template <typename scalar_t>
__global__ void dlogits_kernel(const float* tile, int64_t ld, scalar_t* out, int64_t out_ld, int64_t columns,
                               int64_t rows,
                               const int64_t* __restrict__ targets, int64_t vocab_start,
                               const float* __restrict__ lse, const float* __restrict__ entropy,
                               const float* __restrict__ grad_logp, const float* __restrict__ grad_entropy,
                               const float* __restrict__ grad_mean, float inv_vocab) {
  const int64_t row = blockIdx.x;
  const float* z = tile + row * ld;
  scalar_t* dz_row = out + row * out_ld;
  if (row >= rows) {
    for (int64_t j = threadIdx.x; j < columns; j += blockDim.x) dz_row[j] = static_cast<scalar_t>(0.0f);
    return;
  }
  const float g_logp = grad_logp[row];
  const float g_entropy = grad_entropy ? grad_entropy[row] : 0.0f;
  const float g_mean = grad_mean ? grad_mean[row] : 0.0f;
  const float row_entropy = entropy ? entropy[row] : 0.0f;
  const float row_lse = lse[row];
  const int64_t target = targets[row] - vocab_start;
  for (int64_t j = threadIdx.x; j < columns; j += blockDim.x) {
    const float log_p = z[j] - row_lse;
    const float p = __expf(log_p);
    float dz = g_mean * inv_vocab - p * (g_logp + g_mean + g_entropy * (log_p + row_entropy));
    if (j == target) dz += g_logp;
    dz_row[j] = static_cast<scalar_t>(dz);
  }
}

cudaDataType_t cublas_type(at::ScalarType type) {
  TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16,
              "hidden and weight must be fp32, fp16 or bf16, got ", type);
  return type == at::kFloat ? CUDA_R_32F : type == at::kHalf ? CUDA_R_16F : CUDA_R_16BF;
}

// Column-major C (m x n, fp32) = alpha op(A) op(B) + beta C, with A and B of `type` and fp32
// accumulation (no TF32). Row-major callers pass their matrices transposed.
void gemm(cublasOperation_t op_a, cublasOperation_t op_b, int64_t m, int64_t n, int64_t k, float alpha,
          const void* a, int64_t lda, const void* b, int64_t ldb, float beta, float* c, int64_t ldc,
          cudaDataType_t type) {
  TORCH_CUDABLAS_CHECK(cublasGemmEx(at::cuda::getCurrentCUDABlasHandle(), op_a, op_b, m, n, k, &alpha, a, type, lda,
                                    b, type, ldb, &beta, c, CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F,
                                    CUBLAS_GEMM_DEFAULT));
}

const void* rows_of(const torch::Tensor& matrix, int64_t row) {
  return static_cast<const char*>(matrix.data_ptr()) + row * matrix.stride(0) * matrix.element_size();
}

// The argument checks both directions share.
void check_inputs(const torch::Tensor& hidden, const torch::Tensor& weight, const torch::Tensor& targets) {
  TORCH_CHECK(hidden.is_cuda() && weight.device() == hidden.device() && targets.device() == hidden.device(),
              "hidden, weight and targets must be on one CUDA device");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "hidden (T, d) and weight (V, d) must share d, got ", hidden.sizes(), " and ", weight.sizes());
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(), "hidden and weight must share a dtype");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0) && targets.scalar_type() == at::kLong,
              "targets must be int64 (T,)");
}

// The token chunks of a row-contiguous hidden: full chunks are read where they are, the last partial
// one from a zero-padded copy of kTokenChunk rows.
class TokenChunks {
 public:
  explicit TokenChunks(const torch::Tensor& hidden) : hidden_(hidden), tokens_(hidden.size(0)) {
    const int64_t full = tokens_ / kTokenChunk * kTokenChunk;
    if (full < tokens_) {
      last_ = at::zeros({kTokenChunk, hidden.size(1)}, hidden.options());
      last_.narrow(0, 0, tokens_ - full).copy_(hidden.narrow(0, full, tokens_ - full));
    }
  }
  // The kTokenChunk rows starting at token t0 (a multiple of kTokenChunk).
  const void* rows(int64_t t0) const { return t0 + kTokenChunk <= tokens_ ? rows_of(hidden_, t0) : last_.data_ptr(); }

 private:
  torch::Tensor hidden_, last_;
  int64_t tokens_;
};

// Z = H_c W_c^T / tau for token chunk t0 and vocabulary chunk [v0, v0 + columns), into `out`: kTokenChunk
// rows of leading dimension `ld`, row-major; only the first `columns` columns are written.
void logits_tile(const TokenChunks& chunks, const torch::Tensor& weight, int64_t t0, int64_t v0, int64_t columns,
                 float inv_temperature, float* out, int64_t ld) {
  const int64_t d = weight.size(1);
  gemm(CUBLAS_OP_T, CUBLAS_OP_N, columns, kTokenChunk, d, inv_temperature, rows_of(weight, v0), d,
       chunks.rows(t0), d, 0.0f, out, ld, cublas_type(weight.scalar_type()));
}

// The kept-logits buffer of gradients in the forward: fp32, kTokenChunk rows of at least `vocab` columns that
// do not overlap, each starting on 16 bytes (cuBLAS's fast paths), on hidden's device; the batch fits one chunk.
void check_kept_logits(const torch::Tensor& logits, const torch::Tensor& hidden, int64_t vocab) {
  TORCH_CHECK(hidden.size(0) <= kTokenChunk, "with kept logits the rows must fit one token chunk (", kTokenChunk,
              "), got ", hidden.size(0));
  TORCH_CHECK(logits.device() == hidden.device() && logits.scalar_type() == at::kFloat && logits.dim() == 2 &&
                  logits.size(0) == kTokenChunk && logits.size(1) >= vocab && logits.stride(1) == 1 &&
                  logits.stride(0) >= logits.size(1) && logits.stride(0) % 4 == 0 &&
                  reinterpret_cast<uintptr_t>(logits.data_ptr()) % 16 == 0,
              "logits must be fp32 (", kTokenChunk, ", >= ", vocab, ") with rows of whole 16 bytes, got ",
              logits.scalar_type(), " ", logits.sizes(), " strides ", logits.strides());
}

}  // namespace

std::vector<torch::Tensor> linear_logprobs_forward(const torch::Tensor& hidden_in, const torch::Tensor& weight_in,
                                                   const torch::Tensor& targets_in, double temperature,
                                                   int64_t ignore_index, const std::optional<torch::Tensor>& logits) {
  const c10::cuda::CUDAGuard guard(hidden_in.device());
  const auto targets = targets_in.contiguous();
  check_inputs(hidden_in, weight_in, targets);
  const auto hidden = hidden_in.contiguous();
  const auto weight = weight_in.contiguous();
  const TokenChunks chunks(hidden);
  const int64_t tokens = targets.size(0), vocab = weight.size(0);
  if (logits) check_kept_logits(*logits, hidden, vocab);
  const auto fp32 = hidden.options().dtype(at::kFloat);
  // running max, sum e^(z - m), sum e^(z - m)(z - m), sum z, target logit
  auto stats = at::zeros({5, std::max<int64_t>(tokens, 1)}, fp32);
  stats[0].fill_(-FLT_MAX);
  // the tiles go to the scratch tile, or with kept logits (one token chunk) to their columns of that buffer
  auto tile = logits ? torch::Tensor() : at::empty({kTokenChunk, kVocabChunk}, fp32);
  const int64_t ld = logits ? logits->stride(0) : kVocabChunk;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const float inv_temperature = static_cast<float>(1.0 / temperature);
  for (int64_t v0 = 0; v0 < vocab; v0 += kVocabChunk) {
    const int64_t columns = std::min(kVocabChunk, vocab - v0);
    float* out = logits ? logits->data_ptr<float>() + v0 : tile.data_ptr<float>();
    for (int64_t t0 = 0; t0 < tokens; t0 += kTokenChunk) {
      logits_tile(chunks, weight, t0, v0, columns, inv_temperature, out, ld);
      const int64_t rows = std::min(kTokenChunk, tokens - t0);
      float* s = stats.data_ptr<float>() + t0;
      const int64_t stride = stats.stride(0);
      logits_stats_kernel<<<rows, kThreads, 0, stream>>>(out, ld, columns,
                                                         targets.data_ptr<int64_t>() + t0, v0, s, s + stride,
                                                         s + 2 * stride, s + 3 * stride, s + 4 * stride);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  stats = stats.narrow(1, 0, tokens);
  const auto valid = targets.ne(ignore_index);
  const auto log_sum = stats[1].log();
  const auto lse = stats[0] + log_sum;
  const auto zero = at::zeros({}, fp32);
  return {at::where(valid, stats[4] - lse, zero), at::where(valid, log_sum - stats[2] / stats[1], zero),
          at::where(valid, stats[3] / static_cast<double>(vocab) - lse, zero), lse};
}

std::vector<torch::Tensor> linear_logprobs_backward(const torch::Tensor& hidden_in, const torch::Tensor& weight_in,
                                                    const torch::Tensor& targets_in, const torch::Tensor& lse_in,
                                                    const std::optional<torch::Tensor>& entropy_in,
                                                    const torch::Tensor& grad_logp_in,
                                                    const std::optional<torch::Tensor>& grad_entropy_in,
                                                    const std::optional<torch::Tensor>& grad_mean_in,
                                                    double temperature, const std::optional<torch::Tensor>& logits,
                                                    const std::optional<torch::Tensor>& grad_weight_sum) {
  const c10::cuda::CUDAGuard guard(hidden_in.device());
  const auto targets = targets_in.contiguous();
  check_inputs(hidden_in, weight_in, targets);
  const auto hidden = hidden_in.contiguous();
  const auto weight = weight_in.contiguous();
  const TokenChunks chunks(hidden);
  const int64_t tokens = targets.size(0), vocab = weight.size(0), d = hidden.size(1);
  TORCH_CHECK(!grad_entropy_in || entropy_in, "grad_entropy needs entropy");
  const auto per_token = [&](const torch::Tensor& x, const char* name) {
    TORCH_CHECK(x.dim() == 1 && x.size(0) == tokens && x.device() == hidden.device(), name, " must be (T,) on ",
                hidden.device());
    return x.to(at::kFloat).contiguous();
  };
  const auto lse = per_token(lse_in, "lse");
  const auto grad_logp = per_token(grad_logp_in, "grad_logp");
  const auto entropy = entropy_in ? per_token(*entropy_in, "entropy") : torch::Tensor();
  const auto grad_entropy = grad_entropy_in ? per_token(*grad_entropy_in, "grad_entropy") : torch::Tensor();
  const auto grad_mean = grad_mean_in ? per_token(*grad_mean_in, "grad_mean_logp") : torch::Tensor();
  const auto at_row = [](const torch::Tensor& x, int64_t t0) {
    return x.defined() ? x.data_ptr<float>() + t0 : nullptr;
  };

  if (logits) check_kept_logits(*logits, hidden, vocab);
  const auto fp32 = hidden.options().dtype(at::kFloat);
  const int64_t padded_tokens = (tokens + kTokenChunk - 1) / kTokenChunk * kTokenChunk;
  auto grad_hidden = at::zeros({padded_tokens, d}, fp32);  // padded rows, sliced at the end
  // d(weight): added to the caller's fp32 sum, or made in the weight's dtype (fp16 / bf16 sum each vocabulary
  // chunk in an fp32 buffer first)
  if (grad_weight_sum) {
    TORCH_CHECK(grad_weight_sum->device() == hidden.device() && grad_weight_sum->scalar_type() == at::kFloat &&
                    grad_weight_sum->sizes() == weight.sizes() && grad_weight_sum->is_contiguous(),
                "grad_weight_sum must be a contiguous fp32 tensor of the weight's shape ", weight.sizes());
  }
  const bool sums_in_place = grad_weight_sum || weight.scalar_type() == at::kFloat;
  auto grad_weight = grad_weight_sum ? *grad_weight_sum
                     : sums_in_place ? at::zeros({vocab, d}, fp32)
                                     : at::empty({vocab, d}, weight.options());
  auto weight_sum = sums_in_place ? torch::Tensor() : at::empty({kVocabChunk, d}, fp32);
  // the logits: the scratch tile (recomputed) or the kept buffer's columns
  auto tile = logits ? torch::Tensor() : at::empty({kTokenChunk, kVocabChunk}, fp32);
  const int64_t ld = logits ? logits->stride(0) : kVocabChunk;
  // the logit gradient in the inputs' dtype, the GEMMs' operand: fp32 inputs write it over the recomputed tile
  auto dlogits = hidden.scalar_type() == at::kFloat && !logits
                     ? tile
                     : at::empty({kTokenChunk, kVocabChunk}, hidden.options());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto type = cublas_type(hidden.scalar_type());
  const float inv_temperature = static_cast<float>(1.0 / temperature);
  for (int64_t v0 = 0; v0 < vocab; v0 += kVocabChunk) {
    const int64_t columns = std::min(kVocabChunk, vocab - v0);
    float* weight_rows = sums_in_place ? grad_weight.data_ptr<float>() + v0 * d : weight_sum.data_ptr<float>();
    if (!sums_in_place) weight_sum.zero_();
    float* z = logits ? logits->data_ptr<float>() + v0 : tile.data_ptr<float>();
    for (int64_t t0 = 0; t0 < tokens; t0 += kTokenChunk) {
      if (!logits) logits_tile(chunks, weight, t0, v0, columns, inv_temperature, z, ld);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "dlogits_kernel", [&] {
        dlogits_kernel<scalar_t><<<kTokenChunk, kThreads, 0, stream>>>(
            z, ld, dlogits.data_ptr<scalar_t>(), kVocabChunk, columns,
            std::min(kTokenChunk, tokens - t0), targets.data_ptr<int64_t>() + t0, v0, at_row(lse, t0),
            at_row(entropy, t0), at_row(grad_logp, t0), at_row(grad_entropy, t0), at_row(grad_mean, t0),
            static_cast<float>(1.0 / vocab));
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      gemm(CUBLAS_OP_N, CUBLAS_OP_N, d, kTokenChunk, columns, inv_temperature, rows_of(weight, v0), d,
           dlogits.data_ptr(), kVocabChunk, 1.0f, grad_hidden.data_ptr<float>() + t0 * d, d, type);
      gemm(CUBLAS_OP_N, CUBLAS_OP_T, d, columns, kTokenChunk, inv_temperature, chunks.rows(t0), d,
           dlogits.data_ptr(), kVocabChunk, 1.0f, weight_rows, d, type);
    }
    if (!sums_in_place) grad_weight.narrow(0, v0, columns).copy_(weight_sum.narrow(0, 0, columns));
  }
  return {grad_hidden.narrow(0, 0, tokens), grad_weight};
}

}  // namespace qwenlong::cuda
