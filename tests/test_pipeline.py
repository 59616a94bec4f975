"""The tiny pipeline end to end, and a run killed with SIGKILL that resumes exactly."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
SMALL = ["sft.steps=3", "data.synthetic.num_distractor_facts=1", "sft.token_budget=2048",
         "data.synthetic.num_train=48", "data.synthetic.num_eval=4",
         "data.synthetic.min_document_tokens=64", "data.synthetic.max_document_tokens=200",
         "rl.phases.0.max_input_tokens=200", "rl.phases.1.max_input_tokens=360", "rl.phases.0.steps=1",
         "rl.phases.1.steps=1", "rl.group_size=2", "rl.gen_prompts_per_step=2", "rl.train_prompts_per_step=2",
         "rl.mini_batch_size=2", "rl.dynamic_sampling.enabled=false", "rl.overlong.enabled=false",
         "rl.phases.0.max_output_tokens=12", "rl.phases.1.max_output_tokens=12", "eval.max_output_tokens=12",
         "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_hidden_layers=1"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["QWENLONG_BACKEND"] = "torch"
    return env


def kill_once_written(command: list[str], marker: Path, timeout: float = 600) -> None:
    """Start ``command`` and SIGKILL it, with every process it started (torchrun's workers), as soon as
    ``marker`` exists (a checkpoint it writes)."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(),
                            start_new_session=True)
    deadline = time.time() + timeout
    try:
        while not marker.exists():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline
            time.sleep(0.02)
    finally:  # also when an assert fires: no run (or torchrun worker) outlives the test
        with contextlib.suppress(ProcessLookupError):  # the whole group has ended already
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def assert_killed_run_resumes_exactly(command, tmp_path: Path, kill_at: str, not_yet: str, final: str) -> Path:
    """Run ``command(out, *extra)`` to the end; run it again, SIGKILLed once checkpoint ``kill_at`` is written
    (and checkpoint ``not_yet`` is not), then with ``--resume``: both end with the same ``final/model.pt``.
    Returns the uninterrupted run's folder."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    result = subprocess.run(command(straight), capture_output=True, text=True, env=_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    kill_once_written(command(killed), killed / "checkpoints" / kill_at / "state.json")
    assert not (killed / "checkpoints" / not_yet).exists(), "killed too late"
    result = subprocess.run(command(killed, "--resume"), capture_output=True, text=True, env=_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    a, b = (torch.load(run / "checkpoints" / final / "model.pt", weights_only=True) for run in (straight, killed))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    return straight


@pytest.mark.slow
def test_tiny_pipeline_runs_end_to_end(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "qwenlong", "pipeline", "--config", TINY, *SMALL,
                             f"output.dir={out}"], capture_output=True, text=True, env=_env(), timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    state = json.loads((out / "pipeline.json").read_text())
    assert set(state["evals"]) == {"untrained", "after-sft", "after-short-docs", "after-long-docs"}
    assert {"sft", "rl:short-docs", "rl:long-docs"} <= set(state["done"])
    assert "long-docs" in state["carried"]  # retrospective sampling decided on every earlier example
    report = (out / "report.md").read_text()
    assert "Held-out accuracy" in report and "after-long-docs" in report and "Gains between stages" in report
    assert "Accuracy by input length" in report
    gains = json.loads((out / "gains.json").read_text())
    assert [(g["from"], g["to"]) for g in gains] == [
        ("untrained", "after-sft"), ("after-sft", "after-short-docs"), ("after-short-docs", "after-long-docs"),
        ("after-sft", "after-long-docs")]
    answers = json.loads((out / "pipeline.json").read_text())["evals"]["after-sft"]["benchmarks"][0]
    for gain in gains:  # each is the paired difference of the per-item scores the evaluations wrote
        before, after = ([json.loads(line) for line in
                          (out / "eval" / label / "predictions.jsonl").read_text().splitlines()]
                         for label in (gain["from"], gain["to"]))
        assert len(before) == len(after) == 4 * answers["samples_per_item"]
        assert gain["num_items"] == 4
        change = sum(a["accurate"] for a in after) - sum(b["accurate"] for b in before)
        assert gain["gain"] == pytest.approx(100 * change / len(before))
        assert gain["ci_low"] <= gain["gain"] <= gain["ci_high"] and 0 < gain["p_value"] <= 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"sft", "rl/short-docs", "rl/long-docs", "eval"} <= {row["stage"] for row in rows}
    for row in (row for row in rows if row["stage"].startswith("rl/")):  # the time split of each RL step
        times = {key: row[key] for key in ("time_generate", "time_score", "time_score_wait", "time_train")}
        assert all(seconds >= 0 for seconds in times.values()) and times["time_generate"] > 0, times
        assert row["time_rollout"] >= times["time_generate"] + times["time_score_wait"], row
    phase_rows = [line for line in report.splitlines() if line.startswith("| short-docs |")]
    generate = sum(row["time_generate"] for row in rows if row["stage"] == "rl/short-docs")
    assert len(phase_rows) == 1 and phase_rows[0].split(" | ")[5] == f"{generate:.1f}", phase_rows
    # a second run into the same folder must not overwrite it silently
    again = subprocess.run([sys.executable, "-m", "qwenlong", "sft", "--config", TINY, *SMALL, f"output.dir={out}"],
                           capture_output=True, text=True, env=_env(), timeout=300)
    assert again.returncode != 0 and "already holds a run" in again.stderr


@pytest.mark.slow
def test_sft_killed_and_resumed_matches_uninterrupted(tmp_path):
    args = [*SMALL, "sft.steps=8", "output.save_every_steps=2", "eval.enabled=false"]

    def sft(out, *extra):
        return [sys.executable, "-m", "qwenlong", "sft", "--config", TINY, *args, *extra, f"output.dir={out}"]

    assert_killed_run_resumes_exactly(sft, tmp_path, "sft-step000004", "sft-step000008", "sft-step000008")


def test_sft_teacher_accuracy_falls_linearly_with_document_length():
    from qwenlong.config import load_config
    from qwenlong.data import reference_response
    from qwenlong.pipeline import build

    cfg = load_config(TINY, ["data.synthetic.num_train=600", "data.synthetic.min_document_tokens=64",
                             "data.synthetic.max_document_tokens=264", "data.synthetic.teacher_accuracy=0.0",
                             "data.synthetic.teacher_accuracy_shortest=1.0"])
    records = build.synthetic_records(cfg, "train")  # lengths in words without a tokenizer: the span is a guide
    respond = build.sft_teacher(cfg)
    position = [(r.metadata["document_tokens"] - 64) / 200 for r in records]
    right = [respond(r) == reference_response(r) for r in records]
    for low, high, expected in [(-1, 0.15, 0.925), (0.4, 0.6, 0.5), (0.85, 2, 0.075)]:
        picked = [ok for ok, p in zip(right, position, strict=True) if low <= p < high]
        assert len(picked) > 40 and abs(sum(picked) / len(picked) - expected) < 0.2, (low, high)
    assert all(ok for ok, p in zip(right, position, strict=True) if p <= 0)  # accuracy 1 at the shortest
    assert not any(ok for ok, p in zip(right, position, strict=True) if p >= 1)  # and 0 at the longest
    constant = build.sft_teacher(load_config(TINY, ["data.synthetic.teacher_accuracy=1.0"]))
    assert all(constant(r) == reference_response(r) for r in records[:50])


def test_tiny_model_on_training_files_takes_its_tokenizer_and_sft_traces_from_them(tmp_path):
    """model.tiny with data.train_files and no data.tokenizer: the demo tokenizer learns the files' text and SFT
    trains on the files' own responses, whether or not a synthetic section is there too (for the eval split)."""
    from qwenlong.config import load_config
    from qwenlong.data import reference_response, write_jsonl
    from qwenlong.pipeline import build

    records = build.synthetic_records(load_config(TINY, ["data.synthetic.task=arithmetic"]), "train")[:60]
    write_jsonl(records, tmp_path / "train.jsonl")
    for synthetic in ([], ["data.synthetic=null"]):
        cfg = load_config(TINY, [*synthetic, f"data.train_files=[{tmp_path / 'train.jsonl'}]", "sft.max_seq_len=4096",
                                 "sft.token_budget=4096",
                                 "data.synthetic.teacher_accuracy=0.0" if not synthetic else "seed=0"])
        tokenizer = build.build_tokenizer(cfg, tmp_path / f"out{len(synthetic)}")
        text = reference_response(records[0])
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
        respond = build.sft_teacher(cfg)
        assert [respond(r) for r in records] == [reference_response(r) for r in records]
        assert len(build.sft_training_examples(cfg, tokenizer)) == len(records)


def test_phase_seconds_count_a_resumed_step_once_and_mark_what_was_not_logged():
    from qwenlong.pipeline.report import phase_seconds

    rows = [{"step": 1, "time_generate": 2.0, "time_train": 1.0}, {"step": 2, "time_generate": 5.0, "time_train": 1.5},
            {"step": 2, "time_generate": 3.0, "time_train": 0.5},  # step 2 again, after a resume
            {"step": 3, "time_generate": 4.0, "time_train": 2.0}]
    assert phase_seconds(rows, ("time_generate", "time_train", "time_score")) == {
        "time_generate": 9.0, "time_train": 3.5, "time_score": None}
    assert phase_seconds([], ("time_generate",)) == {"time_generate": None}


def test_length_table_splits_items_into_equal_thirds_by_input_length(tmp_path):
    import random

    from qwenlong.pipeline.report import length_table

    rng = random.Random()
    items = [(f"id{i}", rng.randint(50, 500)) for i in range(30)]
    truth = {}
    for label in ("before", "after"):
        rows = []
        for item, tokens in items:
            for sample in range(2):
                truth[label, item, sample] = rng.random() < 0.5
                rows.append({"benchmark": "b", "id": item, "sample": sample, "input_tokens": tokens,
                             "accurate": truth[label, item, sample]})
        (tmp_path / "eval" / label).mkdir(parents=True)
        (tmp_path / "eval" / label / "predictions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    header, _, *body = length_table(tmp_path, ["before", "after"])
    ordered = sorted(items, key=lambda x: (x[1], ("b", x[0])))
    thirds = [ordered[:10], ordered[10:20], ordered[20:]]
    assert header.count("(10 items)") == 3 and f"{thirds[0][0][1]}-{thirds[0][-1][1]} tokens" in header
    for label, row in zip(("before", "after"), body, strict=True):
        expected = [100 * sum(truth[label, i, s] for i, _ in third for s in range(2)) / 20 for third in thirds]
        assert row == f"| {label} | " + " | ".join(f"{e:.1f}" for e in expected) + " |"


def test_rl_curves_follow_each_phase_from_the_last_step_of_the_one_before():
    """Rows logged every 5 steps (output.log_every_steps=5, the phase's last step flushed): the second phase
    starts after the first one's last step, not after as many steps as it has rows."""
    from qwenlong.pipeline.report import phase_curves

    rows = [{"stage": "rl/short", "step": s, "reward_mean": s / 10} for s in (5, 10, 12)]
    rows += [{"stage": "rl/long", "step": 5, "reward_mean": 0.5}, {"stage": "rl/long", "step": 8}]  # no reward
    rows += [{"stage": "rl/long", "step": 10, "reward_mean": 0.7}]
    assert phase_curves(rows, ["short", "long", "never-ran"], "reward_mean") == [
        ("short", [5, 10, 12], [0.5, 1.0, 1.2]), ("long", [17, 22], [0.5, 0.7]), ("never-ran", [], [])]


def _report_run(tmp_path: Path, overrides: list[str]):
    """What ``write_report`` reads of a ``Run``: the config, a metrics log, a record with two evaluations."""
    from types import SimpleNamespace

    from qwenlong.config import load_config
    from qwenlong.eval import EvalReport
    from qwenlong.trainers.metrics_log import MetricsLogger

    cfg = load_config(TINY, [*overrides, f"output.dir={tmp_path}"])
    logger = MetricsLogger(tmp_path)
    if cfg.sft.enabled:
        for step in (1, 2):
            logger.log("sft", step, {"loss": 3.0 / step})
    for phase in cfg.rl.phases:
        for step in (1, 2):
            logger.log(f"rl/{phase.name}", step, {"reward_mean": 0.5, "accuracy": 0.5, "response_tokens_mean": 9.0})
    evals = {}
    for label, accurate in (("untrained", [False, False, True]), ("after-long-docs", [True, False, True])):
        rows = [{"benchmark": "b", "id": f"id{i}", "sample": 0, "input_tokens": 10 + i, "accurate": a}
                for i, a in enumerate(accurate)]
        EvalReport(benchmarks=[], predictions=rows).write(tmp_path / "eval" / label)
        evals[label] = {"average": 100.0 * sum(accurate) / 3}
    return SimpleNamespace(cfg=cfg, dir=tmp_path, logger=logger, state={"evals": evals, "carried": {}})


def test_report_links_only_the_images_it_wrote_and_writes_its_files_atomically(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import qwenlong.state.checkpoint
    from qwenlong.pipeline.report import write_report

    renamed = []
    replace = os.replace

    def recording_replace(src, dst):
        renamed.append(Path(dst).name)
        replace(src, dst)

    monkeypatch.setattr(qwenlong.state.checkpoint.os, "replace", recording_replace)
    run = _report_run(tmp_path / "no-sft", ["sft.enabled=false"])
    report = write_report(run).read_text()
    assert "![RL curves](curves.png)" in report and (run.dir / "curves.png").is_file()
    assert "sft_loss.png" not in report and not (run.dir / "sft_loss.png").exists()
    # each written beside and renamed into place (an evaluation's files too)
    assert {"gains.json", "report.md", "predictions.jsonl"} <= set(renamed)
    assert json.loads((run.dir / "gains.json").read_text())[0]["improved"] == 1

    run = _report_run(tmp_path / "sft", [])
    report = write_report(run).read_text()
    assert "![SFT loss](sft_loss.png)" in report and (run.dir / "sft_loss.png").is_file()


def test_sft_probe_reads_the_answer_word_where_the_trace_writes_it(tmp_path):
    """tools/sft_probe.py: the probe positions hold the answer word (quote, then final answer), and a short
    SFT run logs fractions of the probed items."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from sft_probe import answer_positions
    finally:
        sys.path.remove(str(ROOT / "tools"))
    from transformers import AutoTokenizer

    from qwenlong.config import load_config
    from qwenlong.pipeline import build

    out = tmp_path / "probe"
    subprocess.run([sys.executable, str(ROOT / "tools" / "sft_probe.py"), "--out", str(out), "--every", "1",
                    "--items", "3", *SMALL, "sft.steps=2"], check=True, env=_env(), cwd=ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lines = [json.loads(line) for line in (out / "probe.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    assert all(line["quote"] in (0, 1 / 3, 2 / 3, 1) and line["answer"] in (0, 1 / 3, 2 / 3, 1) for line in lines)
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    records = build.load_split(load_config(TINY, SMALL), "eval", tokenizer)
    for record, (ids, positions, answer) in zip(records, answer_positions(tokenizer, records), strict=True):
        assert len(positions) == 2 and all(ids[p] == answer for p in positions)
        assert tokenizer.decode([answer]).strip() == record.answer
        assert positions[0] > len(build.prompt_ids(tokenizer, record))


def test_report_reads_predictions_whose_responses_hold_line_separators(tmp_path):
    """An untrained model's answers can hold any character: U+2028 and NEL, which str.splitlines() breaks at."""
    from qwenlong.eval import EvalReport
    from qwenlong.pipeline.report import length_table

    odd = ["a\u2028b", "c\x85d", "e\u2029f\x1cg", "plain"]
    for label in ("before", "after"):
        rows = [{"benchmark": "b", "id": f"id{i}", "sample": 0, "input_tokens": 10 + i, "accurate": label == "after",
                 "response": text} for i, text in enumerate(odd)]
        EvalReport(benchmarks=[], predictions=rows).write(tmp_path / "eval" / label)
    header, _, before, after = length_table(tmp_path, ["before", "after"])
    assert before == "| before | 0.0 | 0.0 | 0.0 |" and after == "| after | 100.0 | 100.0 | 100.0 |"


@pytest.mark.parametrize("min_input_tokens", [None, 0, 150])
def test_min_input_tokens_decides_a_phase_own_prompts(tmp_path, monkeypatch, min_input_tokens):
    """``rl.phases.N.min_input_tokens`` picks the prompts a phase trains on: by default those past the phase
    before's budget (the earlier ones can only be carried back), with 0 every prompt up to its budget (then
    there is nothing left to carry), in between from there up. Checked against the prompts' lengths."""
    from qwenlong.config import load_config
    from qwenlong.pipeline import build
    from qwenlong.pipeline.report import write_report
    from qwenlong.pipeline.run import Run, _rl
    from qwenlong.trainers import GRPOTrainer

    overrides = [*SMALL, "sft.enabled=false", "eval.enabled=false", "output.export=none", f"output.dir={tmp_path}"]
    if min_input_tokens is not None:
        overrides.append(f"rl.phases.1.min_input_tokens={min_input_tokens}")
    run = Run(load_config(TINY, overrides))
    trained: dict[str, list[str]] = {}
    monkeypatch.setattr(GRPOTrainer, "train_phase", lambda self, phase, examples, **kw: trained.update(
        {phase.name: [e.id for e in examples]}))
    _rl(run)

    lengths = {e.id: len(e.prompt_ids) for e in build.rl_examples(run.tokenizer, build.load_split(run.cfg, "train",
                                                                                                   run.tokenizer))}
    floor = 201 if min_input_tokens is None else min_input_tokens
    first = {i for i, n in lengths.items() if n <= 200}
    second = {i for i, n in lengths.items() if floor <= n <= 360}
    assert first and second - first and (min_input_tokens is None) == (not first & second)
    assert set(trained["short-docs"]) == first and set(trained["long-docs"]) == second
    decisions = run.state["carried"]["long-docs"]["decisions"]  # what retrospective sampling weighed
    assert {d["example_id"] for d in decisions} == first - second
    assert run.state["phase_data"]["long-docs"] == {"min_input_tokens": floor, "own": len(second)}
    report = write_report(run).read_text()
    assert f"| long-docs | {len(second)} ({floor}-360) |" in report
    if min_input_tokens == 0:
        assert "Retrospective sampling into long-docs: no candidates" in report


def test_resume_keeps_the_retrospective_selection_a_finished_phase_trained_on(tmp_path, monkeypatch):
    """A resumed run passes over its finished phases without choosing their carried prompts again: the reward
    history has grown since (here the second phase solved every earlier prompt half the time, which would now
    weigh them for carrying), and the record must keep what was trained on."""
    from qwenlong.config import load_config
    from qwenlong.pipeline import build
    from qwenlong.pipeline.run import Run, _rl
    from qwenlong.trainers import GRPOTrainer

    overrides = [*SMALL, "sft.enabled=false", "eval.enabled=false", "output.export=none", f"output.dir={tmp_path}"]
    run = Run(load_config(TINY, overrides))
    examples = build.rl_examples(run.tokenizer, build.load_split(run.cfg, "train", run.tokenizer))
    short = [e.id for e in examples if len(e.prompt_ids) <= 200]

    def train_phase(self, phase, examples, **kwargs):
        if phase.name == "long-docs":  # rollouts of every earlier prompt, half of them right
            for example_id in short:
                self.history.record(example_id, [1.0, 0.0], [5, 5], phase=phase.name)
        return []

    monkeypatch.setattr(GRPOTrainer, "train_phase", train_phase)
    _rl(run)
    recorded = run.state["carried"]["long-docs"]
    assert short and all(d["mean_reward"] is None for d in recorded["decisions"])  # no rollouts when it started
    resumed = Run(load_config(TINY, overrides), resume=True)
    _rl(resumed)
    assert resumed.state["carried"]["long-docs"] == recorded


def test_a_run_resumed_between_two_phases_starts_the_next_in_the_aepo_mode_the_last_ended_in(tmp_path, monkeypatch):
    """AEPO's mode goes on from one phase into the next. A run killed after a phase finished, before the next one
    saved a checkpoint, has no checkpoint of that phase to read the mode from: the run's state must bring it."""
    from qwenlong.config import load_config
    from qwenlong.pipeline.run import Run, _rl
    from qwenlong.trainers import GRPOTrainer

    overrides = [*SMALL, "sft.enabled=false", "eval.enabled=false", "output.export=none", f"output.dir={tmp_path}"]
    started_in: dict[str, str] = {}

    class Killed(Exception):
        pass

    def train_phase(self, phase, examples, kill_in=None, **kwargs):
        started_in[phase.name] = self.aepo_mode
        if phase.name == "short-docs":
            self.aepo_mode = "positive-only"  # the first phase's entropy ended above the band
        if phase.name == kill_in:
            raise Killed
        return []

    monkeypatch.setattr(GRPOTrainer, "train_phase", train_phase)
    _rl(Run(load_config(TINY, overrides)))
    assert started_in == {"short-docs": "all", "long-docs": "positive-only"}  # uninterrupted

    started_in.clear()
    killed = tmp_path / "killed"
    overrides[-1] = f"output.dir={killed}"
    monkeypatch.setattr(GRPOTrainer, "train_phase", lambda *a, **kw: train_phase(*a, kill_in="long-docs", **kw))
    with pytest.raises(Killed):
        _rl(Run(load_config(TINY, overrides)))
    monkeypatch.setattr(GRPOTrainer, "train_phase", train_phase)
    started_in.clear()
    _rl(Run(load_config(TINY, overrides), resume=True))
    assert started_in == {"long-docs": "positive-only"}  # the finished phase is passed over


def test_a_phase_naming_data_the_run_lacks_is_refused_before_any_stage(tmp_path, monkeypatch):
    """A misspelt ``rl.phases.N.data`` source stops the run before evaluation and SFT (it used to fail when the
    phase started, after the stages before it had run, saying the phase had no prompt in its range)."""
    from qwenlong.config import ConfigError, load_config
    from qwenlong.pipeline import run as pipeline

    monkeypatch.setattr(pipeline, "_sft", lambda run: pytest.fail("SFT ran"))
    overrides = [*SMALL, "eval.enabled=false", "output.export=none", f"output.dir={tmp_path / 'a'}",
                 "rl.phases.1.data=[synthetic_copy, synthetic_cpy]"]
    with pytest.raises(ConfigError, match=r"^rl\.phases\.1\.data: no training data from \['synthetic_cpy'\]; "
                                          r"the training data's sources are \['synthetic_copy'\]"):
        pipeline.run_pipeline(load_config(TINY, overrides))
    # the right name passes the check (and reaches SFT)
    overrides[-2:] = [f"output.dir={tmp_path / 'b'}", "rl.phases.1.data=[synthetic_copy]"]
    with pytest.raises(pytest.fail.Exception, match="SFT ran"):
        pipeline.run_pipeline(load_config(TINY, overrides))


def test_records_sharing_an_id_are_refused_by_name(tmp_path):
    """Reward history, retrospective carrying and evaluation results are kept by id: two verl files whose
    ``extra_info.index`` both start at 0 gave records that shared a history (and one hid the other when carried).
    They are refused naming the id and both files; the same rows with their own ids load."""
    from qwenlong.config import load_config
    from qwenlong.data import DataError
    from qwenlong.pipeline import build

    def verl_file(name: str, ids: list) -> Path:
        rows = [{"prompt": [{"role": "user", "content": f"Q{i}?"}], "data_source": "docmath",
                 "reward_model": {"ground_truth": "4"}, "extra_info": {"index": k, **({} if i is None else {"id": i})}}
                for k, i in enumerate(ids)]
        path = tmp_path / name
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return path

    for files, error in [
        ([verl_file("a.jsonl", [None, None]), verl_file("b.jsonl", [None])],
         r"id '0' is in .*a\.jsonl and in .*b\.jsonl"),
        ([verl_file("c.jsonl", ["x", "y", "x"])], r"id 'x' is in .*c\.jsonl and in .*c\.jsonl"),
    ]:
        for split in ("train", "eval"):
            cfg = load_config(TINY, [f"data.{split}_files=[{','.join(map(str, files))}]"])
            with pytest.raises(DataError, match=rf"data\.{split}_files: {error}"):
                build.load_split(cfg, split)
    cfg = load_config(TINY, [f"data.train_files=[{verl_file('d.jsonl', ['p', 'q'])},{verl_file('e.jsonl', ['r'])}]"])
    assert [r.id for r in build.load_split(cfg, "train")] == ["p", "q", "r"]


def test_training_data_whose_gold_the_reward_cannot_score_is_refused_when_it_loads(tmp_path):
    """A multiple-choice gold given as the option's text loaded, then the choice rule raised at the run's first
    reward: the pipeline loads its files with the reward's check, so it is a row error naming file and line."""
    from qwenlong.config import load_config
    from qwenlong.data import DataError
    from qwenlong.pipeline import build

    rows = [{"question": "Which?", "choices": ["red", "blue"], "answer": answer, "document": "d",
             "data_source": "long_toc_choices"} for answer in ("B", "blue")]
    path = tmp_path / "choices.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = load_config(TINY, [f"data.train_files=[{path}]"])
    with pytest.raises(DataError, match=r"choices\.jsonl: line 2: answer: a multiple-choice gold answer must be a "
                                        r"letter, got 'blue'"):
        build.load_split(cfg, "train")


def test_a_run_killed_between_a_phase_and_its_evaluation_evaluates_it_on_resume(tmp_path, monkeypatch):
    """The evaluation after a phase follows the phase's record: a run killed after the phase finished, before its
    evaluation did, passed over the finished phase on resume and never evaluated it (the report lacked it)."""
    from qwenlong.config import load_config
    from qwenlong.pipeline.run import Run, _rl
    from qwenlong.trainers import GRPOTrainer

    overrides = [*SMALL, "sft.enabled=false", "eval.enabled=true", "output.export=none", f"output.dir={tmp_path}"]

    class Killed(Exception):
        pass

    evaluated: list[tuple[str, str]] = []  # (label, phase the policy last trained in)
    trained_in = {"last": None}

    def train_phase(self, phase, examples, **kwargs):
        trained_in["last"] = phase.name
        return []

    def evaluate(self, label, kill_at=None):
        if self.done(f"eval:{label}"):
            return 0.0
        if label == kill_at:
            raise Killed
        evaluated.append((label, trained_in["last"]))
        self.state["evals"][label] = {"average": 0.0}
        self.finish(f"eval:{label}")
        return 0.0

    monkeypatch.setattr(GRPOTrainer, "train_phase", train_phase)
    monkeypatch.setattr(Run, "evaluate", lambda self, label: evaluate(self, label, kill_at="after-short-docs"))
    with pytest.raises(Killed):
        _rl(Run(load_config(TINY, overrides)))
    assert Run(load_config(TINY, overrides), resume=True).done("rl:short-docs")  # the phase's record was written

    monkeypatch.setattr(Run, "evaluate", evaluate)
    trained_in["last"] = "short-docs"  # the resumed run holds the finished phase's weights
    _rl(Run(load_config(TINY, overrides), resume=True))
    assert evaluated == [("after-short-docs", "short-docs"), ("after-long-docs", "long-docs")]


def test_resuming_a_phase_with_other_prompts_than_its_checkpoint_trained_on_is_refused(tmp_path, monkeypatch):
    """A phase's checkpoint holds its prompt sampler's place in the phase's prompt list. A run resumed mid-phase with
    settings that change that list (its input budget here) went on silently, the sampler walking a different list
    (other prompts, a broken epoch); it is refused. Resumed with the same settings, the phase goes on."""
    from qwenlong.config import ConfigError, load_config
    from qwenlong.pipeline.run import Run, _rl
    from qwenlong.state.checkpoint import save_checkpoint
    from qwenlong.trainers import GRPOTrainer

    overrides = [*SMALL, "sft.enabled=false", "eval.enabled=false", "output.export=none", f"output.dir={tmp_path}"]

    class Killed(Exception):
        pass

    trained: list[tuple[str, int]] = []

    def killed_after_a_checkpoint(self, phase, examples, extra_state=None, **kwargs):
        save_checkpoint(self.output_dir / "checkpoints" / f"rl-{phase.name}-step000001", model=self.model,
                        state={"stage": "rl", "phase": phase.name, "step": 1, **(extra_state or {})})
        raise Killed

    monkeypatch.setattr(GRPOTrainer, "train_phase", killed_after_a_checkpoint)
    with pytest.raises(Killed):
        _rl(Run(load_config(TINY, overrides)))
    monkeypatch.setattr(GRPOTrainer, "train_phase", lambda self, phase, examples, **kw: trained.append(
        (phase.name, len(examples))) or [])
    with pytest.raises(ConfigError, match=r"^--resume: phase short-docs: its prompts .*differ"):
        _rl(Run(load_config(TINY, [*overrides, "rl.phases.0.max_input_tokens=150"]), resume=True))
    assert trained == []
    _rl(Run(load_config(TINY, overrides), resume=True))
    assert [name for name, _ in trained] == ["short-docs", "long-docs"]


def test_a_pipeline_resumed_after_the_sft_command_labels_evaluations_by_the_policy_they_score(tmp_path, monkeypatch):
    """``qwenlong sft`` then ``qwenlong pipeline --resume`` on its folder: the pipeline's evaluation before training
    scored the SFT policy (loaded as the last finished stage) and recorded it as ``untrained``."""
    from qwenlong.config import load_config
    from qwenlong.pipeline import run as pipeline

    monkeypatch.setenv("QWENLONG_BACKEND", "torch")
    overrides = [*SMALL, "sft.steps=1", "output.export=none", "output.tensorboard=false", f"output.dir={tmp_path}"]
    pipeline.run_sft(load_config(TINY, [*overrides, "eval.enabled=false"]))
    sft = torch.load(tmp_path / "checkpoints" / "sft-step000001" / "model.pt", weights_only=True)
    evaluated: dict[str, bool] = {}  # label -> whether the policy held the SFT weights

    def evaluate(self, label):
        evaluated[label] = all(torch.equal(v, sft[k]) for k, v in self.model.state_dict().items())
        return 0.0

    monkeypatch.setattr(pipeline.Run, "evaluate", evaluate)
    monkeypatch.setattr(pipeline, "_rl", lambda run: None)
    import qwenlong.pipeline.report as report

    monkeypatch.setattr(report, "write_report", lambda run: None)
    pipeline.run_pipeline(load_config(TINY, overrides), resume=True)
    assert evaluated == {"after-sft": True}


def test_evaluating_without_held_out_data_is_refused_before_any_stage(tmp_path, monkeypatch):
    """Training files, no ``data.eval_files`` and no synthetic section, evaluation on: the pipeline raised at its first
    evaluation (here after SFT: nothing is evaluated before training), and ``qwenlong rl`` after its first phase."""
    from qwenlong.config import ConfigError, load_config
    from qwenlong.data import write_jsonl
    from qwenlong.pipeline import build
    from qwenlong.pipeline import run as pipeline

    write_jsonl(build.synthetic_records(load_config(TINY, SMALL), "train"), tmp_path / "train.jsonl")
    monkeypatch.setattr(pipeline, "_sft", lambda run: pytest.fail("SFT ran"))
    monkeypatch.setattr(pipeline, "_rl", lambda run: pytest.fail("RL ran"))
    overrides = [*SMALL, "data.synthetic=null", f"data.train_files=[{tmp_path / 'train.jsonl'}]",
                 "eval.before_training=false", "output.export=none"]
    for command, where in ((pipeline.run_pipeline, "a"), (pipeline.run_rl, "b")):
        with pytest.raises(ConfigError, match=r"^data\.eval_files: evaluation is enabled but there is no held-out "
                                              r"data .*eval\.enabled: false"):
            command(load_config(TINY, [*overrides, f"output.dir={tmp_path / where}"]))
    # without evaluation the stages run
    with pytest.raises(pytest.fail.Exception, match="SFT ran"):
        pipeline.run_pipeline(load_config(TINY, [*overrides, "eval.enabled=false", f"output.dir={tmp_path / 'c'}"]))


def test_qwenlong_rl_refuses_a_phase_naming_data_the_run_lacks_before_training(tmp_path, monkeypatch):
    """``qwenlong rl`` checks ``rl.phases.N.data`` as the pipeline does: it trained the phases before the misspelt one
    and failed when that one started, saying it had no prompt in its range."""
    from qwenlong.config import ConfigError, load_config
    from qwenlong.pipeline import run as pipeline

    monkeypatch.setattr(pipeline, "_rl", lambda run: pytest.fail("RL ran"))
    overrides = [*SMALL, "eval.enabled=false", "output.export=none", "rl.phases.1.data=[synthetic_cpy]"]
    with pytest.raises(ConfigError, match=r"^rl\.phases\.1\.data: no training data from \['synthetic_cpy'\]"):
        pipeline.run_rl(load_config(TINY, [*overrides, f"output.dir={tmp_path / 'a'}"]))
    overrides[-1] = "rl.phases.1.data=[synthetic_copy]"
    with pytest.raises(pytest.fail.Exception, match="RL ran"):
        pipeline.run_rl(load_config(TINY, [*overrides, f"output.dir={tmp_path / 'b'}"]))
