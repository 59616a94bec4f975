"""Trained policies as Hugging Face model folders: the safetensors writer against the safetensors library,
a shrunken pipeline that exports every stage (loaded back with transformers: the trainer's greedy answers
and log-probs; ``qwenlong eval --model`` gives the report's answers again), ``qwenlong export`` from a
checkpoint, the ``output.export`` modes, and an export under ZeRO-3 on two processes."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")

from helpers import spawn, tiny_causal_lm  # noqa: E402
from test_pipeline import SMALL, TINY, _env  # noqa: E402

from qwenlong.export import write_hf_folder, write_safetensors  # noqa: E402


def _tiny_qwen2(tie: bool):
    return tiny_causal_lm(vocab_size=96, max_positions=32768, tie_word_embeddings=tie)


def _demo_tokenizer():
    from qwenlong.data import train_demo_tokenizer

    return train_demo_tokenizer(["Therefore, the answer is blue.", "<text>a document</text> question"] * 8,
                                vocab_size=300)


# ---------------------------------------------------------------------- the writer


@pytest.mark.parametrize("max_shard_bytes", [10**9, 100])
def test_write_safetensors_reads_back_every_tensor(tmp_path, max_shard_bytes):
    from safetensors import safe_open

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    weights = {"a.bf16": torch.randn(7, 5, generator=g).to(torch.bfloat16), "b.f32": torch.randn(33, generator=g),
               "c.i64": torch.randint(-9, 9, (4, 3), generator=g), "d.bool": torch.rand(6, generator=g) > 0.5,
               "e.scalar": torch.randn((), generator=g), "f.empty": torch.zeros(0, 4),
               "g.strided": torch.randn(6, 8, generator=g).t(), "h.f16": torch.randn(3, 3, generator=g).half()}
    files = write_safetensors(weights, tmp_path, dtype=torch.float16, max_shard_bytes=max_shard_bytes)
    if max_shard_bytes < 1000:  # several shards, each at most the limit unless one tensor alone is larger
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert len(files) > 2 and set(index["weight_map"]) == set(weights)
        where = index["weight_map"]
        for file in files[:-1]:
            with safe_open(tmp_path / file, framework="pt") as f:
                sizes = [f.get_tensor(n).nbytes for n in f.keys()]
            assert sum(sizes) <= max_shard_bytes or len(sizes) == 1, file
        assert index["metadata"]["total_size"] == sum(
            (t.to(torch.float16) if t.dtype.is_floating_point else t).nbytes for t in weights.values())
    else:
        assert files == ["model.safetensors"]
        where = dict.fromkeys(weights, "model.safetensors")
    for name, tensor in weights.items():
        with safe_open(tmp_path / where[name], framework="pt") as f:
            read = f.get_tensor(name)
        expected = tensor.to(torch.float16) if tensor.dtype.is_floating_point else tensor
        assert read.dtype == expected.dtype and read.shape == expected.shape, name
        assert torch.equal(read, expected), name


def test_write_hf_folder_loads_with_transformers_and_checks_the_weights(tmp_path):
    model = _tiny_qwen2(tie=True)
    state = model.state_dict()
    assert "lm_head.weight" in state  # a tied head is in the state dict, as in model.pt
    folder = write_hf_folder(tmp_path / "m", weights=state, config=model.config, tokenizer=_demo_tokenizer(),
                             dtype="bf16", max_shard_bytes=20_000, card="# card\n")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert loaded.dtype == torch.bfloat16
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, state[name].to(torch.bfloat16)), name
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]  # written once, under the embeddings' name
    assert (folder / "README.md").read_text() == "# card\n" and not (tmp_path / "m.tmp").exists()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"

    bad = dict(state)
    bad["model.norm.weight"] = torch.ones(5)
    del bad["model.layers.1.mlp.up_proj.weight"]
    bad["model.extra"] = torch.ones(1)
    with pytest.raises(ValueError, match="3 do not fit.*up_proj.weight is missing.*model.extra is not a weight"):
        write_hf_folder(tmp_path / "bad", weights=bad, config=model.config, tokenizer=_demo_tokenizer())
    with pytest.raises(ValueError, match="dtype: expected one of"):
        write_hf_folder(tmp_path / "bad", weights=state, config=model.config, tokenizer=_demo_tokenizer(), dtype="q8")


# ---------------------------------------------------------------------- a run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """The shrunken tiny pipeline (SFT 3 steps, two RL phases of one step, 4 held-out items x 4 answers),
    every stage exported."""
    out = tmp_path_factory.mktemp("export") / "run"
    result = subprocess.run([sys.executable, "-m", "qwenlong", "pipeline", "--config", TINY, *SMALL,
                             "output.export=every_stage", f"output.dir={out}"],
                            capture_output=True, text=True, env=_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def _record(run: Path) -> dict:
    return json.loads((run / "pipeline.json").read_text())


@pytest.mark.slow
def test_every_stage_is_exported_with_its_card(tiny_run):
    exports = _record(tiny_run)["exports"]
    assert exports == {"sft": "export/sft", "rl:short-docs": "export/rl-short-docs",
                       "rl:long-docs": "export/rl-long-docs"}
    for stage, folder in exports.items():
        folder = tiny_run / folder
        info = json.loads((folder / "qwenlong.json").read_text())
        assert info["stage"] == stage and info["finished"] and Path(info["checkpoint"]).is_dir()
        card = (folder / "README.md").read_text()
        label = info["eval_label"]
        accuracy = _record(tiny_run)["evals"][label]["average"]
        assert f"| {label} (this model) | {accuracy:.1f} |" in card and "copy_marked_fact" in card
        generation = json.loads((folder / "generation_config.json").read_text())
        assert (generation["temperature"], generation["top_p"], generation["max_new_tokens"]) == (0.7, 0.95, 12)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "rl:long-docs"])
def test_exported_stage_gives_the_trainers_greedy_answers_and_logprobs(tiny_run, stage, monkeypatch):
    """The folder loaded with transformers alone against the trainer's policy (built as the run builds it,
    with the stage's checkpoint loaded as ``--resume`` loads it): greedy answers of our engine vs
    ``generate``, and the trainer's fused log-probs vs a float64 forward of the exported model, on the
    greedy answers and on fresh random responses."""
    monkeypatch.setenv("QWENLONG_BACKEND", "torch")
    from qwenlong.config import load_config
    from qwenlong.distributed import TrainingBackend
    from qwenlong.kernels import linear_logprobs
    from qwenlong.pipeline import build
    from qwenlong.pipeline.export import stage_checkpoint
    from qwenlong.pipeline.run import GENERATION_ATTENTION
    from qwenlong.rollout import HFGenerateEngine, SamplingParams
    from qwenlong.trainers.packed import forward_hidden, lm_head_weight, pack_sequences

    cfg = load_config(tiny_run / "config.yaml")
    tokenizer = build.build_tokenizer(cfg, tiny_run)
    policy = build.build_model(cfg, tokenizer)
    TrainingBackend(policy).load_weights(stage_checkpoint(tiny_run, stage))
    folder = tiny_run / _record(tiny_run)["exports"][stage]
    exported = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    exported_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    records = build.load_split(cfg, "eval", tokenizer)
    prompts = [build.prompt_ids(tokenizer, r) for r in records]
    assert [build.prompt_ids(exported_tokenizer, r) for r in records] == prompts  # the chat template too

    engine = HFGenerateEngine(policy, eos_token_id=build.eos_ids(tokenizer), pad_token_id=tokenizer.pad_token_id,
                              generation_attention=GENERATION_ATTENTION)
    greedy = [group[0].token_ids for group in engine.generate(prompts, SamplingParams(12, temperature=0))]
    defaults = transformers.GenerationConfig.from_pretrained(folder)
    for prompt, answer in zip(prompts, greedy, strict=True):
        out = exported.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12,
                                eos_token_id=defaults.eos_token_id, pad_token_id=defaults.pad_token_id)
        assert out[0, len(prompt):].tolist() == answer

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    responses = greedy + [torch.randint(0, len(tokenizer), (int(n),), generator=g).tolist()
                          for n in torch.randint(1, 20, (len(prompts),), generator=g)]
    sequences = [p + r for p, r in zip(prompts + prompts, responses, strict=True)]
    batch = pack_sequences(sequences, [len(p) for p in prompts + prompts])
    reference_model = exported.double()
    for temperature in (cfg.rl.temperature, 0.7):
        with torch.no_grad():
            trainer = linear_logprobs(forward_hidden(policy, batch), lm_head_weight(policy), batch.targets,
                                      temperature=temperature)[batch.mask]
            reference = []
            for sequence, prompt in zip(sequences, prompts + prompts, strict=True):
                logits = reference_model(torch.tensor([sequence])).logits[0].double() / temperature
                logp = torch.log_softmax(logits, -1)[len(prompt) - 1:-1]
                reference.append(logp.gather(-1, torch.tensor(sequence[len(prompt):])[:, None])[:, 0])
        torch.testing.assert_close(trainer.double(), torch.cat(reference), rtol=0, atol=2e-5)


@pytest.mark.slow
def test_eval_of_an_exported_stage_gives_the_reports_answers(tiny_run, tmp_path):
    from qwenlong.cli import main

    folder = tiny_run / "export" / "rl-long-docs"
    report = _record(tiny_run)["evals"]["after-long-docs"]

    def answers(directory: Path) -> list[tuple]:
        rows = [json.loads(line) for line in (directory / "predictions.jsonl").read_text().splitlines()]
        return [(r["id"], r["sample"], r["response"], r["accurate"]) for r in rows]

    # only --model: the folder's qwenlong.json names the run, whose held-out split and protocol apply
    assert main(["eval", "--model", str(folder), "--out", str(tmp_path / "again"), "--no-progress"]) == 0
    again = tmp_path / "again" / folder.name
    assert json.loads((again / "results.json").read_text())["average"] == report["average"]
    expected = answers(tiny_run / "eval" / "after-long-docs")
    assert answers(again) == expected and len(expected) == 16
    # the same with another seed samples other answers: the match is not one any sampling would give
    assert main(["eval", "--run", str(tiny_run), "--model", str(folder), "--seed", "1", "--out",
                 str(tmp_path / "seed1"), "--no-progress"]) == 0
    assert [a[2] for a in answers(tmp_path / "seed1" / folder.name)] != [a[2] for a in expected]


@pytest.mark.slow
def test_export_command_writes_any_checkpoint(tiny_run, tmp_path, capsys):
    from qwenlong.cli import main
    from qwenlong.pipeline.export import stage_checkpoint

    out = tmp_path / "short-bf16"
    assert main(["export", "--run", str(tiny_run), "--stage", "short-docs", "--out", str(out), "--dtype", "bf16",
                 "--max-shard-size", "0.00002"]) == 0
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    pipeline_export = transformers.AutoModelForCausalLM.from_pretrained(tiny_run / "export" / "rl-short-docs")
    assert loaded.dtype == torch.bfloat16 and (out / "model.safetensors.index.json").exists()
    for name, tensor in pipeline_export.state_dict().items():  # the checkpoint's weights are the live ones
        assert torch.equal(loaded.state_dict()[name], tensor.to(torch.bfloat16)), name
    info = json.loads((out / "qwenlong.json").read_text())
    assert info["stage"] == "rl:short-docs" and info["finished"] and "in bfloat16" in (out / "README.md").read_text()

    # a checkpoint by path; the run is the folder holding it
    checkpoint = stage_checkpoint(tiny_run, "sft")
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "sft")]) == 0
    sft = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sft").state_dict()
    live = transformers.AutoModelForCausalLM.from_pretrained(tiny_run / "export" / "sft").state_dict()
    assert sft.keys() == live.keys() and all(torch.equal(sft[name], live[name]) for name in live)
    assert main(["export", "--run", str(tiny_run), "--stage", "mid-docs", "--out", str(tmp_path / "x")]) == 2
    assert "--stage: the run has no stage 'mid-docs'; expected one of sft, " in capsys.readouterr().err


# ---------------------------------------------------------------------- output.export


def _stub_run(tmp_path: Path, mode: str, memory_agent: bool = False):
    """What the export hooks read of a ``Run``: a tiny policy whose SFT and two RL phases (and the memory
    agent's merge after the first) each left a checkpoint with other weights (the live policy holds the last
    phase's)."""
    from qwenlong.config import load_config, save_config
    from qwenlong.distributed import TrainingBackend
    from qwenlong.pipeline import build

    agent = ["rl.memory_agent.enabled=true", "rl.memory_agent.after_phase=short-docs"] if memory_agent else []
    cfg = load_config(TINY, [*SMALL, *agent, f"output.dir={tmp_path}", f"output.export={mode}"])
    tmp_path.mkdir(parents=True)
    save_config(cfg, tmp_path / "config.yaml")
    tokenizer = build.build_tokenizer(cfg, tmp_path)
    model = build.build_model(cfg, tokenizer)
    backend = TrainingBackend(model)
    backend.start(lr=1.0, weight_decay=0.0, total_steps=1, warmup_steps=0, schedule="constant", grad_clip=1.0)
    state = {"done": [], "evals": {}}
    run = SimpleNamespace(cfg=cfg, dir=tmp_path, tokenizer=tokenizer, model=model, backend=backend, ctx=backend.ctx,
                          state=state, save_state=lambda: (tmp_path / "pipeline.json").write_text(json.dumps(state)))
    stages = [("sft", "sft-step000003", {"stage": "sft"}),
              ("rl:short-docs", "rl-short-docs-step000001", {"stage": "rl", "phase": "short-docs"}),
              ("rl:long-docs", "rl-long-docs-step000001", {"stage": "rl", "phase": "long-docs"})]
    if memory_agent:  # the expert's own checkpoint, then the merge: the stage's record
        stages[2:2] = [(None, "rl-memory-agent-step000001", {"stage": "rl", "phase": "memory-agent"}),
                       ("rl:memory-agent", "memory-agent-merged", {"stage": "memory-agent-merge"})]
    for stage, name, saved in stages:
        with torch.no_grad():
            model.model.norm.weight.add_(1.0)  # each stage ends with other weights
        backend.save(tmp_path / "checkpoints" / name, {**saved, "step": 1})
        if stage is not None:
            state["done"].append(stage)
    run.save_state()
    return run


def _norm(folder: Path) -> float:
    return float(transformers.AutoModelForCausalLM.from_pretrained(folder).model.norm.weight[0].detach())


def test_export_modes(tmp_path):
    from qwenlong.pipeline.export import export_final, export_finished_stage, export_stage

    # final: the last stage, live; an earlier export of the run is deleted
    run = _stub_run(tmp_path / "final", "final")
    export_stage(run, "sft", live=False)
    export_finished_stage(run, "rl:short-docs")  # only every_stage exports after each stage
    assert sorted(p.name for p in (run.dir / "export").iterdir()) == ["sft"]
    export_final(run)
    assert sorted(p.name for p in (run.dir / "export").iterdir()) == ["rl-long-docs"]
    assert run.state["exports"] == {"rl:long-docs": "export/rl-long-docs"}
    assert _norm(run.dir / "export" / "rl-long-docs") == pytest.approx(4.0)

    # every_stage: a stage whose export is missing (a resumed run killed in between) comes from its own
    # checkpoint, as the policy holds a later stage's weights; the newest stage from the policy itself
    run = _stub_run(tmp_path / "every", "every_stage")
    export_finished_stage(run, "sft")
    written = (run.dir / "export" / "sft" / "model.safetensors").stat().st_mtime_ns
    export_finished_stage(run, "sft")  # exported already: left as it is
    assert (run.dir / "export" / "sft" / "model.safetensors").stat().st_mtime_ns == written
    export_final(run)
    assert sorted(run.state["exports"]) == ["rl:long-docs", "rl:short-docs", "sft"]
    assert [_norm(run.dir / "export" / name) for name in ("sft", "rl-short-docs", "rl-long-docs")] == [2, 3, 4]
    with torch.no_grad():
        run.model.model.norm.weight.fill_(9.0)
    run.state["exports"].pop("rl:long-docs")
    export_final(run)  # the newest stage is exported from the policy
    assert _norm(run.dir / "export" / "rl-long-docs") == 9

    # the memory agent's stage is exported from its merge, not from the expert's checkpoints
    run = _stub_run(tmp_path / "agent", "every_stage", memory_agent=True)
    export_final(run)
    assert list(run.state["exports"]) == ["rl:long-docs", "sft", "rl:short-docs", "rl:memory-agent"]
    assert [_norm(run.dir / "export" / name) for name in ("sft", "rl-short-docs", "rl-memory-agent",
                                                          "rl-long-docs")] == [2, 3, 5, 6]

    run = _stub_run(tmp_path / "none", "none")
    export_finished_stage(run, "sft")
    export_final(run)
    assert not (run.dir / "export").exists() and "exports" not in run.state


def test_export_counts_a_tied_weight_once_and_refuses_to_replace_the_run(tmp_path, capsys):
    """``qwenlong export`` from a checkpoint: the card counts the parameters as the live model does (torch.load
    gives the tied head a tensor of its own), and an ``--out`` that is, holds or lies in the run or the
    checkpoint is refused in one line before anything is written; the user's other mistakes too."""
    from qwenlong.cli import main

    run = _stub_run(tmp_path / "run", "none")
    checkpoint = run.dir / "checkpoints" / "sft-step000003"
    parameters = sum(p.numel() for p in run.model.parameters())  # the tied head once
    assert run.model.config.tie_word_embeddings
    out = tmp_path / "sft"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    assert f"({parameters / 1e6:.2f}M parameters, random init)" in (out / "README.md").read_text()

    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    refused = [(run.dir, "run folder"), (tmp_path, "run folder"), (run.dir / "checkpoints", "checkpoint"),
               (checkpoint, "checkpoint"), (checkpoint / "m", "inside the checkpoint"),
               (run.dir / "config.yaml", "file")]
    for bad, why in refused:
        capsys.readouterr()
        assert main(["export", "--run", str(run.dir), "--stage", "sft", "--out", str(bad)]) == 2, bad
        error = capsys.readouterr().err
        assert error.startswith("qwenlong export: error: --out: ") and why in error and error.count("\n") == 1
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before  # nothing touched

    # a non-empty folder qwenlong did not export (a user's files; the run's export/ of every stage) is replaced
    # only with --overwrite; an earlier export is replaced
    users, stages = tmp_path / "mine", run.dir / "export"
    (users / "other_model").mkdir(parents=True)
    (users / "notes.txt").write_text("keep me")
    (stages / "sft").mkdir(parents=True)
    (stages / "sft" / "qwenlong.json").write_text("{}")
    for folder in (users, stages):
        capsys.readouterr()
        assert main(["export", "--run", str(run.dir), "--stage", "sft", "--out", str(folder)]) == 2
        error = capsys.readouterr().err
        assert "is not empty and holds no model exported by qwenlong" in error and error.count("\n") == 1
    assert (users / "notes.txt").read_text() == "keep me" and (stages / "sft" / "qwenlong.json").is_file()
    capsys.readouterr()
    assert main(["export", "--run", str(run.dir), "--stage", "sft", "--out", str(out)]) == 0  # an earlier export
    assert "write weights" in capsys.readouterr().err  # a bar over the tensors (minutes on a 30B model)
    assert main(["export", "--run", str(run.dir), "--stage", "sft", "--out", str(out), "--no-progress"]) == 0
    assert "write weights" not in capsys.readouterr().err
    assert main(["export", "--run", str(run.dir), "--stage", "sft", "--out", str(users), "--overwrite"]) == 0
    assert not (users / "notes.txt").exists() and (users / "qwenlong.json").is_file()

    mistakes = [([], "give --run (and optionally --stage) or --checkpoint"),
                (["--run", str(tmp_path / "nowhere")], "--run: "),
                (["--run", str(run.dir), "--stage", "mid-docs"], "--stage: the run has no stage 'mid-docs'"),
                (["--checkpoint", str(run.dir)], "--checkpoint: "),
                (["--run", str(run.dir), "--max-shard-size", "0"], "--max-shard-size: "),
                (["--run", str(run.dir), "--max-shard-size", "nan"], "--max-shard-size: ")]
    for args, message in mistakes:
        capsys.readouterr()
        assert main(["export", *args, "--out", str(tmp_path / "x")]) == 2, args
        error = capsys.readouterr().err
        assert error.startswith(f"qwenlong export: error: {message}") and error.count("\n") == 1, error


# ---------------------------------------------------------------------- ZeRO-3


def _check_zero3_export(tmp: str):
    """Under ZeRO-3 no rank holds the policy whole: rank 0 gathers it one parameter at a time and writes the
    folder, which holds the weights of the whole model."""
    import torch.distributed as dist
    from test_distributed_training import _context

    from qwenlong.distributed import build_backend
    from qwenlong.export import export_model

    ctx, cfg = _context(deepspeed_stage=3)
    whole = _tiny_qwen2(tie=True)
    expected = {name: tensor.clone() for name, tensor in whole.state_dict().items()}
    backend = build_backend(whole, ctx, cfg)
    assert whole.get_output_embeddings().weight.numel() == 0  # partitioned
    out = Path(tmp) / "zero3"
    export_model(whole, _demo_tokenizer(), out, backend=backend)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)  # every rank, once rank 0 has written it
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    dist.barrier()


@pytest.mark.distributed
@pytest.mark.slow
def test_zero3_export_on_two_processes(tmp_path, free_port):
    spawn(functools.partial(_check_zero3_export, str(tmp_path)), 2, free_port, timeout_s=90, torchrun_env=True,
          preload=["transformers", "qwenlong.distributed", __name__])
