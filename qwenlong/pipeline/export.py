"""A run's trained policy as a Hugging Face model folder: ``qwenlong export`` and the pipeline's exports.

Each exported stage is a folder under ``<run>/export/`` named after it (``sft``, ``rl-<phase>``)
holding safetensors weights, ``config.json``, ``generation_config.json`` (the run's evaluation
sampling: what ``vllm serve`` and ``generate`` use by default), the tokenizer with its chat template,
a ``README.md`` model card (recipe, stages, data, held-out accuracy per stage) and ``qwenlong.json``
(which run, stage, step and checkpoint it came from; ``qwenlong eval --run`` reads it).

The pipeline exports the live policy at the end of a stage (``output.export``: ``final`` the run's
last stage only, ``every_stage`` each of SFT and the RL phases, ``none``); under ZeRO-3 its weights
reach rank 0 one parameter at a time, as for ``model.pt``, and rank 0 alone writes. ``qwenlong export``
writes one from any checkpoint of a finished or interrupted run, reading its ``model.pt`` one tensor
at a time::

    qwenlong export --run runs/tiny --out runs/tiny-model                     # the newest checkpoint
    qwenlong export --run runs/tiny --stage short-docs --out /tmp/m --dtype bf16
    qwenlong export --checkpoint runs/tiny/checkpoints/sft-step000100 --out /tmp/sft100
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from qwenlong.config import Config, ConfigError, load_config
from qwenlong.export import export_model, parse_dtype, write_hf_folder
from qwenlong.export.hf_folder import DEFAULT_MAX_SHARD_BYTES, DTYPE_NAMES, saved_names
from qwenlong.integrations.hf_checkpoint import model_skeleton
from qwenlong.pipeline import build
from qwenlong.state.checkpoint import STATE_FILE, latest_checkpoint, model_weights, save_order

EXPORT_DIR = "export"
INFO_FILE = "qwenlong.json"
CONFIG_FILE = "config.yaml"
RECORD_FILE = "pipeline.json"
# qwenlong.pipeline.memory_agent_stage: the memory expert merged back into the policy
MEMORY_AGENT_STAGE = "rl:memory-agent"
MEMORY_AGENT_CHECKPOINT = "memory-agent-merged"  # ... whose record is this checkpoint (its state: memory-agent-merge)


# ---------------------------------------------------------------------- stages


def run_stages(cfg: Config) -> list[str]:
    """The run's trained stages in order: ``sft`` (when enabled), then ``rl:<phase>`` per phase (the memory
    agent's merge after its phase, when enabled)."""
    stages = ["sft"] if cfg.sft.enabled else []
    for phase in cfg.rl.phases if cfg.rl.enabled else []:
        stages.append(f"rl:{phase.name}")
        if cfg.rl.memory_agent.enabled and phase.name == cfg.rl.memory_agent.after_phase:
            stages.append(MEMORY_AGENT_STAGE)
    return stages


def stage_folder(stage: str) -> str:
    """The export folder's name of a stage: ``sft``, ``rl-<phase>``."""
    return stage.replace(":", "-")


def stage_eval_label(stage: str) -> str:
    """The pipeline's evaluation of a finished stage: ``after-sft``, ``after-<phase>``."""
    return "after-" + stage.partition(":")[2] if stage.startswith("rl:") else f"after-{stage}"


def stage_checkpoint(run_dir: Path, stage: str) -> Path | None:
    """The newest intact checkpoint of a stage (``sft-stepN`` / ``rl-<phase>-stepN``; the memory agent's merge)."""
    if stage == MEMORY_AGENT_STAGE:  # its rl-memory-agent-stepN checkpoints hold the expert, before the merge
        merged = run_dir / "checkpoints" / MEMORY_AGENT_CHECKPOINT
        return merged if (merged / STATE_FILE).is_file() else None
    prefix = "sft-" if stage == "sft" else f"rl-{stage.partition(':')[2]}-"
    return latest_checkpoint(run_dir / "checkpoints", prefix=prefix)


def resolve_stage(cfg: Config, name: str) -> str:
    """``sft``, ``rl:<phase>``, ``rl-<phase>`` or a phase's name -> the stage (``sft`` / ``rl:<phase>``)."""
    for stage in run_stages(cfg):
        if name in (stage, stage_folder(stage), stage.partition(":")[2]):
            return stage
    raise ConfigError(f"--stage: the run has no stage {name!r}; expected one of {', '.join(run_stages(cfg))}")


def checkpoint_stage(checkpoint: Path) -> tuple[str, int]:
    """(stage, step) a checkpoint folder was written at, from its state file."""
    path = checkpoint / STATE_FILE
    if not path.is_file():
        raise ConfigError(f"--checkpoint: {checkpoint} is not a complete checkpoint (no {STATE_FILE})")
    state = json.loads(path.read_text(encoding="utf-8"))
    if state.get("stage") == "memory-agent-merge":
        return MEMORY_AGENT_STAGE, int(state.get("step", 0))
    stage = "sft" if state.get("stage") == "sft" else f"rl:{state.get('phase')}"
    return stage, int(state.get("step", 0))


def trained_stages(record: dict[str, Any]) -> list[str]:
    """The stages a run's record lists as finished, in order (its evaluations left out)."""
    return [s for s in record.get("done", []) if s == "sft" or s.startswith("rl:")]


# ---------------------------------------------------------------------- folder contents


def generation_config(cfg: Config, tokenizer: Any) -> Any:
    """The run's evaluation sampling (temperature, top-p, output length; greedy at temperature 0) and its
    stop tokens; top-k off, as the method samples with top-p alone."""
    from transformers import GenerationConfig

    ev = cfg.eval
    sampling = ({"do_sample": True, "temperature": ev.temperature, "top_p": ev.top_p, "top_k": 0}
                if ev.temperature > 0 else {"do_sample": False})
    return GenerationConfig(**sampling, max_new_tokens=ev.max_output_tokens, eos_token_id=build.eos_ids(tokenizer),
                            pad_token_id=tokenizer.pad_token_id)


def _data_lines(cfg: Config) -> list[str]:
    data, synth = cfg.data, cfg.data.synthetic
    if synth is not None and not data.train_files:
        teacher = (f"; SFT traces from a teacher right {100 * synth.teacher_accuracy:.0f}% of the time"
                   if cfg.sft.enabled and not data.sft_files else "")
        return [f"- Synthetic long-document QA generated by qwenlong (task `{synth.task}`, {synth.num_train} "
                f"training and {synth.num_eval} held-out items, documents of {synth.min_document_tokens}-"
                f"{synth.max_document_tokens} tokens, data seed {synth.seed}){teacher}."]
    lines = [f"- {title}: {', '.join(f'`{Path(f).name}`' for f in files)}" for title, files in
             (("RL training data", data.train_files), ("SFT data", data.sft_files or data.train_files),
              ("Held-out data", data.eval_files)) if files]
    return lines + [f"- RL phase `{p.name}` reads only: {', '.join(p.data)}" for p in cfg.rl.phases if p.data]


def model_card(cfg: Config, record: dict[str, Any], *, run_name: str, stage: str, step: int, finished: bool,
               num_parameters: int, dtype: torch.dtype, folder_name: str) -> str:
    """README.md of an exported stage: what was trained how, on what, and how well it did on held-out data."""
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags: [qwenlong, long-context, reasoning, grpo]"]
    if cfg.model.name is not None and not Path(cfg.model.name).exists():  # a hub id, not a local folder
        lines.append(f"base_model: {cfg.model.name}")
    status = "the stage's final checkpoint" if finished else "a checkpoint before the stage's end"
    base = (f"`{cfg.model.name}`" if cfg.model.name is not None else
            f"a Qwen2-architecture model built from the config ({num_parameters / 1e6:.2f}M parameters, random init)")
    rl, phases = cfg.rl, len(cfg.rl.phases) if cfg.rl.enabled else 0
    recipe = (["warm-up SFT"] if cfg.sft.enabled else []) + (
        [f"GRPO/DAPO reinforcement learning in {phases} phase(s) of growing input length"
         + (" with difficulty-aware retrospective sampling between them" if rl.retrospective.enabled and phases > 1
            else "") + f" on a verifiable reward (rules{', max an LLM judge' if cfg.reward.judge != 'none' else ''})"]
        if phases else [])
    lines += ["---", "", f"# {run_name}: {stage}", "",
              f"A long-context reasoning policy trained with qwenlong's QwenLong-L1 recipe from {base}: "
              f"{', then '.join(recipe)}.",
              "", f"Exported from stage `{stage}` at step {step} ({status}), weights in {str(dtype).split('.')[-1]}.",
              "", "## Stages", "", "| stage | steps | input tokens up to | output tokens up to | learning rate |",
              "|---|---|---|---|---|"]
    if cfg.sft.enabled:
        sft = cfg.sft
        amount = sft.steps if sft.steps is not None else f"{sft.epochs} epochs"
        lines.append(f"| sft | {amount} | {sft.max_seq_len} (prompt + response) | | {sft.lr:g} |")
    if cfg.rl.enabled:
        for phase in cfg.rl.phases:
            amount = phase.steps if phase.steps is not None else f"{phase.epochs} epochs"
            lines.append(f"| rl:{phase.name} | {amount} | {phase.max_input_tokens} | {phase.max_output_tokens} "
                         f"| {cfg.rl.lr:g} |")
    if phases:
        lines += ["", f"RL: {rl.group_size} responses per prompt, {rl.train_prompts_per_step} prompts per step, "
                  f"advantage `{rl.advantage}`, clip {rl.clip_low}/{rl.clip_high}, KL coefficient {rl.kl_coef:g}, "
                  f"sampling temperature {rl.temperature:g}."]
    lines += ["", f"Seed {cfg.seed}.", "", "## Data", "", *_data_lines(cfg)]
    evals = record.get("evals", {})
    if evals:
        ev = cfg.eval
        decoding = "greedy" if ev.temperature == 0 else f"temperature {ev.temperature:g}, top-p {ev.top_p:g}"
        mine = stage_eval_label(stage) if finished else None
        lines += ["", "## Held-out accuracy", "",
                  f"From the run's report: {decoding}, {ev.samples_per_prompt} answer(s) per item, inputs up to "
                  f"{ev.max_input_tokens} tokens, outputs up to {ev.max_output_tokens}.", "",
                  "| evaluation | accuracy (%) |", "|---|---|"]
        lines += [f"| {label}{' (this model)' if label == mine else ''} | {result['average']:.1f} |"
                  for label, result in evals.items()]
    lines += ["", "## Use", "", "```bash", f"vllm serve {folder_name}   # an OpenAI-compatible server",
              f"qwenlong eval --model {folder_name} --data-dir DOCQA_DIR   # the DocQA benchmarks", "```", "",
              "`generation_config.json` holds the run's evaluation sampling, the tokenizer its chat template; "
              "the method's prompt goes in one user turn, without a system prompt.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------- writing


def _folder_files(cfg: Config, record: dict[str, Any], tokenizer: Any, *, run_dir: Path, stage: str, step: int,
                  checkpoint: Path | None, finished: bool, num_parameters: int, dtype: torch.dtype,
                  out: Path) -> dict[str, Any]:
    info = {"run": str(run_dir.resolve()), "stage": stage, "step": step, "finished": finished,
            "eval_label": stage_eval_label(stage) if finished else None,
            "checkpoint": None if checkpoint is None else str(checkpoint.resolve()), "seed": cfg.seed}
    card = model_card(cfg, record, run_name=run_dir.resolve().name, stage=stage, step=step, finished=finished,
                      num_parameters=num_parameters, dtype=dtype, folder_name=out.name)
    return {"generation_config": generation_config(cfg, tokenizer), "card": card,
            "extra_files": {INFO_FILE: json.dumps(info, indent=1) + "\n"}}


def _weights_summary(weights: dict[str, torch.Tensor], config: Any,
                     dtype: torch.dtype | None) -> tuple[int, torch.dtype]:
    """The number of parameters of the model of ``config`` that ``weights`` hold, a tied weight once as
    ``model.parameters()`` counts it (which names are tied comes from the model: ``weights`` read back by
    ``torch.load`` may give tied names tensors of their own), and the dtype they are saved in."""
    skeleton = model_skeleton(config)
    parameters = {name for name, _ in skeleton.named_parameters()}  # a tied parameter under its first name
    unique = [weights[name] for name in saved_names(skeleton, weights) if name in parameters]
    floating = [t.dtype for t in unique if t.dtype.is_floating_point]
    return sum(t.numel() for t in unique), dtype or (floating[0] if floating else torch.float32)


def _check_out(out: Path, run_dir: Path, checkpoint: Path, overwrite: bool) -> None:
    """Refuse an ``--out`` that writing the folder would destroy the run or the checkpoint through: the folder
    is replaced, so it must not be (or hold) the run folder or the checkpoint, nor lie inside the checkpoint.
    A non-empty folder is replaced only if it is a model qwenlong exported (it holds ``INFO_FILE``) or with
    ``overwrite``: anything else in it (a user's files, the run's ``export/`` of every stage) would be lost."""
    out, run_dir, checkpoint = out.resolve(), run_dir.resolve(), checkpoint.resolve()
    for what, path in (("the run folder", run_dir), ("the checkpoint", checkpoint)):
        if path == out or out in path.parents:
            raise ConfigError(f"--out: {out} is or holds {what} {path}, which writing the model folder would "
                              "replace; give a new folder (e.g. RUN/export/NAME)")
    if checkpoint in out.parents:
        raise ConfigError(f"--out: {out} lies inside the checkpoint {checkpoint}; give a folder outside it")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {out} is a file, not a model folder")
    if out.is_dir() and not overwrite and not (out / INFO_FILE).is_file() and any(out.iterdir()):
        raise ConfigError(f"--out: {out} is not empty and holds no model exported by qwenlong (no {INFO_FILE}); "
                          "writing the model folder would delete what it holds: give a new folder, or --overwrite")


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, run_dir: str | Path | None = None,
                      dtype: str | torch.dtype | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                      overwrite: bool = False, progress: bool = False) -> Path:
    """Write the HF folder ``out`` from a checkpoint folder of a run (``run_dir``: default the folder holding
    its ``checkpoints/``), reading ``model.pt`` one tensor at a time. ``dtype``: see ``parse_dtype``.
    ``out`` may not be (or hold) the run folder or the checkpoint: it is replaced (a non-empty folder only if
    qwenlong exported it, or with ``overwrite``). ``progress``: a bar over the tensors written."""
    checkpoint = Path(checkpoint)
    stage, step = checkpoint_stage(checkpoint)
    if run_dir is None:
        run_dir = checkpoint.resolve().parent.parent
        if not (run_dir / CONFIG_FILE).is_file():
            raise ConfigError(f"--checkpoint: {checkpoint} is not in a run's checkpoints/ folder ({run_dir} holds "
                              f"no {CONFIG_FILE}); give the run with --run")
    run_dir = Path(run_dir)
    _check_out(Path(out), run_dir, checkpoint, overwrite)
    cfg, record = read_run(run_dir)
    tokenizer = build.build_tokenizer(cfg, run_dir)
    newest = stage_checkpoint(run_dir, stage)
    finished = stage in trained_stages(record) and newest is not None and newest.resolve() == checkpoint.resolve()
    weights = model_weights(checkpoint, mmap=True)
    dtype = parse_dtype(dtype)
    config = hf_model_config(cfg, tokenizer)
    num_parameters, saved_dtype = _weights_summary(weights, config, dtype)
    files = _folder_files(cfg, record, tokenizer, run_dir=run_dir, stage=stage, step=step, checkpoint=checkpoint,
                          finished=finished, num_parameters=num_parameters, dtype=saved_dtype, out=Path(out))
    return write_hf_folder(out, weights=weights, config=config, tokenizer=tokenizer,
                           dtype=dtype, max_shard_bytes=max_shard_bytes, progress=progress, **files)


def read_run(run_dir: Path) -> tuple[Config, dict[str, Any]]:
    """A run folder's config and record (an empty record for a run killed before its first stage ended)."""
    if not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError(f"--run: {run_dir} holds no run ({CONFIG_FILE} is missing)")
    record_path = run_dir / RECORD_FILE
    record = json.loads(record_path.read_text(encoding="utf-8")) if record_path.is_file() else {}
    return load_config(run_dir / CONFIG_FILE), record


def hf_model_config(cfg: Config, tokenizer: Any) -> Any:
    """The transformers config of a run's policy without its weights: the pretrained model's, or the tiny
    model's as the run builds it (on the meta device: no memory, no initialisation)."""
    if cfg.model.name is not None:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(cfg.model.name)
    with torch.device("meta"):
        return build.build_model(cfg, tokenizer).config


def export_stage(run: Any, stage: str, *, live: bool) -> Path:
    """Export a finished stage of a ``Run`` into ``<run>/export/<stage folder>`` and record it; every rank
    calls it. ``live``: the policy as it is now (the stage just ended), else the stage's newest checkpoint."""
    out = run.dir / EXPORT_DIR / stage_folder(stage)
    checkpoint = stage_checkpoint(run.dir, stage)
    if live:
        model = run.model
        step = checkpoint_stage(checkpoint)[1] if checkpoint is not None else 0
        # a ZeRO-3 partition's numel is its share; ds_numel is the whole parameter's
        num_parameters = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        files = _folder_files(run.cfg, run.state, run.tokenizer, run_dir=run.dir, stage=stage, step=step,
                              checkpoint=checkpoint, finished=True, num_parameters=num_parameters,
                              dtype=next(model.parameters()).dtype, out=out)
        export_model(model, run.tokenizer, out, backend=run.backend, **files)  # rank 0 writes, the others wait
    else:
        problem = None
        if run.ctx.is_main:
            try:
                if checkpoint is None:
                    raise ValueError(f"stage {stage} has no checkpoint left to export")
                export_checkpoint(checkpoint, out, run_dir=run.dir, overwrite=True)  # the run's own export folder
            except Exception as error:  # every rank raises it, rather than the others waiting for rank 0
                problem = f"{type(error).__name__}: {error}"
        problem = run.ctx.broadcast(problem)
        if problem is not None:
            raise RuntimeError(f"output.export: {problem}")
    run.state.setdefault("exports", {})[stage] = str(Path(EXPORT_DIR) / stage_folder(stage))
    run.save_state()
    return out


def _exported(run: Any, stage: str) -> bool:
    folder = run.state.get("exports", {}).get(stage)
    return folder is not None and (run.dir / folder).is_dir()


def export_finished_stage(run: Any, stage: str) -> None:
    """After a stage and its evaluation: export it when ``output.export`` is ``every_stage`` and it is not yet
    (a resumed run passes stages exported before); live when it is the newest finished stage (the policy
    holds its weights), else from its checkpoint."""
    stages = trained_stages(run.state)
    if run.cfg.output.export == "every_stage" and stage in stages and not _exported(run, stage):
        export_stage(run, stage, live=stage == stages[-1])


def export_final(run: Any) -> None:
    """At the end of a command (pipeline, sft, rl): ``final`` exports the last finished stage and deletes the
    run's earlier exports; ``every_stage`` exports any finished stage still missing (a run killed between
    a stage's end and its export) from its checkpoint, the last one live."""
    mode, stages = run.cfg.output.export, trained_stages(run.state)
    if mode == "none" or not stages:
        return
    last = stages[-1]
    if not _exported(run, last):
        export_stage(run, last, live=True)
    exports = run.state["exports"]
    if mode == "every_stage":
        for stage in stages[:-1]:
            if not _exported(run, stage):
                export_stage(run, stage, live=False)
        return
    for stage in [s for s in exports if s != last]:
        if run.ctx.is_main:
            shutil.rmtree(run.dir / exports[stage], ignore_errors=True)
        del exports[stage]
    run.save_state()


def exported_folders(run_dir: str | Path) -> list[Path]:
    """A run's exported model folders (those under ``export/`` with ``qwenlong.json``), in stage order."""
    root = Path(run_dir) / EXPORT_DIR
    folders = [p for p in root.iterdir() if (p / INFO_FILE).is_file()] if root.is_dir() else []
    try:
        order = run_stages(read_run(Path(run_dir))[0])
    except ValueError:
        order = []

    def key(folder: Path) -> tuple[int, str]:
        stage = export_info(folder)["stage"]
        return (order.index(stage) if stage in order else len(order), folder.name)

    return sorted(folders, key=key)


def export_info(folder: str | Path) -> dict[str, Any]:
    """What an exported folder came from (``qwenlong.json``: run, stage, step, checkpoint, evaluation label)."""
    return json.loads((Path(folder) / INFO_FILE).read_text(encoding="utf-8"))


# ---------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", help="the run folder (output.dir); default: the one holding --checkpoint")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--stage", help="sft, rl:<phase> or a phase's name: that stage's newest checkpoint "
                                       "(default: the newest checkpoint of the run)")
    which.add_argument("--checkpoint", help="a checkpoint folder (e.g. RUN/checkpoints/sft-step000100)")
    parser.add_argument("--out", required=True, help="the HF model folder to write (a model exported before is "
                                                     "replaced; any other non-empty folder only with --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out whatever it holds")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), help="weight dtype (default: as trained)")
    parser.add_argument("--max-shard-size", type=float, default=DEFAULT_MAX_SHARD_BYTES / 1e9, metavar="GB",
                        help="largest safetensors file, in GB (default 5)")


def run(args: argparse.Namespace) -> int:
    if args.run is None and args.checkpoint is None:
        raise ConfigError("give --run (and optionally --stage) or --checkpoint")
    max_shard_bytes = int(args.max_shard_size * 1e9) if math.isfinite(args.max_shard_size) else 0
    if max_shard_bytes < 1:
        raise ConfigError(f"--max-shard-size: expected a size in GB of at least one byte, got {args.max_shard_size:g}")
    run_dir = Path(args.run) if args.run is not None else None
    if args.checkpoint is not None:
        checkpoint = Path(args.checkpoint)
    else:
        cfg, record = read_run(run_dir)
        checkpoint = _default_checkpoint(run_dir, cfg, record, args.stage)
    out = export_checkpoint(checkpoint, args.out, run_dir=run_dir, dtype=args.dtype, max_shard_bytes=max_shard_bytes,
                            overwrite=args.overwrite, progress=not args.no_progress)
    info = export_info(out)
    print(f"wrote {out} ({info['stage']}, step {info['step']}, from {checkpoint})")
    return 0


def _default_checkpoint(run_dir: Path, cfg: Config, record: dict[str, Any], stage: str | None) -> Path:
    if stage is not None:
        found = stage_checkpoint(run_dir, resolve_stage(cfg, stage))
        if found is None:
            raise ConfigError(f"--stage: {stage} has no checkpoint in {run_dir / 'checkpoints'} (not started yet?)")
        return found
    newest = [c for c in (stage_checkpoint(run_dir, s) for s in run_stages(cfg)) if c is not None]
    if not newest:
        raise ConfigError(f"--run: {run_dir} has no checkpoint yet")
    return max(newest, key=save_order)
