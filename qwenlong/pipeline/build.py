"""Build what a run needs from its config: tokenizer, model, data, reward, engine."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qwenlong.config import Config
from qwenlong.data import (
    DataError,
    DocQARecord,
    SyntheticConfig,
    apply_chat_template,
    load_records,
    make_record,
    record_prompt,
    reference_response,
    teacher_response,
    train_demo_tokenizer,
)
from qwenlong.data.prompt import question_text
from qwenlong.data.sources import RuleKind, rule_kind
from qwenlong.rewards import check_record_answers
from qwenlong.trainers.grpo import PromptExample

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def synthetic_records(cfg: Config, split: str, tokenizer: Any = None) -> list[DocQARecord]:
    """The synthetic train or eval split: document lengths spread over the configured range."""
    synth = cfg.data.synthetic
    count, seed = (synth.num_train, synth.seed) if split == "train" else (synth.num_eval, synth.seed + 1_000_003)
    rng = random.Random(f"lengths:{seed}")
    records = []
    for index in range(count):
        length = rng.randint(synth.min_document_tokens, synth.max_document_tokens)
        config = SyntheticConfig(task=synth.task, document_tokens=length,
                                 num_distractor_facts=synth.num_distractor_facts,
                                 answer_vocab_size=synth.answer_vocab_size,
                                 distractor_values=synth.distractor_values)
        records.append(make_record(index, config, seed, tokenizer))
    return records


def load_file(path: str | Path) -> list[DocQARecord]:
    """A data file's records, each gold answer checked by its reward rule: a gold the reward cannot score (a
    choice gold that is the option's text, a letter past the options) is a row error here, not a crash at the
    first reward of a run."""
    return load_records(path, check=check_record_answers).records


def load_split(cfg: Config, split: str, tokenizer: Any = None) -> list[DocQARecord]:
    files = {"train": cfg.data.train_files, "sft": cfg.data.sft_files or cfg.data.train_files,
             "eval": cfg.data.eval_files}[split]
    if files:
        records, where = [], {}
        for path in files:
            for record in load_file(path):
                # reward history, retrospective carrying and evaluation results are kept by id: two records
                # with one id would share them (verl's extra_info.index restarts at 0 in every file)
                if record.id in where:
                    raise DataError(f"data.{split}_files: id {record.id!r} is in {where[record.id]} and in {path}: "
                                    "give every row its own id (extra_info.id in verl rows)")
                # a source no reward scores (MRCR's similarity) would fail at the first step, not here
                if split != "eval" and rule_kind(record.data_source) is RuleKind.SIMILARITY:
                    raise DataError(f"data.{split}_files: record {record.id!r} of data source "
                                    f"{record.data_source!r} is scored by evaluation only (no reward rule): "
                                    "leave it out of training data")
                where[record.id] = path
                records.append(record)
        return records
    if cfg.data.synthetic is None:
        raise ValueError(f"data: no {split} files and no synthetic data configured")
    return synthetic_records(cfg, "eval" if split == "eval" else "train", tokenizer)


def build_tokenizer(cfg: Config, output_dir: Path) -> Any:
    """The model's tokenizer; for a tiny model without one (no ``data.tokenizer``), a small BPE trained on the
    run's training data."""
    if cfg.data.tokenizer is not None or cfg.model.name is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.data.tokenizer or cfg.model.name)
    else:
        saved = output_dir / "tokenizer"
        if (saved / "tokenizer.json").exists():
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(str(saved))
        # trained on the run's training data (its files, else the synthetic task)
        corpus = [record_prompt(r) + reference_response(r) for r in load_split(cfg, "train")[:400]]
        tokenizer = train_demo_tokenizer(corpus, vocab_size=cfg.model.tiny.vocab_size)
        tokenizer.save_pretrained(str(saved))
    return tokenizer


def build_model(cfg: Config, tokenizer: Any) -> torch.nn.Module:
    """The policy: a pretrained checkpoint, or a tiny Qwen2 built from the config (seeded). Under ZeRO-3
    a pretrained policy is created partitioned over the ranks (every rank calls this)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from qwenlong.integrations.hf import check_no_router_loss

    if cfg.model.attention in ("qwenlong", "qwenlong_atomic"):
        from qwenlong.integrations.hf_attention import register

        register()
    dtype = DTYPES[cfg.model.dtype]
    if cfg.model.name is not None and cfg.distributed.deepspeed_stage == 3:
        from qwenlong.distributed.zero import load_pretrained_partitioned

        model = load_pretrained_partitioned(cfg.model.name, dtype=dtype, attn_implementation=cfg.model.attention,
                                            cfg=cfg.distributed)
    elif cfg.model.name is not None:
        model = AutoModelForCausalLM.from_pretrained(cfg.model.name, dtype=dtype,
                                                     attn_implementation=cfg.model.attention)
    else:
        tiny = cfg.model.tiny
        config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=tiny.hidden_size,
                             intermediate_size=tiny.intermediate_size, num_hidden_layers=tiny.num_hidden_layers,
                             num_attention_heads=tiny.num_attention_heads,
                             num_key_value_heads=tiny.num_key_value_heads,
                             max_position_embeddings=tiny.max_position_embeddings, rope_theta=tiny.rope_theta,
                             tie_word_embeddings=tiny.tie_word_embeddings, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())):  # manual_seed reseeds every GPU too
            torch.manual_seed(cfg.seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=cfg.model.attention)
    check_no_router_loss(model)  # the trainers' loss is the causal LM's alone
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def prompt_ids(tokenizer: Any, record: DocQARecord) -> list[int]:
    return list(apply_chat_template(tokenizer, record_prompt(record), tokenize=True))


def sft_examples(tokenizer: Any, records: list[DocQARecord],
                 respond: Callable[[DocQARecord], str] = reference_response) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids ending with EOS) pairs for warm-up SFT, responses written by ``respond``."""
    out = []
    for record in records:
        response = respond(record) + tokenizer.eos_token
        out.append((prompt_ids(tokenizer, record), tokenizer(response, add_special_tokens=False)["input_ids"]))
    return out


def sft_training_examples(cfg: Config, tokenizer: Any) -> list[tuple[list[int], list[int]]]:
    """The warm-up examples a run trains on: the SFT split's traces from the configured teacher, keeping
    those whose prompt and response fit ``min(sft.token_budget * sp_size, sft.max_seq_len)`` tokens."""
    budget = min(cfg.sft.token_budget * cfg.distributed.sp_size, cfg.sft.max_seq_len)
    return [e for e in sft_examples(tokenizer, load_split(cfg, "sft", tokenizer), sft_teacher(cfg))
            if len(e[0]) + len(e[1]) <= budget]


def sft_teacher(cfg: Config) -> Callable[[DocQARecord], str]:
    """Who writes the warm-up traces: the reference, or for synthetic data the configured imperfect
    teacher, whose accuracy may fall linearly with document length (``teacher_accuracy_shortest`` at the
    shortest documents, ``teacher_accuracy`` at the longest)."""
    synth = cfg.data.synthetic
    if synth is None or cfg.data.sft_files or cfg.data.train_files:  # SFT reads files: their own responses
        return reference_response
    shortest = synth.teacher_accuracy if synth.teacher_accuracy_shortest is None else synth.teacher_accuracy_shortest
    span = max(synth.max_document_tokens - synth.min_document_tokens, 1)

    def respond(record: DocQARecord) -> str:
        position = min(max((record.metadata["document_tokens"] - synth.min_document_tokens) / span, 0.0), 1.0)
        accuracy = shortest + (synth.teacher_accuracy - shortest) * position
        return teacher_response(record, accuracy, cfg.seed, synth.teacher_error)

    return respond


def rl_examples(tokenizer: Any, records: list[DocQARecord]) -> list[PromptExample]:
    return [PromptExample(record.id, prompt_ids(tokenizer, record), record.data_source, list(record.answers),
                          question_text(record)) for record in records]


def eos_ids(tokenizer: Any) -> list[int]:
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    return sorted(i for i in ids if isinstance(i, int) and i >= 0)
