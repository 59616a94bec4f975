"""The pipeline's memory-agent stage (QwenLong-L1.5, ``rl.memory_agent``): expert RL, then an SCE merge.

Called by ``qwenlong.pipeline.run`` after the RL phase ``rl.memory_agent.after_phase``:

1. the policy trains as a memory agent (:class:`~qwenlong.agents.rl.MemoryAgentTrainer`) on documents
   read chunk by chunk: the memory expert;
2. the expert and the phase's full-context policy are merged with SCE over the policy RL started
   from (:func:`qwenlong.merge.sce_merge_tensor`, tensor by tensor), and the merged weights become the
   policy of the following phases; a checkpoint of them is the stage's record, so a resumed run starts
   the next phase from the merge;
3. on documents of two chunks (synthetic data) the expert and the merged model answer as memory agents,
   and the merged model also answers with the whole document in its window, cut to ``eval.max_input_tokens``
   as the full-context evaluation does (``run.state["agent_evals"]``, ``eval/memory-agent-*``).

The merge holds three copies of the weights in memory: fine for models one process holds whole; under
DeepSpeed export the two models and use ``qwenlong merge`` instead.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from qwenlong.agents.memory import MemoryAgent, MemoryAgentConfig, memory_agent_generate_fn, query_from_record
from qwenlong.agents.rl import MemoryAgentTrainer
from qwenlong.curriculum import Phase
from qwenlong.data import load_records
from qwenlong.data.synthetic import make_two_chunk_record
from qwenlong.eval import evaluate
from qwenlong.eval.generation import hf_generate_fn
from qwenlong.merge import sce_merge_tensor
from qwenlong.pipeline import build
from qwenlong.pipeline.resume import recorded_checkpoint
from qwenlong.rollout import HFGenerateEngine
from qwenlong.state.checkpoint import model_weights
from qwenlong.trainers.grpo import PromptExample

STAGE = "rl:memory-agent"


def _records(run: Any, split: str) -> list:
    """The agent's documents: two-chunk synthetic records, or ``rl.memory_agent.data`` / the run's own."""

    cfg, stage = run.cfg, run.cfg.rl.memory_agent
    if cfg.data.synthetic is not None and not stage.data:
        seed = cfg.data.synthetic.seed + (0 if split == "train" else 1_000_003)
        return [make_two_chunk_record(i, 2 * stage.chunk_tokens, seed, run.tokenizer)
                for i in range(stage.synthetic_documents)]
    if split == "eval":
        return build.load_split(cfg, "eval", run.tokenizer)
    return [r for path in stage.data for r in load_records(path)] if stage.data else \
        build.load_split(cfg, "train", run.tokenizer)


def _merge(run: Any, expert: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SCE of the full-context policy and the expert over the policy RL started from."""

    full = model_weights(recorded_checkpoint(run.state["last_checkpoint"], run.dir))
    start = run.state.get("rl_start_checkpoint")
    base = model_weights(recorded_checkpoint(start, run.dir)) if start else \
        build.build_model(run.cfg, run.tokenizer).state_dict()  # RL started from the model as built (seeded)
    topk = run.cfg.rl.memory_agent.select_topk
    return {name: sce_merge_tensor(base[name], [full[name].to(b.device), expert[name].to(b.device)], topk)
            if b.is_floating_point() else b for name, b in base.items()}


def _evaluate(run: Any, label: str, records: list, agent: bool) -> float:
    from qwenlong.pipeline.run import build_eval_reward, heldout_sampling

    cfg, stage = run.cfg, run.cfg.rl.memory_agent
    sampling = heldout_sampling(cfg)
    if agent:
        engine = HFGenerateEngine(run.model, eos_token_id=build.eos_ids(run.tokenizer),
                                  pad_token_id=run.tokenizer.pad_token_id, generation_attention="sdpa")
        config = MemoryAgentConfig(stage.chunk_tokens, stage.memory_tokens, cfg.eval.max_output_tokens,
                                   sampling.temperature, sampling.top_p)
        generate = memory_agent_generate_fn(MemoryAgent(engine, run.tokenizer, config), seed=sampling.seed)
    else:
        generate = hf_generate_fn(run.model, run.tokenizer, sampling, generation_attention="sdpa")
    benchmarks: dict[str, list] = {}
    for record in records:
        benchmarks.setdefault(record.data_source, []).append(record)
    report = evaluate(benchmarks, generate, run.tokenizer, reward=build_eval_reward(cfg),
                      max_input_tokens=2**62 if agent else cfg.eval.max_input_tokens, chat_template_in_budget=not agent,
                      samples_per_prompt=cfg.eval.samples_per_prompt, progress=False)
    report.write(run.dir / "eval" / f"memory-agent-{label}")
    run.state.setdefault("agent_evals", {})[label] = report.average
    run.logger.log("eval/memory-agent", len(run.state["agent_evals"]), {"label": label, "accuracy": report.average},
                   flush=True)
    return report.average


def memory_agent_stage(run: Any, engine: Any, reward: Any) -> None:
    """Train the memory expert from the current policy, merge it back, evaluate on long documents.

    ``run``: the pipeline's ``Run``; ``engine`` and ``reward``: the RL trainer's (the agent drives the same
    engine and reward).
    """
    cfg, stage = run.cfg, run.cfg.rl.memory_agent
    if run.done(STAGE):
        return
    if cfg.distributed.deepspeed_stage > 0 or run.ctx.world_size > 1:
        raise ValueError("rl.memory_agent: the in-pipeline merge needs the whole model in one process; under "
                         "torchrun/DeepSpeed export the phase's model and the expert and run `qwenlong merge`")
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
                                 agent_config=agent_config)
    phase = Phase("memory-agent", max_input_tokens=2**62, max_output_tokens=stage.answer_tokens, steps=stage.steps)
    trainer.train_phase(phase, examples, resume=run.resume)
    expert = {name: tensor.detach().clone() for name, tensor in run.model.state_dict().items()}
    long_documents = _records(run, "eval")
    if cfg.eval.enabled:
        _evaluate(run, "expert-agent", long_documents, agent=True)
    run.model.load_state_dict(_merge(run, expert))
    if getattr(engine, "model", None) is not run.model:  # an engine with its own copy learns the merged weights
        engine.update_weights(run.backend.full_parameters())
    if cfg.eval.enabled:
        _evaluate(run, "merged-agent", long_documents, agent=True)
        _evaluate(run, "merged-full-context", long_documents, agent=False)
    merged = run.backend.save(run.dir / "checkpoints" / "memory-agent-merged",
                              state={"stage": "memory-agent-merge", "step": stage.steps})
    run.finish(STAGE, merged)
