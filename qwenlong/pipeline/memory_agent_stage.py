"""The pipeline's memory-agent stage (QwenLong-L1.5, ``rl.memory_agent``): expert RL, then an SCE merge.

Called by ``qwenlong.pipeline.run`` after the RL phase ``rl.memory_agent.after_phase``:

1. the policy trains as a memory agent (:class:`~qwenlong.agents.rl.MemoryAgentTrainer`) on documents
   read chunk by chunk: the memory expert;
2. the expert and the phase's full-context policy are merged with SCE over the policy RL started
   from (:func:`qwenlong.merge.sce_merge_tensor`), in place and one tensor at a time
   (:func:`qwenlong.merge.merge_into_model`): the expert is the model itself, the phase's policy its last
   checkpoint and the base RL's starting checkpoint (or the pretrained safetensors, or the tiny model as
   built), read by rank 0 one tensor at a time; under ZeRO-3 each parameter is gathered, merged on rank 0
   and split back into every rank's partition. The merged weights become the policy of the following
   phases; a checkpoint of them is the stage's record, so a resumed run starts the next phase from the merge;
3. on documents of two chunks (synthetic data) the expert and the merged model answer as memory agents,
   and the merged model also answers with the whole document in its window, cut to ``eval.max_input_tokens``
   as the full-context evaluation does (``run.state["agent_evals"]``, ``eval/memory-agent-*``); with several
   ranks each answers its share of the documents (under ZeRO-3 in lockstep) and rank 0 scores and writes.

The agent's RL runs on the pipeline's backend and rollout engine, so it runs wherever the GRPO phases
run (data and sequence parallel ranks, ZeRO 1-3; a synced engine drives the agent on every rank in
lockstep, see :class:`~qwenlong.agents.memory.MemoryAgent`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from qwenlong.agents.memory import MemoryAgent, MemoryAgentConfig, memory_agent_generate_fn, query_from_record
from qwenlong.agents.rl import MemoryAgentTrainer
from qwenlong.curriculum import Phase
from qwenlong.data.synthetic import make_two_chunk_record
from qwenlong.distributed.zero import WholeWeights, checkpoint_weights, safetensors_weights
from qwenlong.eval import evaluate
from qwenlong.eval.chat import chat_history
from qwenlong.eval.generation import hf_generate_fn, sharded_generate_fn
from qwenlong.merge import merge_into_model, sce_merge_tensor
from qwenlong.pipeline import build
from qwenlong.pipeline.resume import recorded_checkpoint
from qwenlong.rewards import HybridReward
from qwenlong.rollout import HFGenerateEngine
from qwenlong.trainers.grpo import PromptExample

STAGE = "rl:memory-agent"


def _records(run: Any, split: str) -> list:
    """The agent's documents: two-chunk synthetic records, or ``rl.memory_agent.data`` / the run's own."""

    cfg, stage = run.cfg, run.cfg.rl.memory_agent
    if cfg.data.synthetic is not None and not stage.data:
        seed = cfg.data.synthetic.seed + (0 if split == "train" else 1_000_003)
        return [make_two_chunk_record(i, 2 * stage.chunk_tokens, seed, run.tokenizer)
                for i in range(stage.synthetic_documents)]
    # a conversation (MRCR's) has no document to read chunk by chunk: it stays out of this stage's agent / full
    # context comparisons (the run's held-out evaluation scores it)
    if split == "eval":
        return [r for r in build.load_split(cfg, "eval", run.tokenizer) if chat_history(r) is None]
    return [r for path in stage.data for r in build.load_file(path)] if stage.data else \
        build.load_split(cfg, "train", run.tokenizer)


def _merge_sources(run: Any) -> tuple[WholeWeights, list[WholeWeights]]:
    """Rank 0's side of the merge: the base (the policy RL started from) and the phase's full-context policy,
    each read one tensor at a time when the merge asks for it."""
    cfg = run.cfg
    full = checkpoint_weights(recorded_checkpoint(run.state["last_checkpoint"], run.dir))
    start = run.state.get("rl_start_checkpoint")
    if start:
        base = checkpoint_weights(recorded_checkpoint(start, run.dir))
    elif cfg.model.name is not None and cfg.distributed.deepspeed_stage == 3:
        base = safetensors_weights(cfg.model.name)  # what ZeRO-3 loading scattered, tensor by tensor
    else:  # RL started from the model as built (seeded; a pretrained one a process holds whole)
        state = build.build_model(cfg, run.tokenizer).state_dict()
        base = WholeWeights(lambda name: tuple(state[name].shape), state.__getitem__)
    return base, [full]


def _merge(run: Any) -> None:
    """SCE of the phase's full-context policy and the expert (the model now) over the policy RL started from,
    into the model; every rank calls it. DeepSpeed's fp32 master copies then follow the merged weights (or its
    next step would put the expert back)."""
    topk = run.cfg.rl.memory_agent.select_topk
    merge_into_model(run.model, (lambda: _merge_sources(run)) if run.ctx.is_main else None,
                     lambda base, models: sce_merge_tensor(base, models, topk))
    engine = getattr(run.backend, "engine", None)  # a DeepSpeedBackend's
    if engine is not None:
        engine.optimizer.refresh_fp32_params()


def _evaluate(run: Any, label: str, records: list, agent: bool) -> float:
    """Accuracy (percent) on ``records`` as a memory agent or with the document in the window; every rank calls
    it (each answers its share; under ZeRO-3 in lockstep), rank 0 scores with the evaluation's reward and writes."""
    from qwenlong.pipeline.run import GENERATION_ATTENTION, build_eval_reward, heldout_sampling

    cfg, stage, ctx = run.cfg, run.cfg.rl.memory_agent, run.ctx
    sampling = heldout_sampling(cfg)
    if agent:
        engine = HFGenerateEngine(run.model, eos_token_id=build.eos_ids(run.tokenizer),
                                  pad_token_id=run.tokenizer.pad_token_id, generation_attention=GENERATION_ATTENTION,
                                  synced=run.synced_generation)
        config = MemoryAgentConfig(stage.chunk_tokens, stage.memory_tokens, cfg.eval.max_output_tokens,
                                   sampling.temperature, sampling.top_p)
        generate = memory_agent_generate_fn(MemoryAgent(engine, run.tokenizer, config, gather=ctx.gather),
                                            seed=sampling.seed)
    else:
        generate = hf_generate_fn(run.model, run.tokenizer, sampling, generation_attention=GENERATION_ATTENTION,
                                  synced=run.synced_generation)
    if ctx.world_size > 1:
        generate = sharded_generate_fn(generate, ctx.rank, ctx.world_size, ctx.gather)
    benchmarks: dict[str, list] = {}
    for record in records:
        benchmarks.setdefault(record.data_source, []).append(record)
    # the other ranks' reports are dropped: they score by rule only, so a judge is asked once per answer
    reward = build_eval_reward(cfg) if ctx.is_main else HybridReward()
    report = evaluate(benchmarks, generate, run.tokenizer, reward=reward,
                      max_input_tokens=2**62 if agent else cfg.eval.max_input_tokens, chat_template_in_budget=not agent,
                      samples_per_prompt=cfg.eval.samples_per_prompt, progress=False)
    accuracy = ctx.broadcast(report.average)
    run.state.setdefault("agent_evals", {})[label] = accuracy
    if ctx.is_main:
        report.write(run.dir / "eval" / f"memory-agent-{label}")
        run.logger.log("eval/memory-agent", len(run.state["agent_evals"]), {"label": label, "accuracy": accuracy},
                       flush=True)
    return accuracy


def memory_agent_stage(run: Any, engine: Any, reward: Any, reference: torch.nn.Module | None = None) -> None:
    """Train the memory expert from the current policy, merge it back, evaluate on long documents.

    ``run``: the pipeline's ``Run``; ``engine`` and ``reward``: the RL trainer's (the agent drives the same
    engine and reward); ``reference``: the RL trainer's frozen KL reference (``rl.kl_reference: sft``: the
    policy RL started from, not the one this stage starts from; None: the current policy).
    """
    cfg, stage = run.cfg, run.cfg.rl.memory_agent
    if run.done(STAGE):
        return
    records = _records(run, "train")
    queries = {r.id: query_from_record(r) for r in records}
    examples = [PromptExample(r.id, [], r.data_source, list(r.answers), queries[r.id].question) for r in records]
    agent_config = MemoryAgentConfig(stage.chunk_tokens, stage.memory_tokens, stage.answer_tokens,
                                     cfg.rl.temperature, cfg.rl.top_p)

    def decode(ids: list[int]) -> str:
        return run.tokenizer.decode(ids, skip_special_tokens=True)

    per_step = stage.prompts_per_step
    rl = cfg.rl if per_step is None else replace(cfg.rl, gen_prompts_per_step=per_step, train_prompts_per_step=per_step,
                                                 mini_batch_size=min(cfg.rl.mini_batch_size, per_step))
    trainer = MemoryAgentTrainer(run.model, engine, reward, rl, decode=decode, output_dir=run.dir, seed=cfg.seed,
                                 logger=run.logger, save_every_steps=cfg.output.save_every_steps,
                                 keep_checkpoints=cfg.output.keep_checkpoints, backend=run.backend,
                                 task_balanced=cfg.data.task_balanced, queries=queries, tokenizer=run.tokenizer,
                                 agent_config=agent_config, reference=reference)
    phase = Phase("memory-agent", max_input_tokens=2**62, max_output_tokens=stage.answer_tokens, steps=stage.steps)
    trainer.train_phase(phase, examples, resume=run.resume)
    long_documents = _records(run, "eval")
    if cfg.eval.enabled:
        _evaluate(run, "expert-agent", long_documents, agent=True)
    _merge(run)
    if getattr(engine, "model", None) is not run.model:  # an engine with its own copy learns the merged weights
        engine.update_weights(run.backend.full_parameters())
    if cfg.eval.enabled:
        _evaluate(run, "merged-agent", long_documents, agent=True)
        _evaluate(run, "merged-full-context", long_documents, agent=False)
    merged = run.backend.save(run.dir / "checkpoints" / "memory-agent-merged",
                              state={"stage": "memory-agent-merge", "step": stage.steps})
    run.finish(STAGE, merged)
