"""``--resume`` never skips or corrupts work: whole-name checkpoint series, damaged newest checkpoints
passed over, atomic JSON records, ``weights_only`` loading, run identity, moved run folders."""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings

import numpy as np
import pytest
import torch
from test_pipeline import SMALL, TINY

from qwenlong.config import ConfigError, config_to_dict, load_config
from qwenlong.pipeline.resume import identity_changes, open_run_record, recorded_checkpoint, stored_checkpoint
from qwenlong.state.checkpoint import (
    TRAINER_FILE,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    read_json,
    save_checkpoint,
    write_json,
)
from qwenlong.state.optim import build_optimizer, build_scheduler


def trained(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = build_optimizer(model, 1e-2, 0.1)
    scheduler = build_scheduler(optimizer, 10, 2, "cosine")
    model(torch.randn(5, 4)).square().sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def save(directory, name, seed, step):
    model, optimizer, scheduler = trained(seed)
    path = save_checkpoint(directory / name, model=model, optimizer=optimizer, scheduler=scheduler,
                           state={"step": step})
    os.utime(path / "state.json", ns=(step * 10**9, step * 10**9))  # write order = step order
    return path, model


def test_a_phase_never_matches_another_whose_name_it_starts(tmp_path):
    save(tmp_path, "rl-long-docs-step000002", 0, 2)
    save(tmp_path, "rl-long-docs-warm-step000001", 1, 3)  # newer, of phase "long-docs-warm"
    assert latest_checkpoint(tmp_path, prefix="rl-long-docs-") == tmp_path / "rl-long-docs-step000002"
    assert latest_checkpoint(tmp_path, prefix="rl-long-docs-warm-") == tmp_path / "rl-long-docs-warm-step000001"
    assert latest_checkpoint(tmp_path, prefix="rl-long-") is None


@pytest.mark.parametrize("damage", ["model.pt", TRAINER_FILE, "state.json"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, damage):
    older, model = save(tmp_path, "sft-step000002", 0, 2)
    newest, _ = save(tmp_path, "sft-step000004", 1, 4)
    file = newest / damage
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])  # a full disk cut it short
    with pytest.warns(UserWarning, match=rf"sft-step000004 is damaged.*{damage}"):
        assert latest_checkpoint(tmp_path, prefix="sft-") == older
    fresh = torch.nn.Linear(4, 3)
    assert load_checkpoint(older, model=fresh)["step"] == 2
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(),
                                                  strict=True))
    if damage != "state.json":  # the damaged file itself is reported by path when read directly
        with pytest.raises(CheckpointError, match=rf"{file}: cannot be read"):
            load_checkpoint(newest, model=torch.nn.Linear(4, 3))
    with warnings.catch_warnings(record=True):
        file.unlink()
        shutil.rmtree(older)
        assert latest_checkpoint(tmp_path, prefix="sft-") is None


def test_trainer_state_loads_weights_only_and_restores_every_generator(tmp_path):
    path, _ = save(tmp_path, "sft-step000001", 0, 1)
    trainer = torch.load(path / TRAINER_FILE, weights_only=True)  # no pickled code objects in it
    assert set(trainer) == {"optimizer", "scheduler", "rng"}
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    path = save_checkpoint(tmp_path / "sft-step000002", model=torch.nn.Linear(2, 2), state={"step": 2})
    expected = (random.random(), np.random.standard_normal(3), torch.rand(3))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    load_checkpoint(path, model=None)
    got = (random.random(), np.random.standard_normal(3), torch.rand(3))
    assert got[0] == expected[0] and np.array_equal(got[1], expected[1]) and torch.equal(got[2], expected[2])


def test_json_records_are_written_atomically_and_a_corrupt_one_is_named(tmp_path, monkeypatch):
    path = tmp_path / "pipeline.json"
    write_json(path, {"done": ["sft"]})

    def killed(src, dst):
        raise KeyboardInterrupt  # the process dies between writing the new file and renaming it

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_json(path, {"done": ["sft", "rl:short"] * 1000})
    monkeypatch.undo()
    assert read_json(path) == {"done": ["sft"]}  # the old record, whole
    assert [p.name for p in tmp_path.iterdir()] == ["pipeline.json"]  # and no temporary file left behind
    path.write_text('{"done": ["sft", "rl')
    with pytest.raises(CheckpointError, match=rf"{path}: corrupt JSON"):
        read_json(path)


def test_resume_refuses_identity_changes_and_missing_folders(tmp_path):
    from qwenlong.config import save_config

    cfg = load_config(TINY, [f"output.dir={tmp_path}"])
    save_config(cfg, tmp_path / "config.yaml")
    write_json(tmp_path / "pipeline.json", {"done": ["sft"], "evals": {}, "carried": {}})
    # what the run learns from is fixed; how it is run and logged may change
    same = load_config(TINY, [f"output.dir={tmp_path}", "output.save_every_steps=7", "model.attention=sdpa"])
    said = []
    assert open_run_record(same, tmp_path, resume=True, say=said.append)["done"] == ["sft"]
    # the settings that differ are named (they apply from the resumed point on); none: nothing is said
    assert said == ["--resume: settings that differ from the run's apply from here on: model.attention: "
                    f"{cfg.model.attention!r} -> 'sdpa'; output.save_every_steps: {cfg.output.save_every_steps} -> 7"]
    said.clear()
    open_run_record(cfg, tmp_path, resume=True, say=said.append)
    assert said == []
    other = load_config(TINY, [f"output.dir={tmp_path}", "seed=5", "data.synthetic.num_train=9",
                               "model.tiny.hidden_size=32"])
    with pytest.raises(ConfigError, match=r"--resume: .*seed: 0 -> 5; model.tiny.hidden_size: \d+ -> 32; "
                                          r"data.synthetic.num_train: \d+ -> 9\)"):
        open_run_record(other, tmp_path, resume=True)
    assert identity_changes(config_to_dict(cfg), same) == []
    with pytest.raises(ConfigError, match=r"output.dir: .*nowhere does not exist"):
        open_run_record(cfg, tmp_path / "nowhere", resume=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"holds no run"):
        open_run_record(cfg, tmp_path / "empty", resume=True)
    (tmp_path / "pipeline.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"pipeline.json: corrupt JSON"):
        open_run_record(cfg, tmp_path, resume=True)


def test_a_new_run_into_a_folder_holding_one_is_refused_in_one_line(tmp_path, capsys):
    from qwenlong.cli import main

    write_json(tmp_path / "pipeline.json", {"done": ["sft"], "evals": {}, "carried": {}})
    cfg = load_config(TINY, [f"output.dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"output.dir: .* already holds a run; pass --resume"):
        open_run_record(cfg, tmp_path, resume=False)
    assert main(["sft", "--config", TINY, "--no-plan-check", f"output.dir={tmp_path}"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("qwenlong sft: error: output.dir: ") and error.count("\n") == 1, error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline.json"]  # nothing written


def test_config_and_eval_files_are_replaced_whole(tmp_path, monkeypatch):
    """The run's config (saved again on --resume) and an evaluation's files (the report reads its
    predictions back): a process killed mid-write leaves the old file whole and no temporary file."""
    from qwenlong.config import save_config
    from qwenlong.eval import EvalReport

    cfg = load_config(TINY, [f"output.dir={tmp_path}"])
    save_config(cfg, tmp_path / "config.yaml")
    old_report = EvalReport(benchmarks=[], predictions=[{"id": "a", "accurate": True}])
    old_report.write(tmp_path / "eval")
    saved = {p.name: p.read_text() for p in [tmp_path / "config.yaml", *(tmp_path / "eval").iterdir()]}

    def killed(src, dst):
        raise KeyboardInterrupt  # the process dies between writing the new file and renaming it

    monkeypatch.setattr(os, "replace", killed)
    other = load_config(TINY, [f"output.dir={tmp_path}", "output.save_every_steps=7"])
    with pytest.raises(KeyboardInterrupt):
        save_config(other, tmp_path / "config.yaml")
    with pytest.raises(KeyboardInterrupt):
        EvalReport(benchmarks=[], predictions=[{"id": str(i), "accurate": False} for i in range(1000)]).write(
            tmp_path / "eval")
    monkeypatch.undo()
    assert {p.name: p.read_text() for p in [tmp_path / "config.yaml", *(tmp_path / "eval").iterdir()]} == saved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "eval"]


def test_recorded_checkpoints_are_relative_to_the_run_folder(tmp_path):
    run = tmp_path / "run"
    path, _ = save(run / "checkpoints", "sft-step000003", 0, 3)
    assert stored_checkpoint(path, run) == os.path.join("checkpoints", "sft-step000003")
    moved = tmp_path / "moved"
    shutil.move(run, moved)
    assert recorded_checkpoint(os.path.join("checkpoints", "sft-step000003"), moved) == moved / "checkpoints" / \
        "sft-step000003"
    # an older record's absolute path that the move broke is found by name in the moved folder
    assert recorded_checkpoint(str(path), moved) == moved / "checkpoints" / "sft-step000003"
    (moved / "checkpoints" / "sft-step000003" / "model.pt").write_bytes(b"PK")
    with pytest.raises(CheckpointError, match=r"last finished stage's checkpoint is unusable.*model.pt"):
        recorded_checkpoint(os.path.join("checkpoints", "sft-step000003"), moved)


@pytest.mark.slow
def test_a_moved_run_folder_resumes_from_its_own_checkpoints(tmp_path, monkeypatch):
    """An SFT run, moved to another folder, then resumed for RL: the stage record points into the new folder."""
    from qwenlong.pipeline.run import Run, run_sft

    monkeypatch.setenv("QWENLONG_BACKEND", "torch")  # the kernels' PyTorch paths: the interpreter is slow
    args = [*SMALL, "sft.steps=2", "eval.enabled=false", "output.tensorboard=false"]
    run_sft(load_config(TINY, [*args, f"output.dir={tmp_path / 'a'}"]))
    record = json.loads((tmp_path / "a" / "pipeline.json").read_text())
    assert record["last_checkpoint"] == os.path.join("checkpoints", "sft-step000002")
    shutil.move(tmp_path / "a", tmp_path / "b")
    run = Run(load_config(TINY, [*args, f"output.dir={tmp_path / 'b'}"]), resume=True)
    saved = torch.load(tmp_path / "b" / "checkpoints" / "sft-step000002" / "model.pt", weights_only=True)
    for name, value in run.model.state_dict().items():
        assert torch.equal(value, saved[name]), name


def test_a_new_run_into_a_folder_killed_in_its_first_stage_is_refused(tmp_path):
    """A run killed before it recorded a stage leaves its config and checkpoints but no ``pipeline.json``: --resume
    continues it, so a new run there must be refused too (it appended to the killed run's metrics and mixed its own
    checkpoints with the killed run's)."""
    from qwenlong.config import save_config

    cfg = load_config(TINY, [f"output.dir={tmp_path}"])
    save_config(cfg, tmp_path / "config.yaml")
    (tmp_path / "checkpoints" / "sft-step000010").mkdir(parents=True)
    assert open_run_record(cfg, tmp_path, resume=True)["done"] == []  # a run to resume
    with pytest.raises(ConfigError, match=r"output.dir: .* already holds a run; pass --resume"):
        open_run_record(cfg, tmp_path, resume=False)
    (tmp_path / "fresh").mkdir()  # an empty folder (made beforehand, say) is no run
    assert open_run_record(cfg, tmp_path / "fresh", resume=False)["done"] == []


def test_a_run_that_stopped_at_bad_data_before_any_step_can_be_started_again(tmp_path, capsys):
    """A run that failed on its data file had written its config and nothing else: a new run with the corrected
    file was refused ('already holds a run'), and --resume refused the changed data, so the user had to delete
    the folder. A config alone is no run; one with logged steps (or a checkpoint) still is."""
    from qwenlong.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a", "document": "d", "data_source": "musique"}\n{"question": \n')
    out = tmp_path / "run"
    command = ["sft", "--config", TINY, "--no-plan-check", f"output.dir={out}", "sft.steps=1"]
    assert main([*command, f"data.train_files=[{bad}]"]) == 2
    assert "bad.jsonl: line 2: invalid JSON" in capsys.readouterr().err
    assert (out / "config.yaml").is_file()
    cfg = load_config(TINY, [f"output.dir={out}"])
    assert open_run_record(cfg, out, resume=False)["done"] == []  # the corrected command may start here
    (out / "metrics.jsonl").write_text('{"stage": "sft", "step": 1}\n')
    with pytest.raises(ConfigError, match=r"output.dir: .* already holds a run; pass --resume"):
        open_run_record(cfg, out, resume=False)
