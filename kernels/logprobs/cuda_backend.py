"""The CUDA-extension backend of the fused LM-head statistics (``csrc/cuda/linear_logprobs.cu``).

cuBLAS computes each fp32 logits tile of 4096 tokens x 8192 vocabulary entries (fp32
accumulation), and a fused epilogue consumes it in one pass: forward merges the running max,
sum of exponentials, entropy term, logit sum and target logit; backward writes d(logits) in the
inputs' dtype, the operand of two more cuBLAS GEMMs that form d(hidden) and d(weight) (fp32 sums; d(weight)
is rounded to the weight's dtype one vocabulary chunk at a time, so no fp32 copy of the weight is held). Only the
last token chunk is padded (a copy); every GEMM has the same shape, so a token's results do not
depend on its batch. Same math and the same ``forward`` / ``backward`` contract as
:mod:`.chunked`, so :class:`.valid_rows.ValidRowStats` and :class:`.valid_rows.ValidRowLoss` run either.
With ``kept_logits`` (gradients made in the forward of a scalar loss) a call takes one token chunk,
``KEPT_ROWS`` rows, whose fp32 logits the forward's GEMMs write into that buffer and the backward reads.
"""

from __future__ import annotations

import torch

from qwenlong import _C

KEPT_ROWS = 4096  # the extension's token chunk (kTokenChunk): rows per call with kept logits


def kept_logits(num_rows: int, vocab: int, device) -> torch.Tensor:
    """The fp32 buffer of kept logits: always a whole token chunk (every GEMM has one shape, so a token's results
    do not depend on its batch), rows of whole 16 bytes (cuBLAS's aligned paths)."""
    return torch.empty((KEPT_ROWS, -(-vocab // 4) * 4), dtype=torch.float32, device=device)


def available() -> bool:
    """True when ``qwenlong._C._cuda`` was built with the log-prob ops."""
    return _C.cuda is not None and hasattr(_C.cuda, "linear_logprobs_forward")


def forward(hidden, weight, targets, temperature, ignore_index, with_entropy, with_mean_logp, kept_logits=None):
    """Per-token ``(logp, entropy | None, mean_logp | None, lse)`` in fp32, as :func:`.chunked.forward`."""
    logp, entropy, mean_logp, lse = _C.cuda.linear_logprobs_forward(
        hidden, weight, targets.long(), float(temperature), int(ignore_index), kept_logits
    )
    return logp, entropy if with_entropy else None, mean_logp if with_mean_logp else None, lse


def backward(hidden, weight, targets, lse, entropy, grad_logp, grad_entropy, grad_mean_logp, temperature,
             needs_hidden=True, needs_weight=True, kept_logits=None, grad_weight_sum=None):
    """``(grad_hidden, grad_weight)`` (None when not needed), as :func:`.chunked.backward`: fp32 d(hidden),
    d(weight) in the weight's dtype, or added to ``grad_weight_sum`` (fp32) and that returned.

    The extension always forms both gradients; output gradients must be 0 on ignored rows.
    """
    grad_hidden, grad_weight = _C.cuda.linear_logprobs_backward(
        hidden, weight, targets.long(), lse, entropy, grad_logp, grad_entropy, grad_mean_logp, float(temperature),
        kept_logits, grad_weight_sum
    )
    return (grad_hidden if needs_hidden else None), (grad_weight if needs_weight else None)
