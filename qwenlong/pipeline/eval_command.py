"""``qwenlong eval``: run a model on the DocQA benchmarks and write a results table.

Examples::

    qwenlong eval --model PATH --data-dir benchmarks/docqa --out results/eval
    qwenlong eval --api-url http://127.0.0.1:8000/v1 --api-model NAME --data docmath=docmath.jsonl
    qwenlong eval --synthetic 8 --out /tmp/smoke      # tiny random model on synthetic data (CPU smoke test)
    qwenlong eval --run runs/tiny                     # a run's exported models, on its held-out split as it did
    qwenlong eval --model runs/tiny/export/rl-long-docs   # one of them (its qwenlong.json names the run)
    qwenlong eval --run runs/tiny --data-dir benchmarks/docqa   # ... or on the benchmarks
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

from qwenlong.config import ConfigError
from qwenlong.eval.benchmarks import BENCHMARKS, find_benchmark_files, load_benchmark

# the protocol flags' defaults outside a run's held-out split
METHOD_PROTOCOL = {"max_input_tokens": 120_000, "temperature": 0.7, "top_p": 0.95, "seed": 0, "samples": 1,
                   "batch_size": 8}
DEFAULT_OUT = "results/eval"  # --out without --run (with --run: RUN/eval/exported)
# integer flags that must be >= 1 when given (dest -> flag)
AT_LEAST_ONE = {"synthetic": "--synthetic", "limit": "--limit", "max_input_tokens": "--max-input-tokens",
                "max_new_tokens": "--max-new-tokens", "samples": "--samples", "batch_size": "--batch-size",
                "chunk_tokens": "--chunk-tokens", "memory_tokens": "--memory-tokens"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model (one of)")
    model.add_argument("--model", help="HF model directory, generated in-process (one `qwenlong export` wrote, "
                                       "without --data/--data-dir: on its run's held-out split, as --run)")
    model.add_argument("--run", help="a run folder (output.dir): its exported models (export/*; or --model, "
                                     "--api-url), on its held-out split with its eval settings and seed unless "
                                     "--data/--data-dir is given; results under RUN/eval/exported/<model>")
    model.add_argument("--api-url", help="OpenAI-compatible server (e.g. `vllm serve`), base URL ending in /v1")
    model.add_argument("--api-model", help="model name on that server")
    model.add_argument("--api-key", default=os.environ.get("QWENLONG_API_KEY"))
    model.add_argument("--tokenizer", help="tokenizer measuring the input budget (default: the model's, "
                                           "or the Qwen vocabulary with --api-url)")
    model.add_argument("--device", default="cuda" if _has_cuda() else "cpu")
    model.add_argument("--dtype", default="auto")

    data = parser.add_argument_group("data")
    data.add_argument("--data", action="append", default=[], metavar="KEY=PATH",
                      help=f"a benchmark file; KEY in {', '.join(BENCHMARKS)} (repeatable)")
    data.add_argument("--data-dir", help="directory with <key>.jsonl / <key>.parquet per benchmark")
    data.add_argument("--synthetic", type=int, metavar="N",
                      help="smoke mode: N synthetic items per task (a tiny random model unless --model is given)")
    data.add_argument("--limit", type=int, help="at most this many items per benchmark")

    protocol = parser.add_argument_group("protocol (defaults: method.md section 5; on a run's held-out split, "
                                         "the run's eval settings and seed)")
    protocol.add_argument("--max-input-tokens", type=int, help=f"default {METHOD_PROTOCOL['max_input_tokens']}")
    protocol.add_argument("--max-new-tokens", type=int, help="default 10000 (32 in smoke mode)")
    protocol.add_argument("--temperature", type=float, help=f"default {METHOD_PROTOCOL['temperature']}")
    protocol.add_argument("--top-p", type=float, help=f"default {METHOD_PROTOCOL['top_p']}")
    protocol.add_argument("--seed", type=int, help=f"default {METHOD_PROTOCOL['seed']}")
    protocol.add_argument("--samples", type=int, metavar="K",
                          help="answers per item; accuracy is their mean (avg@K); default 1")
    protocol.add_argument("--batch-size", type=int, help=f"default {METHOD_PROTOCOL['batch_size']}")

    agent = parser.add_argument_group("agent (QwenLong-L1.5's memory agent: documents past the model's window)")
    agent.add_argument("--agent", choices=("none", "memory"), default="none",
                       help="memory: read each document chunk by chunk, keeping a memory, then answer from it "
                            "(no truncation: --max-input-tokens is ignored); needs --model or --synthetic")
    agent.add_argument("--chunk-tokens", type=int, default=32_768, help="document tokens per agent step")
    agent.add_argument("--memory-tokens", type=int, default=15_000, help="most tokens of memory + plan per step")

    judge = parser.add_argument_group("judge (default: QWENLONG_JUDGE_URL / _MODEL / _API_KEY when set)")
    judge.add_argument("--judge-url")
    judge.add_argument("--judge-model")
    judge.add_argument("--judge-api-key")
    judge.add_argument("--no-judge", action="store_true", help="score by rules alone")
    judge.add_argument("--faithful", action="store_true", help="the release's rules exactly (no length guard)")

    parser.add_argument("--out", help=f"output directory, default {DEFAULT_OUT} (with --run: RUN/eval/exported), "
                                      "holding results.json, results.md, predictions.jsonl (per model with --run)")
    parser.add_argument("--no-progress", action="store_true")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def check_arguments(args: argparse.Namespace) -> None:
    """The protocol and data flags' ranges, each named, before anything is read or loaded."""
    check_ranges(args, AT_LEAST_ONE)


def check_ranges(args: argparse.Namespace, at_least_one: dict[str, str]) -> None:
    """Sampling flags' ranges (``--temperature``, ``--top-p``) and the integer flags of ``at_least_one`` (dest ->
    flag) that must be >= 1 when given; a ConfigError names the flag (shared with ``qwenlong data-bins``)."""
    for key, flag in at_least_one.items():
        value = getattr(args, key)
        if value is not None and value < 1:
            raise ConfigError(f"{flag}: expected >= 1, got {value}")
    if args.temperature is not None and not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ConfigError(f"--temperature: expected a finite number >= 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:  # NaN fails too
        raise ConfigError(f"--top-p: expected a fraction in (0, 1], got {args.top_p}")


def check_sampling(samples: int, temperature: float) -> None:
    """As the config's eval.samples_per_prompt: several answers per item need sampling (once the defaults,
    or the run's eval settings, fill the flags not given)."""
    if samples > 1 and temperature == 0:
        raise ConfigError(f"--samples {samples} with --temperature {temperature}: several answers per item need "
                          "sampled decoding (--temperature > 0); greedy decoding repeats one answer")


def check_model_path(flag: str, path: str) -> None:
    """A ``--model`` / ``--tokenizer`` that cannot be a hub id is a local path: it must exist (transformers
    would say "Repo id must be in the form ..."); a local model folder must hold ``config.json``."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    local = Path(path)
    if local.exists():
        if flag == "--model" and not (local / "config.json").is_file():
            raise ConfigError(f"--model: {path} is not a model folder (no config.json in it)")
        return
    try:
        validate_repo_id(path)
    except HFValidationError:
        raise ConfigError(f"{flag}: {path} does not exist") from None


def output_folder(out: str | os.PathLike, flag: str = "--out") -> Path:
    """``out``, made before any model loads: a path that cannot hold the results is named at once, not
    after the whole evaluation has run."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag}: {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"{flag}: cannot create {out} ({error.strerror or error})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag}: {out} is not writable")
    return out


def _datasets(args: argparse.Namespace) -> dict[str, list[Any]]:
    """The benchmarks ``--data`` / ``--data-dir`` name, read (before any model is loaded: a bad argument or
    file is reported at once)."""
    files = {}
    for spec in args.data:  # checked first: a typo in --data is named whatever --data-dir holds
        key, sep, path = spec.partition("=")
        if not sep or key not in BENCHMARKS:
            raise ConfigError(f"--data: expected KEY=PATH with KEY in {sorted(BENCHMARKS)}, got {spec!r}")
        files[key] = path
    if args.data_dir:
        if not Path(args.data_dir).is_dir():
            raise ConfigError(f"--data-dir: {args.data_dir} is not a directory")
        files = {**find_benchmark_files(args.data_dir), **files}
    ordered = [key for key in BENCHMARKS if key in files]  # the paper's column order
    return {BENCHMARKS[key].title: load_benchmark(key, files[key], limit=args.limit) for key in ordered}


def _synthetic(args: argparse.Namespace, tokenizer: Any) -> dict[str, list[Any]]:
    from qwenlong.data import SyntheticConfig, generate_records
    from qwenlong.data.synthetic import DATA_SOURCES, TWO_CHUNK_SOURCE, make_two_chunk_record

    datasets = {DATA_SOURCES[task]: list(generate_records(args.synthetic, SyntheticConfig(task=task,
                                                                                          document_tokens=256),
                                                          seed=args.seed, tokenizer=tokenizer))
                for task in DATA_SOURCES}
    if args.agent == "memory":  # facts in two chunks: the memory must carry the first to the answer
        datasets[TWO_CHUNK_SOURCE] = [make_two_chunk_record(i, 2 * args.chunk_tokens, args.seed, tokenizer)
                                      for i in range(args.synthetic)]
    return datasets


def tiny_random_model(tokenizer: Any, seed: int = 0) -> Any:
    """A 2-layer random Qwen2 for smoke tests (its answers are noise: accuracy near 0)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    return Qwen2ForCausalLM(config).eval()


def _reward(args: argparse.Namespace) -> Any:
    from qwenlong.rewards import HybridReward, RuleConfig
    from qwenlong.rewards.judge import OpenAIJudge

    if args.no_judge:
        judge = None
    elif args.judge_url:
        judge = OpenAIJudge(args.judge_url, args.judge_model or "judge", api_key=args.judge_api_key)
    else:
        judge = OpenAIJudge.from_env()
    return HybridReward(judge, RuleConfig.faithful() if args.faithful else RuleConfig())


def run(args: argparse.Namespace) -> int:
    from qwenlong.data import generate_records, load_qwen_tokenizer, record_prompt, reference_response
    from qwenlong.eval.generation import Sampling, openai_generate_fn
    from qwenlong.eval.harness import evaluate

    check_arguments(args)
    if args.run is None and args.model and not (args.data or args.data_dir or args.synthetic is not None):
        args.run = _exporting_run(args.model)  # a folder `qwenlong export` wrote: its run's held-out split
    if args.run is not None:
        return evaluate_run(args)
    _method_protocol(args)
    check_sampling(args.samples, args.temperature)
    if bool(args.model) + bool(args.api_url) + (args.synthetic is not None and not args.model) != 1:
        raise ConfigError("give exactly one of --model, --api-url or --synthetic (or --run)")
    if args.agent == "memory" and args.api_url:
        raise ConfigError("--agent memory: needs --model or --synthetic (the agent drives an in-process engine)")
    if args.api_url and not args.api_model:
        raise ConfigError("--api-model: required with --api-url")
    datasets = _datasets(args) if args.synthetic is None else {}  # read before the model loads
    if args.synthetic is None and not datasets:
        raise ConfigError("no data: give --data KEY=PATH, --data-dir DIR or --synthetic N")
    if args.agent == "memory" and BENCHMARKS["mrcr"].title in datasets:
        raise ConfigError("--agent memory: reads documents chunk by chunk; MRCR's input is a conversation "
                          "(evaluate it without the agent)")
    for flag, path in (("--model", args.model), ("--tokenizer", args.tokenizer)):
        if path:
            check_model_path(flag, path)
    out = output_folder(args.out or DEFAULT_OUT)  # before the model loads: not after the evaluation
    max_new_tokens = args.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = 32 if args.synthetic is not None else 10_000
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        seed=args.seed)
    if args.api_url:
        tokenizer = _load_tokenizer(args.tokenizer) if args.tokenizer else load_qwen_tokenizer()
        generate = openai_generate_fn(args.api_url, args.api_model, api_key=args.api_key, sampling=sampling)
    elif args.model:
        from transformers import AutoModelForCausalLM

        tokenizer = _load_tokenizer(args.tokenizer or args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=args.dtype).to(args.device).eval()
        generate = _hf_generate(args, model, tokenizer, sampling)
    else:
        from qwenlong.data import SyntheticConfig, train_demo_tokenizer

        corpus = [record_prompt(r) + reference_response(r)
                  for r in generate_records(16, SyntheticConfig(task="mixed", document_tokens=256), seed=args.seed)]
        tokenizer = train_demo_tokenizer(corpus, vocab_size=512)
        generate = _hf_generate(args, tiny_random_model(tokenizer, args.seed), tokenizer, sampling)

    if args.synthetic is not None:
        datasets = _synthetic(args, tokenizer)
    # the memory agent reads whole documents, however long: nothing is cut to a budget
    max_input_tokens = 2**62 if args.agent == "memory" else args.max_input_tokens
    report = evaluate(datasets, generate, tokenizer, reward=_reward(args), max_input_tokens=max_input_tokens,
                      batch_size=args.batch_size, progress=not args.no_progress, samples_per_prompt=args.samples)
    report.write(out)
    print(report.to_markdown())
    if report.judge_metrics:
        print("judge:", ", ".join(f"{k}={v}" for k, v in sorted(report.judge_metrics.items())))
    print(f"wrote {out}/results.json, results.md, predictions.jsonl")
    return 0


def _hf_generate(args: argparse.Namespace, model: Any, tokenizer: Any, sampling: Any) -> Any:
    """Plain generation, or the memory agent driving the same engine (``--agent memory``)."""
    from qwenlong.eval.generation import hf_generate_fn

    if args.agent != "memory":
        return hf_generate_fn(model, tokenizer, sampling, max_batch_size=args.batch_size)
    from qwenlong.agents import MemoryAgent, MemoryAgentConfig, memory_agent_generate_fn
    from qwenlong.rollout import HFGenerateEngine

    config = MemoryAgentConfig(chunk_tokens=args.chunk_tokens, memory_tokens=args.memory_tokens,
                               answer_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                               top_p=sampling.top_p)
    stops = {tokenizer.eos_token_id, tokenizer.get_vocab().get("<|im_end|>")}  # as hf_generate_fn stops
    engine = HFGenerateEngine(model, eos_token_id=sorted(t for t in stops if isinstance(t, int)),
                              pad_token_id=tokenizer.pad_token_id, max_batch_size=args.batch_size)
    agent = MemoryAgent(engine, tokenizer, config)
    return memory_agent_generate_fn(agent, seed=sampling.seed)


def _method_protocol(args: argparse.Namespace) -> None:
    """The method's defaults for the protocol flags not given."""
    for key, value in METHOD_PROTOCOL.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def _exporting_run(folder: str) -> str | None:
    """The run folder an exported model came from (its ``qwenlong.json``), when that folder is still there."""
    from pathlib import Path

    from qwenlong.pipeline.export import INFO_FILE, export_info

    if not (Path(folder) / INFO_FILE).is_file():
        return None
    run = export_info(folder).get("run")
    return run if run and (Path(run) / "config.yaml").is_file() else None


def evaluate_run(args: argparse.Namespace) -> int:
    """``--run``: each of a run's exported models (or ``--model`` / ``--api-url``). On the run's held-out split
    (no ``--data``/``--data-dir``) with the run's protocol, the one ``qwenlong.pipeline.run.evaluate_heldout``
    ran (its eval settings, seed, batching and reward; protocol flags given override them), so a stage's
    exported folder gives the report's answers again; otherwise on the benchmarks with the method's defaults."""
    import dataclasses

    from qwenlong.eval.generation import Sampling, hf_generate_fn, openai_generate_fn
    from qwenlong.eval.harness import evaluate
    from qwenlong.pipeline import build
    from qwenlong.pipeline.export import INFO_FILE, export_info, exported_folders, read_run
    from qwenlong.pipeline.run import (
        EVAL_BATCH_SIZE,
        GENERATION_ATTENTION,
        build_eval_reward,
        evaluate_heldout,
        heldout_sampling,
    )

    if args.synthetic is not None or args.agent != "none":
        raise ConfigError("--run: evaluates on the run's held-out split or on --data/--data-dir, "
                          "not with --synthetic or --agent")
    if args.model and args.api_url:
        raise ConfigError("give at most one of --model and --api-url with --run")
    if args.api_url and not args.api_model:
        raise ConfigError("--api-model: required with --api-url")
    run_dir = Path(args.run)
    cfg, record = read_run(run_dir)
    heldout = not (args.data or args.data_dir)
    datasets = None if heldout else _datasets(args)  # read before any model loads
    if heldout:
        given = {"max_input_tokens": args.max_input_tokens, "max_output_tokens": args.max_new_tokens,
                 "temperature": args.temperature, "top_p": args.top_p, "samples_per_prompt": args.samples}
        protocol = dataclasses.replace(cfg.eval, **{k: v for k, v in given.items() if v is not None})
        check_sampling(protocol.samples_per_prompt, protocol.temperature)
        cfg = dataclasses.replace(cfg, seed=cfg.seed if args.seed is None else args.seed, eval=protocol)
        if args.batch_size is None:
            args.batch_size = EVAL_BATCH_SIZE
    else:
        _method_protocol(args)
        check_sampling(args.samples, args.temperature)
    if args.api_url:
        models: list[tuple[str, Path | None]] = [(args.api_model.replace("/", "_"), None)]
    elif args.model:
        check_model_path("--model", args.model)
        models = [(Path(args.model).name, Path(args.model))]
    else:
        models = [(folder.name, folder) for folder in exported_folders(run_dir)]
        if not models:
            raise ConfigError(f"--run: {run_dir} has no exported model (export/*/{INFO_FILE}); "
                              f"write one with `qwenlong export --run {run_dir} --out {run_dir}/export/NAME`")
    if args.tokenizer:
        check_model_path("--tokenizer", args.tokenizer)
    # each model's folder, before any model loads: not after the evaluations
    out_root = output_folder(args.out if args.out else run_dir / "eval" / "exported")
    for name, _ in models:
        if (out_root / name).exists() and not (out_root / name).is_dir():
            raise ConfigError(f"--out: {out_root / name} exists and is not a directory")
    rows = []
    for name, folder in models:
        sampling = heldout_sampling(cfg) if heldout else Sampling(
            10_000 if args.max_new_tokens is None else args.max_new_tokens, args.temperature, args.top_p,
            seed=args.seed)
        if folder is None:
            tokenizer = _load_tokenizer(args.tokenizer) if args.tokenizer else build.build_tokenizer(cfg, run_dir)
            generate = openai_generate_fn(args.api_url, args.api_model, api_key=args.api_key, sampling=sampling)
        else:
            from transformers import AutoModelForCausalLM

            tokenizer = _load_tokenizer(args.tokenizer or str(folder))
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=args.dtype).to(args.device).eval()
            generate = hf_generate_fn(model, tokenizer, sampling, max_batch_size=args.batch_size,
                                      generation_attention=GENERATION_ATTENTION)
        if heldout:
            reward = _reward(args) if args.no_judge or args.judge_url else build_eval_reward(cfg)
            report = evaluate_heldout(cfg, tokenizer, generate, reward, progress=not args.no_progress,
                                      batch_size=args.batch_size)
        else:
            report = evaluate(datasets, generate, tokenizer, reward=_reward(args),
                              max_input_tokens=args.max_input_tokens, batch_size=args.batch_size,
                              progress=not args.no_progress, samples_per_prompt=args.samples)
        report.write(out_root / name)
        label = export_info(folder).get("eval_label") if folder is not None and (folder / INFO_FILE).is_file() else None
        reported = record.get("evals", {}).get(label, {}).get("average") if heldout and label else None
        rows.append(f"| {name} | {report.average:.1f} | {'' if reported is None else f'{reported:.1f} ({label})'} |")
        print(f"{name}:\n{report.to_markdown()}")
    print("| model | accuracy (%) | the run's report |\n|---|---|---|\n" + "\n".join(rows))
    folders = ", ".join(str(out_root / name) for name, _ in models)
    print(f"wrote results.json, results.md and predictions.jsonl in {folders}")
    return 0


def _load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
