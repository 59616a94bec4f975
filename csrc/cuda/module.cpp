// Entry point of qwenlong._C._cuda: the CUDA ops, each declared in its own header.
#include <torch/extension.h>

#include "linear_logprobs.h"
#include "rotary.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "qwenlong CUDA ops";
  m.def("rotary_packed_", &qwenlong::cuda::rotary_packed_, py::arg("x"), py::arg("position_ids"),
        py::arg("inv_freq"), py::arg("inverse"),
        "Rotates packed q or k (total, heads, head_dim) in place by position_ids * inv_freq (rotate-half layout); "
        "`inverse` rotates back (the backward pass).");
  m.def("linear_logprobs_forward", &qwenlong::cuda::linear_logprobs_forward, py::arg("hidden"), py::arg("weight"),
        py::arg("targets"), py::arg("temperature"), py::arg("ignore_index"), py::arg("logits") = py::none(),
        "Per-token fp32 [logp, entropy, mean_logp, lse] of hidden @ weight.T / temperature (cuBLAS tiles + fused "
        "epilogue); `logits` (fp32, 4096 x >= V) keeps the logits of a batch of one token chunk.");
  m.def("linear_logprobs_backward", &qwenlong::cuda::linear_logprobs_backward, py::arg("hidden"), py::arg("weight"),
        py::arg("targets"), py::arg("lse"), py::arg("entropy"), py::arg("grad_logp"), py::arg("grad_entropy"),
        py::arg("grad_mean_logp"), py::arg("temperature"), py::arg("logits") = py::none(),
        py::arg("grad_weight_sum") = py::none(),
        "[grad_hidden (fp32), grad_weight]; output gradients must be zero on ignored rows. `logits`: kept by the "
        "forward (no recompute); `grad_weight_sum`: an fp32 d(weight) sum to add to and return.");
}
