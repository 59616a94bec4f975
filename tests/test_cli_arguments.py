"""Argument mistakes of ``qwenlong merge`` and ``qwenlong eval`` through the real entry point: exit status 2 and
one line naming the argument, before any model is read or loaded and before anything is written; the merged
folder's card and staging folder; the merge's progress."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from qwenlong.cli import main
from qwenlong.config import load_config, save_config
from qwenlong.data import SyntheticConfig, generate_records, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def _one_line_error(capsys, command: str, args: list[str], message: str) -> None:
    capsys.readouterr()
    assert main([command, *args]) == 2, args
    error = capsys.readouterr().err
    assert error.startswith(f"qwenlong {command}: error: {message}") and error.count("\n") == 1, (args, error)


def _files(folder: Path) -> set[Path]:
    return set(folder.rglob("*"))


# ---------------------------------------------------------------------- merge


def _tiny(seed: int, intermediate_size: int = 24) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=48, hidden_size=16, intermediate_size=intermediate_size, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return Qwen2ForCausalLM(config)


@pytest.fixture
def folders(tmp_path) -> dict[str, Path]:
    """A base (looking like a `qwenlong export` folder: its card and qwenlong.json) and two fine-tuned models."""
    paths = {name: tmp_path / name for name in ("base", "b", "c")}
    for seed, path in enumerate(paths.values()):
        _tiny(seed).save_pretrained(path)
    (paths["base"] / "tokenizer.json").write_text('{"model": "tiny"}')
    (paths["base"] / "README.md").write_text("# tiny\n\nExported from stage `sft` at step 3.\n")
    (paths["base"] / "qwenlong.json").write_text(json.dumps({"run": str(tmp_path / "run"), "stage": "sft",
                                                             "step": 3, "eval_label": "after-sft"}))
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("not a folder")
    return paths


def test_merge_argument_mistakes_are_one_line_before_anything_is_read(folders, tmp_path, monkeypatch, capsys):
    from qwenlong.merge import streaming

    def no_read(*args, **kwargs):
        raise AssertionError("a model was read before the arguments were checked")

    monkeypatch.setattr(streaming, "CheckpointReader", no_read)
    base, b, c = (str(folders[name]) for name in ("base", "b", "c"))
    out = str(tmp_path / "merged")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    mistakes = [
        (["--base", str(tmp_path / "nonexist"), "--models", b, "--out", out], "--base: "),
        (["--base", str(tmp_path / "afile"), "--models", b, "--out", out], "--base: "),
        (["--base", base, "--models", b, str(tmp_path / "empty"), "--out", out], "--models: "),
        (["--base", base, "--models", b, "--out", out, "--select-topk", "0"], "--select-topk: "),
        (["--base", base, "--models", b, "--out", out, "--select-topk", "nan"], "--select-topk: "),
        (["--base", base, "--models", b, "--out", out, "--select-topk", "1.5"], "--select-topk: "),
        (["--base", base, "--models", b, "--out", out, "--max-shard-size", "0"], "--max-shard-size: "),
        (["--base", base, "--models", b, c, "--out", str(tmp_path / "afile")], "--out: "),
        (["--base", base, "--models", b, "--out", c], "--out: "),
        (["--base", base, "--models", b, "--out", str(tmp_path / "full")], "--out: "),
    ]
    before = _files(tmp_path)
    for args, message in mistakes:
        _one_line_error(capsys, "merge", args, message)
    assert _files(tmp_path) == before  # nothing written: no <out>, no <out>.partial
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    _one_line_error(capsys, "merge", ["--base", str(tmp_path / "nonexist"), "--models", b, "--out", out],
                    f"--base: {tmp_path / 'nonexist'} does not exist")
    _one_line_error(capsys, "merge", ["--base", base, "--models", str(tmp_path / "empty"), "--out", out],
                    f"--models: {tmp_path / 'empty'} holds no model")
    _one_line_error(capsys, "merge", ["--base", base, "--models", b, "--out", out, "--select-topk", "nan"],
                    "--select-topk: expected a fraction in (0, 1], got nan")


def test_merged_folder_describes_the_merge_not_the_base(folders, tmp_path, capsys):
    """The base's card and qwenlong.json (an export's) are not copied: the merged folder's card names the merge,
    and `qwenlong eval --model MERGED` does not take it for the base's run export."""
    from qwenlong.pipeline import eval_command

    out = tmp_path / "merged"
    assert main(["merge", "--base", str(folders["base"]), "--models", str(folders["b"]), str(folders["c"]),
                 "--out", str(out), "--select-topk", "0.5", "--no-progress"]) == 0
    assert not (out / "qwenlong.json").exists()
    assert eval_command._exporting_run(str(out)) is None
    card = (out / "README.md").read_text()
    assert card != (folders["base"] / "README.md").read_text()
    assert "qwenlong merge" in card and "SCE (select_topk 0.5)" in card
    for name in ("base", "b", "c"):
        assert f"`{folders[name].resolve()}`" in card
    assert "Exported from stage" not in card
    for file in ("config.json", "tokenizer.json"):  # config and tokenizer still come from the base
        assert (out / file).read_bytes() == (folders["base"] / file).read_bytes()


def test_a_failed_merge_leaves_no_staging_folder(folders, tmp_path, monkeypatch, capsys):
    from qwenlong.merge import streaming

    _tiny(5, intermediate_size=32).save_pretrained(tmp_path / "wide")
    out = tmp_path / "merged"
    # found while merging (the shapes are read tensor by tensor): one line, and <out>.partial is removed
    _one_line_error(capsys, "merge", ["--base", str(folders["base"]), "--models", str(folders["b"]),
                                      str(tmp_path / "wide"), "--out", str(out)], "models: ")
    assert not out.exists() and not (tmp_path / "merged.partial").exists()

    calls = []

    def failing(base, tensors, select_topk=1.0):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return base

    monkeypatch.setattr(streaming, "sce_merge_tensor", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        main(["merge", "--base", str(folders["base"]), "--models", str(folders["b"]), "--out", str(out),
              "--max-shard-size", "1KB"])  # shards already written when it fails
    assert not out.exists() and not (tmp_path / "merged.partial").exists()


def test_merge_never_deletes_a_users_partial_folder(folders, tmp_path, capsys):
    """``<out>.partial`` the merge did not make is refused, not removed; one a killed merge left is replaced."""
    out = tmp_path / "merged"
    users = tmp_path / "merged.partial"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    _one_line_error(capsys, "merge", ["--base", str(folders["base"]), "--models", str(folders["b"]),
                                      "--out", str(out), "--no-progress"], "out: ")
    assert (users / "notes.txt").read_text() == "mine" and not out.exists()
    (users / "notes.txt").unlink()
    (users / ".qwenlong-merge-staging").touch()  # what a killed merge leaves
    (users / "shard-00000.tmp").write_text("half")
    assert main(["merge", "--base", str(folders["base"]), "--models", str(folders["b"]), "--out", str(out),
                 "--no-progress"]) == 0
    assert not users.exists() and not (out / "shard-00000.tmp").exists()
    assert not (out / ".qwenlong-merge-staging").exists()


def test_merge_shows_progress_per_tensor(folders, tmp_path, capsys):
    from safetensors import safe_open

    capsys.readouterr()
    assert main(["merge", "--base", str(folders["base"]), "--models", str(folders["b"]),
                 "--out", str(tmp_path / "merged")]) == 0
    with safe_open(folders["base"] / "model.safetensors", framework="pt") as f:
        count = len(list(f.keys()))
    error = capsys.readouterr().err
    assert "merge" in error and f"{count}/{count}" in error and "tensor" in error, error
    assert main(["merge", "--base", str(folders["base"]), "--models", str(folders["b"]),
                 "--out", str(tmp_path / "quiet"), "--no-progress"]) == 0
    assert f"{count}/{count}" not in capsys.readouterr().err


# ---------------------------------------------------------------------- eval


@pytest.fixture
def no_model(monkeypatch):
    """Any model or tokenizer load (a HF one, or the smoke mode's tiny random one) fails the test."""
    import transformers

    import qwenlong.data
    from qwenlong.pipeline import eval_command

    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(eval_command, "_load_tokenizer", fail)
    monkeypatch.setattr(eval_command, "tiny_random_model", fail)
    monkeypatch.setattr(qwenlong.data, "train_demo_tokenizer", fail)
    monkeypatch.setattr(qwenlong.data, "load_qwen_tokenizer", fail)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fail)


def test_eval_argument_mistakes_are_one_line_before_any_model_loads(tmp_path, monkeypatch, capsys, no_model):
    monkeypatch.chdir(tmp_path)
    write_jsonl(list(generate_records(2, SyntheticConfig(task="retrieval", document_tokens=64), seed=0)),
                tmp_path / "hotpotqa.jsonl")
    data = ["--data", f"hotpotqa={tmp_path / 'hotpotqa.jsonl'}"]
    _tiny(0).save_pretrained(tmp_path / "model")
    (tmp_path / "afile").write_text("not a folder")
    run = tmp_path / "run"
    run.mkdir()
    save_config(load_config(ROOT / "configs" / "tiny.yaml"), run / "config.yaml")  # eval: 4 samples, sampled
    api = ["--api-url", "http://127.0.0.1:1/v1", "--api-model", "served"]
    mistakes = [
        (["--synthetic", "2", "--samples", "0"], "--samples: expected >= 1, got 0"),
        (["--synthetic", "2", "--batch-size", "0"], "--batch-size: expected >= 1, got 0"),
        (["--synthetic", "2", "--temperature", "-1"], "--temperature: "),
        (["--synthetic", "2", "--temperature", "nan"], "--temperature: "),
        (["--synthetic", "2", "--top-p", "0"], "--top-p: "),
        (["--synthetic", "2", "--top-p", "1.5"], "--top-p: "),
        (["--synthetic", "-2"], "--synthetic: expected >= 1, got -2"),
        (["--synthetic", "0"], "--synthetic: "),
        (["--model", str(tmp_path / "model"), *data, "--limit", "-1"], "--limit: expected >= 1, got -1"),
        (["--synthetic", "1", "--agent", "memory", "--chunk-tokens", "0"], "--chunk-tokens: "),
        (["--synthetic", "1", "--max-input-tokens", "0"], "--max-input-tokens: "),
        (["--synthetic", "1", "--max-new-tokens", "0"], "--max-new-tokens: expected >= 1, got 0"),
        (["--model", str(tmp_path / "nowhere"), *data], f"--model: {tmp_path / 'nowhere'} does not exist"),
        (["--model", str(tmp_path / "afile"), *data], "--model: "),
        ([*api, "--tokenizer", str(tmp_path / "nowhere"), *data], "--tokenizer: "),
        (["--synthetic", "1", "--samples", "3", "--temperature", "0"], "--samples 3 with --temperature 0"),
        (["--run", str(run), *api, "--temperature", "0"], "--samples 4 with --temperature 0"),
        (["--run", str(run), "--model", str(tmp_path / "nowhere")], "--model: "),
        (["--run", str(run), *api, "--data", "x=y"], "--data: "),
    ]
    before = _files(tmp_path)
    for args, message in mistakes:
        _one_line_error(capsys, "eval", args, message)
    assert _files(tmp_path) == before  # no results/eval, no run/eval


def test_eval_checks_out_before_any_model_loads(tmp_path, monkeypatch, capsys, no_model):
    """An --out that cannot hold the results is named before the evaluation, which would be lost after it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("not a folder")
    run = tmp_path / "run"
    run.mkdir()
    save_config(load_config(ROOT / "configs" / "tiny.yaml"), run / "config.yaml")
    api = ["--api-url", "http://127.0.0.1:1/v1", "--api-model", "served"]
    _one_line_error(capsys, "eval", ["--synthetic", "1", "--out", str(tmp_path / "afile")],
                    f"--out: {tmp_path / 'afile'} exists and is not a directory")
    _one_line_error(capsys, "eval", ["--synthetic", "1", "--out", str(tmp_path / "afile" / "sub")], "--out: ")
    _one_line_error(capsys, "eval", ["--run", str(run), *api, "--out", str(tmp_path / "afile")], "--out: ")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "served").write_text("a file where the model's results go")
    _one_line_error(capsys, "eval", ["--run", str(run), *api, "--out", str(tmp_path / "results")],
                    f"--out: {tmp_path / 'results' / 'served'} exists and is not a directory")
    assert (tmp_path / "afile").read_text() == "not a folder"


def test_eval_makes_its_out_folder_before_the_model_loads(tmp_path, monkeypatch):
    import qwenlong.data

    out = tmp_path / "new" / "out"
    seen = []

    class Loaded(Exception):
        pass

    def tokenizer(*args, **kwargs):
        seen.append(out.is_dir())
        raise Loaded

    monkeypatch.setattr(qwenlong.data, "train_demo_tokenizer", tokenizer)
    with pytest.raises(Loaded):
        main(["eval", "--synthetic", "1", "--out", str(out), "--no-judge", "--no-progress"])
    assert seen == [True]


def test_eval_max_new_tokens_given_is_used_default_otherwise(tmp_path, monkeypatch):
    """``--max-new-tokens N`` is the sampling's (it was ``N or default``), the smoke default when not given."""
    import qwenlong.data
    from qwenlong.eval import generation

    class Built(Exception):
        pass

    budgets = []

    def stop(*args, **kwargs):
        raise Built

    monkeypatch.setattr(qwenlong.data, "train_demo_tokenizer", stop)
    real = generation.Sampling

    def record(*args, **kwargs):
        sampling = real(*args, **kwargs)
        budgets.append(sampling.max_new_tokens)
        return sampling

    monkeypatch.setattr(generation, "Sampling", record)
    for extra in (["--max-new-tokens", "5"], []):
        with pytest.raises(Built):
            main(["eval", "--synthetic", "1", "--out", str(tmp_path / "out"), *extra])
    assert budgets == [5, 32]


def _stub_stage(monkeypatch, tmp_path, stage: str, outcome) -> None:
    """``qwenlong <stage>`` with the config load and the stage itself replaced (no model, no data)."""
    import types

    import qwenlong.pipeline.commands as commands
    import qwenlong.pipeline.run as run_module

    monkeypatch.setattr(commands, "_load", lambda args: object())

    def fake(cfg, resume=False):
        if isinstance(outcome, BaseException):
            raise outcome
        return types.SimpleNamespace(dir=tmp_path, ctx=types.SimpleNamespace(is_main=True))

    monkeypatch.setattr(run_module, f"run_{stage}", fake)


@pytest.mark.parametrize("stage", ["pipeline", "sft", "rl"])
def test_ctrl_c_is_one_line_naming_resume_not_a_traceback(stage, tmp_path, monkeypatch, capsys):
    _stub_stage(monkeypatch, tmp_path, stage, KeyboardInterrupt())
    assert main([stage, "--config", "x.yaml"]) == 130
    error = capsys.readouterr().err
    assert error.startswith(f"qwenlong {stage}: interrupted") and "--resume" in error and error.count("\n") == 1, error


@pytest.mark.parametrize("stage", ["sft", "rl"])
def test_a_stage_says_where_its_results_are(stage, tmp_path, monkeypatch, capsys):
    _stub_stage(monkeypatch, tmp_path, stage, None)
    assert main([stage, "--config", "x.yaml"]) == 0
    assert f"run folder: {tmp_path}" in capsys.readouterr().out
