"""Stages of a run and the pipeline that chains them.

Each stage writes its outputs under ``output.dir`` and records itself in ``pipeline.json``;
``resume=True`` skips finished stages and continues an unfinished one from its newest
checkpoint, so a killed run loses at most ``save_every_steps`` steps.

Under ``torchrun`` every rank runs the same stages in lockstep (``qwenlong.distributed``); rank 0
alone writes the run's shared files (config, tokenizer, ``pipeline.json``, metrics, evals,
report) while the others wait at barriers.
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path
from typing import Any

import torch

from qwenlong.config import Config, ConfigError, save_config
from qwenlong.curriculum import Phase, RewardHistory, examples_for_phase, input_floors, select_retrospective
from qwenlong.distributed import build_backend, init_distributed, is_partitioned
from qwenlong.eval import EvalReport, evaluate
from qwenlong.eval.generation import Sampling, hf_generate_fn, sharded_generate_fn
from qwenlong.pipeline import build
from qwenlong.pipeline.export import export_final, export_finished_stage, trained_stages
from qwenlong.pipeline.resume import open_run_record, recorded_checkpoint, stored_checkpoint
from qwenlong.rewards import HybridReward, make_reward
from qwenlong.rollout import HFGenerateEngine, RolloutEngine
from qwenlong.state.checkpoint import STATE_FILE, latest_checkpoint, read_json, write_json
from qwenlong.trainers import GRPOTrainer, SFTTrainer
from qwenlong.trainers.metrics_log import MetricsLogger

# HF generate decodes through the KV cache one token at a time: SDPA is the fast path there,
# while training runs packed sequences through our varlen attention.
GENERATION_ATTENTION = "sdpa"


class Run:
    """Shared state of one run folder: config, tokenizer, model, logger and stage records."""

    def __init__(self, cfg: Config, resume: bool = False):
        self.cfg = cfg
        self.ctx = init_distributed(cfg.distributed)
        self.dir = Path(cfg.output.dir)
        self.state_path = self.dir / "pipeline.json"
        self.state: dict[str, Any] = open_run_record(
            cfg, self.dir, resume, say=(lambda line: print(line, file=sys.stderr)) if self.ctx.is_main else None)
        self.ctx.barrier()  # every rank has read the folder before rank 0 writes to it
        if self.ctx.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.dir / "config.yaml")
        torch.manual_seed(cfg.seed)
        # a demo tokenizer is trained once, by rank 0, and saved; the other ranks load it
        tokenizer = build.build_tokenizer(cfg, self.dir) if self.ctx.is_main else None
        self.ctx.barrier()
        self.tokenizer = tokenizer if tokenizer is not None else build.build_tokenizer(cfg, self.dir)
        self.model = build.build_model(cfg, self.tokenizer)
        if not is_partitioned(self.model):  # a partitioned one is placed as it is created
            self.model.to(self.ctx.device)
        self.backend = build_backend(self.model, self.ctx, cfg.distributed)
        self.logger = MetricsLogger(self.dir, tensorboard=cfg.output.tensorboard and self.ctx.is_main,
                                    every_steps=cfg.output.log_every_steps)
        self.resume = resume
        last = self.state.get("last_checkpoint")
        if resume and last:
            self.backend.load_weights(recorded_checkpoint(last, self.dir))

    def finish(self, stage: str, checkpoint: Path | None = None) -> None:
        self.state["done"].append(stage)
        if checkpoint is not None:
            self.state["last_checkpoint"] = stored_checkpoint(checkpoint, self.dir)
        self.save_state()

    def save_state(self) -> None:
        if self.ctx.is_main:
            write_json(self.state_path, self.state)

    @property
    def synced_generation(self) -> bool:
        """ZeRO-3 partitions the weights, so no rank holds a whole copy to generate with: every rank
        generates with the policy itself, in lockstep (each forward gathers one layer at a time)."""
        return self.cfg.distributed.deepspeed_stage == 3

    def done(self, stage: str) -> bool:
        return stage in self.state["done"]

    def evaluate(self, label: str) -> float:
        """Accuracy (percent) on the held-out split, recorded under ``label``. Every rank answers its share
        of the prompts (under ZeRO-3 in lockstep); rank 0 scores all the answers and writes the report."""
        if self.done(f"eval:{label}"):
            return self.state["evals"][label]["average"]
        generate = hf_generate_fn(self.model, self.tokenizer, heldout_sampling(self.cfg),
                                  max_batch_size=EVAL_BATCH_SIZE, generation_attention=GENERATION_ATTENTION,
                                  synced=self.synced_generation)
        if self.ctx.world_size > 1:
            generate = sharded_generate_fn(generate, self.ctx.rank, self.ctx.world_size, self.ctx.gather)
        # the other ranks' reports are dropped: they score by rule only, so a judge is asked once per answer
        reward = build_eval_reward(self.cfg) if self.ctx.is_main else HybridReward()
        report = evaluate_heldout(self.cfg, self.tokenizer, generate, reward, progress=self.ctx.is_main)
        result = None
        if self.ctx.is_main:
            report.write(self.dir / "eval" / label)
            result = report.to_json()
            self.logger.log("eval", len(self.state["evals"]) + 1, {"label": label, "accuracy": report.average},
                            flush=True)
        self.state["evals"][label] = self.ctx.broadcast(result)
        self.finish(f"eval:{label}")
        return self.state["evals"][label]["average"]


EVAL_BATCH_SIZE = 64  # held-out items per generate call, and rows per HF generate batch


def heldout_sampling(cfg: Config) -> Sampling:
    """How the held-out evaluation samples (``eval``'s settings, seeded with the run's seed)."""
    ev = cfg.eval
    return Sampling(ev.max_output_tokens, ev.temperature, ev.top_p, seed=cfg.seed)


def evaluate_heldout(cfg: Config, tokenizer: Any, generate: Any, reward: HybridReward, progress: bool = True,
                     batch_size: int = EVAL_BATCH_SIZE) -> EvalReport:
    """The run's held-out evaluation with ``generate``, ``batch_size`` items per call (``hf_generate_fn`` with
    ``heldout_sampling`` and ``EVAL_BATCH_SIZE`` repeats the pipeline's answers exactly; ``qwenlong eval --run``
    does so for an exported model)."""
    ev = cfg.eval
    benchmarks: dict[str, list] = {}  # each data source is its own benchmark; the average is their macro mean
    for record in build.load_split(cfg, "eval", tokenizer):
        benchmarks.setdefault(record.data_source, []).append(record)
    return evaluate(dict(sorted(benchmarks.items())), generate, tokenizer, reward=reward,
                    max_input_tokens=ev.max_input_tokens, chat_template_in_budget=True, batch_size=batch_size,
                    samples_per_prompt=ev.samples_per_prompt, progress=progress)


def build_reward(cfg: Config) -> HybridReward:
    """The training reward: ``reward``'s judge (if any) with the default rules."""
    return make_reward(cfg.reward.judge_options())


def build_eval_reward(cfg: Config) -> HybridReward:
    """The evaluation's reward: ``eval.judge`` (else the training reward's judge) with ``eval.rules``."""
    return make_reward((cfg.eval.judge or cfg.reward).judge_options(), rules=cfg.eval.rules)


def build_engine(run: Run) -> RolloutEngine:
    """HF ``generate`` on the policy itself (under ZeRO-3 every rank in lockstep), or vLLM on a saved copy,
    re-synced after each update."""
    if run.cfg.rollout.engine == "vllm":
        from qwenlong.plan.placement import rollout_placement
        from qwenlong.rollout import VLLMEngine
        from qwenlong.rollout.colocated import colocate, sleep_between_phases

        rollout, ctx = run.cfg.rollout, run.ctx
        # one engine per slice of tensor_parallel_size ranks, each rank one of its workers (qwenlong.plan.placement)
        placement = rollout_placement(ctx.world_size, rollout.tensor_parallel_size, run.cfg.distributed.sp_size)
        sleep = sleep_between_phases(rollout.sleep_between_phases, "vllm", torch.cuda.is_available())
        kv_bytes = rollout.kv_cache_memory_bytes
        kwargs = {} if kv_bytes is None else {"kv_cache_memory_bytes": kv_bytes}
        engine = VLLMEngine(str(save_policy_folder(run)), tensor_parallel_size=rollout.tensor_parallel_size,
                            gpu_memory_utilization=rollout.gpu_memory_utilization, dtype=run.cfg.model.dtype,
                            seed=run.cfg.seed, sleep_mode=sleep, eos_token_id=build.eos_ids(run.tokenizer), **kwargs)
        return colocate(engine, placement, ctx.rank, ctx.gather, sleep)
    return HFGenerateEngine(run.model, eos_token_id=build.eos_ids(run.tokenizer),
                            pad_token_id=run.tokenizer.pad_token_id, generation_attention=GENERATION_ATTENTION,
                            synced=run.synced_generation)


def save_policy_folder(run: Run) -> Path:
    """The policy as a HF folder (weights, config, tokenizer) for an engine to load; every rank calls it and
    gets the folder that rank 0 writes (the ranks' weights are the same; under ZeRO-3 they are gathered one
    parameter at a time). transformers' ``save_pretrained`` writes nothing on other ranks anyway."""
    path = run.dir / "policy-for-vllm"
    state = run.backend.main_state_dict()
    if run.ctx.is_main:
        run.model.save_pretrained(path, state_dict=state)
        run.tokenizer.save_pretrained(path)
    run.ctx.barrier()
    return path


def _sft(run: Run) -> None:
    cfg = run.cfg
    if not cfg.sft.enabled or run.done("sft"):
        return
    trainer = SFTTrainer(run.model, build.sft_training_examples(cfg, run.tokenizer), cfg.sft, output_dir=run.dir,
                         seed=cfg.seed, logger=run.logger, save_every_steps=cfg.output.save_every_steps,
                         keep_checkpoints=cfg.output.keep_checkpoints, backend=run.backend)
    if run.resume:
        trainer.resume()
    trainer.train()
    run.finish("sft", latest_checkpoint(run.dir / "checkpoints", prefix="sft-"))  # train() saved the last step


def _reference_checkpoint(run: Run) -> Path | None:
    """The checkpoint of the policy RL started from (None: the model as built from the config), recorded
    the first time RL starts so that a resumed run measures KL against the same policy."""
    if "rl_start_checkpoint" not in run.state:
        run.state["rl_start_checkpoint"] = run.state.get("last_checkpoint")
        run.save_state()
    start = run.state["rl_start_checkpoint"]
    return recorded_checkpoint(start, run.dir) if start else None


def _rl(run: Run) -> None:
    cfg = run.cfg
    if not cfg.rl.enabled:
        return
    examples = build.rl_examples(run.tokenizer, build.load_split(cfg, "train", run.tokenizer))
    by_id = {e.id: e for e in examples}
    prompt_len = {e.id: len(e.prompt_ids) for e in examples}
    history = RewardHistory.from_json(run.state["history"]) if "history" in run.state else RewardHistory()
    def decode(ids: list[int]) -> str:
        return run.tokenizer.decode(ids, skip_special_tokens=True)

    trainer = GRPOTrainer(run.model, build_engine(run), build_reward(cfg), cfg.rl, decode=decode, output_dir=run.dir,
                          seed=cfg.seed, logger=run.logger, history=history,
                          save_every_steps=cfg.output.save_every_steps,
                          keep_checkpoints=cfg.output.keep_checkpoints, backend=run.backend,
                          task_balanced=cfg.data.task_balanced, aepo_start_mode=run.state.get("aepo_mode", "all"))
    reference = _reference_checkpoint(run)
    # the policy now loaded is a resumed later one: the reference goes back to RL's start
    if cfg.rl.kl_coef > 0 and cfg.rl.kl_reference == "sft" and \
            run.state.get("last_checkpoint") != run.state["rl_start_checkpoint"]:
        if reference is not None:
            trainer.set_reference(reference)
        else:  # RL started from the model as the config builds it (seeded): build it again
            trainer.reference.load_state_dict(build.build_model(cfg, run.tokenizer).state_dict())
    seen: set[str] = set()
    floors = input_floors(cfg.rl.phases)
    for index, phase in enumerate(cfg.rl.phases):
        # a phase's own data is the prompts within [its floor, its budget]: by default past the phase
        # before's budget, so each phase reads longer documents and earlier examples return only through
        # retrospective sampling; min_input_tokens: 0 re-reads every prompt up to the budget (L1.5's last
        # phase). A phase that names data sources reads only those
        phase_examples = [e for e in examples_for_phase(examples, phase, lambda e: prompt_len[e.id], floors[index])
                          if not phase.data or e.data_source in phase.data]
        own = {e.id for e in phase_examples}
        run.state.setdefault("phase_data", {})[phase.name] = {"min_input_tokens": floors[index], "own": len(own)}
        stage = f"rl:{phase.name}"
        if run.done(stage):  # its retrospective selection is on record (the history has moved on since)
            seen |= own
            _after_phase(run, trainer, phase)
            continue
        carried = {}
        if index > 0:
            candidates = {i: prompt_len[i] for i in seen - own}
            selection = select_retrospective(trainer.history, candidates, phase, len(phase_examples),
                                             cfg.rl.retrospective, exclude=own,
                                             default_seed=f"{cfg.seed}:{phase.name}")
            phase_examples += [by_id[i] for i in selection.carried]
            carried = selection.to_json()
            run.state["carried"][phase.name] = carried
        seen |= own
        prompts = _prompts_digest(phase_examples)
        if run.resume:
            _check_resumed_prompts(run, phase, prompts)
        run.state.setdefault("phase_steps", {})[phase.name] = trainer.phase_steps(phase, len(phase_examples))
        run.save_state()

        def evaluate_every(step: int, phase: Phase = phase) -> None:
            every = cfg.eval.every_steps
            if cfg.eval.enabled and every and step % every == 0:
                run.evaluate(f"{phase.name}-step{step}")

        trainer.train_phase(phase, phase_examples, resume=run.resume,
                            extra_state={"prompts": prompts, **({"carried": carried} if carried else {})},
                            after_step=evaluate_every)
        # what the next phase carries on with: the reward history and AEPO's mode (a run resumed between two
        # phases starts the next one as the uninterrupted run would)
        run.state["history"], run.state["aepo_mode"] = trainer.history.to_json(), trainer.aepo_mode
        run.finish(stage, latest_checkpoint(run.dir / "checkpoints", prefix=f"rl-{phase.name}-"))
        _after_phase(run, trainer, phase)


def _prompts_digest(examples: list) -> str:
    """A phase's prompt list (ids in order: the sampler's checkpoint is a place in it), as a short digest."""
    return hashlib.sha256("\n".join(e.id for e in examples).encode()).hexdigest()[:16]


def _check_resumed_prompts(run: Run, phase: Phase, prompts: str) -> None:
    """A phase resumed from its checkpoint goes on over the prompt list it started with: settings that change the
    list (the phase's budgets or data, retrospective sampling) would have its sampler walk another one. Checkpoints
    written before the digest was recorded are not checked."""
    latest = latest_checkpoint(run.dir / "checkpoints", prefix=f"rl-{phase.name}-")
    recorded = read_json(latest / STATE_FILE).get("prompts") if latest is not None else None
    if recorded is not None and recorded != prompts:
        raise ConfigError(f"--resume: phase {phase.name}: its prompts (input budgets, data, carried examples) differ "
                          f"from those its checkpoint {latest.name} trained on; resume with the run's phase and "
                          "retrospective settings, or start a new run")


def _after_phase(run: Run, trainer: GRPOTrainer, phase: Phase) -> None:
    """What follows a finished phase: its evaluation, its export, the memory-agent stage. A resumed run passes
    through here for its finished phases too: a run killed between a phase's record and its evaluation evaluates
    it then (the policy holds the phase's weights while it is the newest finished stage; each step is skipped
    once recorded)."""
    cfg, stage = run.cfg, f"rl:{phase.name}"
    if cfg.eval.enabled and cfg.eval.after_each_phase and trained_stages(run.state)[-1] == stage:
        run.evaluate(f"after-{phase.name}")
    export_finished_stage(run, stage)
    _memory_agent(run, trainer, phase)


def _memory_agent(run: Run, trainer: GRPOTrainer, phase: Phase) -> None:
    """QwenLong-L1.5's memory-agent expert and SCE merge, after ``rl.memory_agent.after_phase``
    (``qwenlong.pipeline.memory_agent_stage``; a finished stage is skipped)."""
    if run.cfg.rl.memory_agent.enabled and phase.name == run.cfg.rl.memory_agent.after_phase:
        from qwenlong.pipeline.memory_agent_stage import STAGE, memory_agent_stage

        memory_agent_stage(run, trainer.engine, trainer.reward, trainer.reference)
        export_finished_stage(run, STAGE)


def run_sft(cfg: Config, resume: bool = False) -> Run:
    run = Run(cfg, resume)
    _sft(run)
    export_final(run)
    return run


def run_rl(cfg: Config, resume: bool = False) -> Run:
    _check_heldout_data(cfg, pipeline=False)
    run = Run(cfg, resume)
    _check_phase_data(run)
    _rl(run)
    export_final(run)
    return run


def _check_heldout_data(cfg: Config, pipeline: bool) -> None:
    """A command that will evaluate has held-out data (``data.eval_files``, else the synthetic task's eval split):
    without, it failed at its first evaluation, after SFT or a whole RL phase had run."""
    ev = cfg.eval
    if not ev.enabled or cfg.data.eval_files or cfg.data.synthetic is not None:
        return
    evaluates = cfg.rl.enabled and (ev.after_each_phase or ev.every_steps > 0 or cfg.rl.memory_agent.enabled)
    if evaluates or (pipeline and (ev.before_training or cfg.sft.enabled)):
        raise ConfigError("data.eval_files: evaluation is enabled but there is no held-out data (no eval_files and "
                          "no synthetic section): give data.eval_files or set eval.enabled: false")


def _check_phase_data(run: Run) -> None:
    """Every data source an RL phase names (``rl.phases.N.data``) is in the training data: a misspelt one is
    refused before any stage runs, not when its phase starts hours later with no prompts."""
    cfg = run.cfg
    if not cfg.rl.enabled or not any(phase.data for phase in cfg.rl.phases):
        return
    sources = {record.data_source for record in build.load_split(cfg, "train", run.tokenizer)}
    for index, phase in enumerate(cfg.rl.phases):
        unknown = sorted(set(phase.data) - sources)
        if unknown:
            raise ConfigError(f"rl.phases.{index}.data: no training data from {unknown}; the training data's "
                              f"sources are {sorted(sources)}")


def run_pipeline(cfg: Config, resume: bool = False) -> Run:
    """Untrained eval -> SFT -> eval -> RL phases (eval after each) -> report."""
    from qwenlong.pipeline.report import write_report

    start = time.time()
    _check_heldout_data(cfg, pipeline=True)
    run = Run(cfg, resume)
    _check_phase_data(run)
    # an evaluation is labelled by the policy it scores: a folder that ``qwenlong sft`` / ``rl`` trained holds no
    # untrained policy to score, and after RL no SFT one
    if cfg.eval.enabled and cfg.eval.before_training and not trained_stages(run.state):
        run.evaluate("untrained")
    _sft(run)
    if cfg.eval.enabled and cfg.sft.enabled and trained_stages(run.state)[-1:] == ["sft"]:
        run.evaluate("after-sft")
    export_finished_stage(run, "sft")
    _rl(run)
    export_final(run)
    run.state["wall_time_s"] = run.state.get("wall_time_s", 0.0) + time.time() - start
    run.save_state()
    if run.ctx.is_main:
        write_report(run)
    run.ctx.barrier()
    return run
