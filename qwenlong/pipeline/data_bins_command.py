"""``qwenlong data-bins``: task-balanced training data, before training (l15.md section 2).

Pre-infers the base model on the training records (n answers per item, scored with the RL reward),
bins each data source's items by pass@k and draws equally from every bin; writes the drawn records as a
training file that ``data.train_files`` can name. Examples::

    qwenlong data-bins --config configs/qwenlong-l1.5.yaml --api-url http://127.0.0.1:8002/v1 \\
        --api-model Qwen/Qwen3-30B-A3B-Thinking-2507 --out data/bins  # vllm serve it on 8002 (8000: the judge)
    qwenlong data-bins --data data/docqa-rl.parquet --model /path/to/base --samples 8 --out data/bins
    qwenlong data-bins --config configs/tiny.yaml data.synthetic.num_train=32 --out /tmp/bins  # CPU smoke

In ``--out``: ``results.jsonl`` (one row per item, appended as it goes: a stopped run, started again,
generates only for the items it lacks), ``settings.json`` (what scored them: a later run with other
sampling, model or reward is refused rather than mixed in), ``train.jsonl`` (the drawn records) and
``summary.json`` (per source and bin: items held and drawn). With the results complete, a run again with
other ``--bins``, ``--pass-k``, ``--per-source`` or ``--seed`` only draws again, without loading a model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from qwenlong.config import ConfigError
from qwenlong.curriculum.difficulty.bins import DEFAULT_BINS, select_balanced, selected_in_order
from qwenlong.curriculum.difficulty.scores import check_unique, pending_records, pre_infer, read_scores

RESULTS, SETTINGS, TRAIN, SUMMARY = "results.jsonl", "settings.json", "train.jsonl", "summary.json"
# without --config: the L1.5 RL sampling (l15.md section 1), G = 8 answers, the evaluation's output budget
DEFAULTS = {"samples": 8, "temperature": 0.7, "top_p": 0.95, "max_new_tokens": 10_000, "seed": 0}
AT_LEAST_ONE = {"samples": "--samples", "pass_k": "--pass-k", "max_new_tokens": "--max-new-tokens",
                "max_input_tokens": "--max-input-tokens", "batch_size": "--batch-size", "per_source": "--per-source"}
# what changes the distribution of the answers: scores made with other values cannot be mixed in
SCORING_KEYS = ("model", "samples", "temperature", "top_p", "max_new_tokens", "max_input_tokens", "reward")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides of --config, e.g. data.synthetic.num_train=64")
    source = parser.add_argument_group("data and base model")
    source.add_argument("--config", help="a run's YAML config: its training data (data.train_files, else its "
                                         "synthetic train split), its RL reward, rl.group_size answers at "
                                         "rl.temperature / rl.top_p up to the first phase's max_output_tokens, "
                                         "its seed, and its model (model.name, or its tiny model) unless "
                                         "--model / --api-url is given")
    source.add_argument("--data", action="append", default=[], metavar="PATH",
                        help="a training file (.jsonl/.json/.parquet, verl rows too) instead of the config's; "
                             "repeatable")
    source.add_argument("--model", help="base model: a HF model folder or hub name, generated in-process")
    source.add_argument("--api-url", help="base model on an OpenAI-compatible server (e.g. `vllm serve`), "
                                          "base URL ending in /v1")
    source.add_argument("--api-model", help="model name on that server")
    source.add_argument("--api-key")
    source.add_argument("--tokenizer", help="tokenizer for --max-input-tokens and synthetic data (default: the "
                                            "model's, or the Qwen vocabulary with --api-url)")
    source.add_argument("--device", help="default cuda when available, else cpu")
    source.add_argument("--dtype", default="auto")

    sampling = parser.add_argument_group("pre-inference (defaults: the config's RL sampling; without --config "
                                         "8 answers, temperature 0.7, top-p 0.95, 10000 new tokens)")
    sampling.add_argument("--samples", type=int, metavar="N", help="answers per item (n)")
    sampling.add_argument("--pass-k", type=int, metavar="K", default=1,
                          help="bin by pass@K (1 <= K <= N; default 1: c/n, the fraction solved; K = N has "
                               "only the values 0 and 1)")
    sampling.add_argument("--temperature", type=float)
    sampling.add_argument("--top-p", type=float)
    sampling.add_argument("--max-new-tokens", type=int)
    sampling.add_argument("--max-input-tokens", type=int,
                          help="cut longer prompts in the middle of the document, as the evaluation does "
                               "(default: whole prompts, as RL gives them)")
    sampling.add_argument("--seed", type=int, help="sampling and drawing seed (default: the config's, else 0)")
    sampling.add_argument("--batch-size", type=int, default=8, help="items per generate call (each N times)")

    judge = parser.add_argument_group("reward (default: the config's, as RL builds it; without --config the "
                                      "rules plus QWENLONG_JUDGE_URL / _MODEL / _API_KEY when set)")
    judge.add_argument("--judge-url")
    judge.add_argument("--judge-model")
    judge.add_argument("--judge-api-key")
    judge.add_argument("--no-judge", action="store_true", help="score by rules alone")

    bins = parser.add_argument_group("bins")
    bins.add_argument("--bins", type=int, default=DEFAULT_BINS, metavar="B",
                      help=f"bins per source: pass@k = 0, B-2 equal widths of (0, 1), pass@k = 1 (default "
                           f"{DEFAULT_BINS})")
    bins.add_argument("--per-source", type=int, metavar="N",
                      help="items drawn per source, equally from its non-empty bins (default: the smallest "
                           "non-empty bin's size from each)")

    parser.add_argument("--out", required=True, help=f"output folder: {RESULTS}, {SETTINGS}, {TRAIN}, {SUMMARY}")
    parser.add_argument("--no-progress", action="store_true")


def check_arguments(args: argparse.Namespace) -> None:
    """The flags' ranges and combinations, each named, before anything is read or loaded."""
    from qwenlong.pipeline.eval_command import check_ranges

    check_ranges(args, AT_LEAST_ONE)
    if args.bins < 3:
        raise ConfigError(f"--bins: expected >= 3 (pass@k = 0, values between, pass@k = 1), got {args.bins}")
    if args.overrides and not args.config:
        raise ConfigError(f"{args.overrides[0]}: overrides need --config")
    if not (args.config or args.data):
        raise ConfigError("no data: give --data PATH (training files) or --config CONFIG (its data.train_files)")
    if bool(args.model) + bool(args.api_url) > 1:
        raise ConfigError("give at most one of --model and --api-url")
    if not (args.model or args.api_url or args.config):
        raise ConfigError("no base model: give --model, --api-url, or --config (its model)")
    if args.api_url and not args.api_model:
        raise ConfigError("--api-model: required with --api-url")
    if args.judge_url and not args.judge_model:
        raise ConfigError("--judge-model: required with --judge-url")
    if args.no_judge and args.judge_url:
        raise ConfigError("give at most one of --no-judge and --judge-url")


def resolve_sampling(args: argparse.Namespace, cfg: Any) -> None:
    """Fill the sampling flags not given: from the config's RL settings (what the run will train with),
    else ``DEFAULTS``; then check that several answers are sampled, not greedy."""
    from qwenlong.pipeline.eval_command import check_sampling

    if cfg is not None:
        phases = cfg.rl.phases
        given = {"samples": cfg.rl.group_size, "temperature": cfg.rl.temperature, "top_p": cfg.rl.top_p,
                 "max_new_tokens": phases[0].max_output_tokens if phases else DEFAULTS["max_new_tokens"],
                 "seed": cfg.seed}
    else:
        given = DEFAULTS
    for key, value in given.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.pass_k > args.samples:
        raise ConfigError(f"--pass-k {args.pass_k}: expected at most --samples ({args.samples})")
    check_sampling(args.samples, args.temperature)


def scoring_settings(args: argparse.Namespace, cfg: Any) -> dict[str, Any]:
    """What the scores depend on, written to ``settings.json`` (no secrets: model and judge names only)."""
    import dataclasses

    if args.model:
        model: Any = args.model
    elif args.api_url:
        model = f"api:{args.api_model}"
    elif cfg.model.name:
        model = cfg.model.name
    else:
        model = {"tiny": dataclasses.asdict(cfg.model.tiny), "seed": cfg.seed}
    if args.no_judge:
        judge = None
    elif args.judge_url:
        judge = f"openai:{args.judge_model}"
    elif cfg is not None:
        judge = None if cfg.reward.judge == "none" else f"{cfg.reward.judge}:{cfg.reward.judge_model}"
    else:
        judge = f"openai:{os.environ.get('QWENLONG_JUDGE_MODEL')}" if os.environ.get("QWENLONG_JUDGE_URL") else None
    return {"model": model, "samples": args.samples, "temperature": args.temperature, "top_p": args.top_p,
            "max_new_tokens": args.max_new_tokens, "max_input_tokens": args.max_input_tokens,
            "reward": {"rules": "default", "judge": judge}, "seed": args.seed}


def check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Scores already in ``out`` must come from the same scoring settings (``SCORING_KEYS``; the seed may
    differ: its answers come from the same distribution); records them when none are."""
    from qwenlong.state.checkpoint import read_json, write_json

    results, stored_path = out / RESULTS, out / SETTINGS
    settings = json.loads(json.dumps(settings))  # as it reads back
    if results.exists() and results.stat().st_size and stored_path.exists():
        stored = read_json(stored_path)
        changed = [key for key in SCORING_KEYS if stored.get(key) != settings[key]]
        if changed:
            was = ", ".join(f"{key}={json.dumps(stored.get(key))}" for key in changed)
            now = ", ".join(f"{key}={json.dumps(settings[key])}" for key in changed)
            raise ConfigError(f"--out: {results} holds scores made with {was}, not {now}; give another --out, or "
                              f"delete {results} to score again")
        return
    if results.exists() and results.stat().st_size:
        print(f"qwenlong data-bins: warning: {results} has no {SETTINGS} beside it: its scores are taken as made "
              "with these settings", file=sys.stderr)
    write_json(stored_path, settings)


def _config(args: argparse.Namespace) -> Any:
    if not args.config:
        return None
    from qwenlong.config import load_config

    return load_config(args.config, args.overrides)


def _tokenizer(args: argparse.Namespace, cfg: Any, out: Path) -> Any:
    """The base model's tokenizer (it measures --max-input-tokens; synthetic records are made with it)."""
    if args.tokenizer or args.model:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    if args.api_url or cfg is None:
        from qwenlong.data import load_qwen_tokenizer

        return load_qwen_tokenizer()
    from qwenlong.pipeline import build

    return build.build_tokenizer(cfg, out)  # a tiny model's is trained on the run's data, saved in out/tokenizer


def _generate_fn(args: argparse.Namespace, cfg: Any, tokenizer: Any) -> Any:
    """The repo's generate function for the base model, with the resolved sampling."""
    from qwenlong.eval.generation import Sampling, hf_generate_fn, openai_generate_fn

    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        seed=args.seed)
    if args.api_url:
        return openai_generate_fn(args.api_url, args.api_model, api_key=args.api_key, sampling=sampling)
    import torch

    from qwenlong.pipeline.run import GENERATION_ATTENTION

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = args.model or cfg.model.name
    if name:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(name, dtype=args.dtype)
    else:  # the config's tiny model, as the pipeline builds it (seeded)
        from qwenlong.pipeline import build

        model = build.build_model(cfg, tokenizer)
    return hf_generate_fn(model.to(device).eval(), tokenizer, sampling, max_batch_size=args.batch_size,
                          generation_attention=GENERATION_ATTENTION)


def _reward(args: argparse.Namespace, cfg: Any) -> Any:
    """The RL reward: the config's as the pipeline builds it (``build_reward``), or rules plus the judge
    the flags (or QWENLONG_JUDGE_*) name, with the default rules RL uses."""
    from qwenlong.rewards import make_reward
    from qwenlong.rewards.judge import OpenAIJudge

    if args.no_judge:
        return make_reward(None)
    if args.judge_url:
        return make_reward(OpenAIJudge(args.judge_url, args.judge_model, api_key=args.judge_api_key))
    if cfg is not None:
        from qwenlong.pipeline.run import build_reward

        return build_reward(cfg)
    return make_reward(OpenAIJudge.from_env())


def _prompt_fn(args: argparse.Namespace, tokenizer: Any) -> Any:
    from qwenlong.data import fit_prompt, record_prompt

    if args.max_input_tokens is None:
        return record_prompt
    return lambda record: fit_prompt(tokenizer, record, args.max_input_tokens, chat=False)


def _report_judge(reward: Any) -> None:
    """Say how often the judge failed: an answer it could not judge is scored by the rules alone (as in RL), and
    a judge that always fails (e.g. the base model served on the judge's port) would bin by the rules silently."""
    counters = reward.counters()
    asked, failed = counters.get("judge/requests", 0), counters.get("judge/fallbacks", 0)
    if failed:
        reasons = ", ".join(f"{key.split('/')[-1]} {n}" for key, n in sorted(counters.items())
                            if key.startswith("judge/failures/"))
        print(f"qwenlong data-bins: warning: the judge failed on {failed} of the {asked} answers it was asked to "
              f"judge ({reasons}); those are scored by the rules alone. Check the judge's endpoint and model (is "
              "the base model served on the judge's port?)", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from qwenlong.pipeline import build
    from qwenlong.pipeline.eval_command import check_model_path, output_folder
    from qwenlong.state.checkpoint import write_json, write_lines

    check_arguments(args)
    cfg = _config(args)
    resolve_sampling(args, cfg)
    for flag, path in (("--model", args.model), ("--tokenizer", args.tokenizer)):
        if path:
            check_model_path(flag, path)
    files = args.data or (cfg.data.train_files if cfg is not None else [])
    records = [record for path in files for record in build.load_file(path)]  # before any model loads
    out = output_folder(args.out)
    tokenizer = None
    if not files:  # the config's synthetic train split, made with the model's tokenizer as the run makes it
        tokenizer = _tokenizer(args, cfg, out)
        records = build.load_split(cfg, "train", tokenizer)
    if not records:
        raise ConfigError("no training records: the data files are empty")
    check_unique(records)
    check_settings(out, scoring_settings(args, cfg))
    results = out / RESULTS
    scores, _ = read_scores(results)
    unused = len(set(scores) - {(r.data_source, r.id) for r in records})  # rows of items no longer in the data
    pending = pending_records(records, scores)
    if pending:
        if tokenizer is None and not (args.api_url and args.max_input_tokens is None):
            tokenizer = _tokenizer(args, cfg, out)
        print(f"pre-inference: {len(pending)} of {len(records)} items to score, {args.samples} answers each "
              f"({len(records) - len(pending)} already in {results})", file=sys.stderr)
        reward = _reward(args, cfg)
        scores = pre_infer(records, _generate_fn(args, cfg, tokenizer), reward, results, samples=args.samples,
                           k=args.pass_k, prompt=_prompt_fn(args, tokenizer), batch_size=args.batch_size,
                           progress=not args.no_progress)
        _report_judge(reward)
    short = [s for s in scores.values() if s.n < args.pass_k]
    if short:
        raise ConfigError(f"--pass-k {args.pass_k}: {results} holds items with only {short[0].n} answers "
                          f"({short[0].data_source} {short[0].id!r}); give a smaller --pass-k")
    selection = select_balanced(((r.data_source, r.id, scores[(r.data_source, r.id)].pass_at(args.pass_k))
                                 for r in records), args.bins, target=args.per_source, seed=args.seed,
                                k=args.pass_k)
    chosen = selected_in_order(records, selection)
    write_lines(out / TRAIN, (json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in chosen))
    summary = {**selection.summary(), "samples": args.samples, "train_file": str(out / TRAIN),
               "results_file": str(results), "results_not_in_data": unused}
    write_json(out / SUMMARY, summary)
    print(selection.to_markdown())
    if unused:
        print(f"note: {unused} rows of {results} are of items not in the data (left out)", file=sys.stderr)
    print(f"wrote {out / TRAIN} ({len(chosen)} of {len(records)} records; data.train_files can name it), "
          f"{out / SUMMARY}, {results}")
    return 0
