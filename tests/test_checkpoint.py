"""Checkpoint retention: ``prune_checkpoints`` keeps the newest few of one series, clears the series' leftovers
of killed runs, and touches nothing else."""

import json
import os

import pytest
import torch

from qwenlong.state.checkpoint import (
    STATE_FILE,
    checkpoint_problem,
    latest_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)


def make(directory, name, mtime, complete=True):
    folder = directory / name
    folder.mkdir()
    torch.save({"weight": torch.randn(3)}, folder / "model.pt")
    torch.save({"optimizer": None}, folder / "trainer.pt")
    if complete:
        (folder / STATE_FILE).write_text(json.dumps({"step": mtime}))
        os.utime(folder / STATE_FILE, ns=(mtime * 10**9, mtime * 10**9))
    return folder


def test_prune_keeps_the_newest_of_one_series(tmp_path):
    # written out of name order: retention follows write time, as latest_checkpoint does
    for name, mtime in [("sft-step000010", 1), ("sft-step000030", 3), ("sft-step000020", 2), ("sft-step000040", 4)]:
        make(tmp_path, name, mtime)
    others = [make(tmp_path, "rl-short-step000010", 5), make(tmp_path, "rl-short-step000020", 6),
              make(tmp_path, "sft-step000050-best", 7), make(tmp_path, "sft-stepper", 8, complete=False)]
    make(tmp_path, "sft-step000025", 9, complete=False)  # a killed run's half-deleted checkpoint
    make(tmp_path, "sft-step000035.tmp", 10)  # a killed run's uncommitted save

    deleted = prune_checkpoints(tmp_path / "sft-step000040", keep=2)

    assert sorted(p.name for p in deleted) == ["sft-step000010", "sft-step000020", "sft-step000025",
                                               "sft-step000035.tmp"]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["sft-step000030", "sft-step000040"] + [p.name for p in others])
    # the newest of the series itself: names that only start like it are other series
    assert latest_checkpoint(tmp_path, prefix="sft-") == tmp_path / "sft-step000040"


def test_prune_keep_zero_and_bad_keep(tmp_path):
    for i in range(3):
        make(tmp_path, f"rl-a-step{i:06d}", i + 1)
    assert prune_checkpoints(tmp_path / "rl-a-step000002", keep=0) == []
    assert prune_checkpoints(tmp_path / "rl-a-step000002", keep=5) == []
    assert len(list(tmp_path.iterdir())) == 3
    with pytest.raises(ValueError, match="keep"):
        prune_checkpoints(tmp_path / "rl-a-step000002", keep=-1)
    assert [p.name for p in prune_checkpoints(tmp_path / "rl-a-step000002", keep=1)] == [
        "rl-a-step000000", "rl-a-step000001"]
    assert [p.name for p in tmp_path.iterdir()] == ["rl-a-step000002"]


def test_half_deleted_and_uncommitted_checkpoints_are_never_latest(tmp_path):
    make(tmp_path, "sft-step000001", 1)
    make(tmp_path, "sft-step000002", 9, complete=False)  # killed while prune_checkpoints deleted it
    make(tmp_path, "sft-step000003.tmp", 10)  # killed after writing, before the rename into place
    assert latest_checkpoint(tmp_path, prefix="sft-") == tmp_path / "sft-step000001"


def test_a_checkpoint_that_cannot_be_deleted_stays_with_a_warning(tmp_path, monkeypatch):
    import shutil

    from qwenlong.state import checkpoint

    for i in range(3):
        make(tmp_path, f"sft-step{i:06d}", i + 1)
    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if path.name == "sft-step000000":
            raise PermissionError(13, "Permission denied", str(path))
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", rmtree)
    with pytest.warns(UserWarning, match="sft-step000000 could not be deleted"):
        deleted = prune_checkpoints(tmp_path / "sft-step000002", keep=1)
    assert [p.name for p in deleted] == ["sft-step000001"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft-step000000", "sft-step000002"]


def _saved(directory, name):
    return save_checkpoint(directory / name, model=torch.nn.Linear(3, 2), state={"step": name})


def test_newest_is_the_order_of_the_saves_not_the_file_times(tmp_path):
    """A run folder copied without its file times (cp -r): the times say nothing, the recorded order does."""
    folders = [_saved(tmp_path, f"sft-step{step:06d}") for step in (10, 20, 30)]
    for age, folder in enumerate(reversed(folders)):  # the newest save now looks the oldest
        os.utime(folder / STATE_FILE, ns=(age * 10**9, age * 10**9))
    assert latest_checkpoint(tmp_path, prefix="sft-") == folders[-1]
    assert prune_checkpoints(folders[-1], keep=2) == [folders[0]]
    # saved again under an existing name (a resumed run redoing a step): that one is now the newest
    again = _saved(tmp_path, "sft-step000020")
    assert latest_checkpoint(tmp_path, prefix="sft-") == again


def test_a_checkpoint_is_never_deleted_under_its_name_while_replaced(tmp_path, monkeypatch):
    """Saving again under a checkpoint's name deletes the old one only after the new one is in place."""
    import shutil

    from qwenlong.state import checkpoint

    path = _saved(tmp_path, "sft-step000001")
    real_rmtree = shutil.rmtree
    deleted = []

    def rmtree(target, *args, **kwargs):
        deleted.append(target)
        assert target != path and (path / STATE_FILE).exists(), "the name holds no checkpoint during a delete"
        real_rmtree(target, *args, **kwargs)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", rmtree)
    _saved(tmp_path, "sft-step000001")
    assert deleted and sorted(p.name for p in tmp_path.iterdir()) == ["sft-step000001"]
    # a run killed between the two renames leaves the replaced folder: the next prune clears it
    (tmp_path / "sft-step000001.replaced").mkdir()
    _saved(tmp_path, "sft-step000002")
    prune_checkpoints(tmp_path / "sft-step000002", keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft-step000001", "sft-step000002"]


def test_a_truncated_file_in_a_subfolder_is_found(tmp_path):
    """DeepSpeed keeps its shards in a folder of their own: a shard cut short is damage too."""
    path = _saved(tmp_path, "rl-a-step000001")
    (path / "deepspeed").mkdir()
    torch.save({"shard": torch.randn(1000)}, path / "deepspeed" / "mp_rank_00_model_states.pt")
    assert checkpoint_problem(path) is None
    data = (path / "deepspeed" / "mp_rank_00_model_states.pt").read_bytes()
    (path / "deepspeed" / "mp_rank_00_model_states.pt").write_bytes(data[: len(data) // 2])
    assert "mp_rank_00_model_states.pt" in checkpoint_problem(path)


def test_a_checkpoint_is_on_disk_before_it_replaces_the_last_good_one(tmp_path, monkeypatch):
    """A machine that loses power right after a save (and the prune that follows it) must find the new checkpoint
    whole: its files reach the disk before the rename commits it, and the rename before older ones are deleted.
    (Nothing was synced: the page cache could still hold model.pt when keep=1 had deleted the last good one.)"""
    from qwenlong.state import checkpoint

    events = []
    real_fsync, real_replace, real_rmtree = os.fsync, os.replace, checkpoint.shutil.rmtree

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    def rmtree(path, *args, **kwargs):
        events.append(("rmtree", str(path)))
        real_rmtree(path, *args, **kwargs)

    first = _saved(tmp_path, "sft-step000001")
    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    monkeypatch.setattr(checkpoint.os, "replace", replace)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", rmtree)
    second = _saved(tmp_path, "sft-step000002")
    prune_checkpoints(second, keep=1)
    assert not first.exists()

    commit = events.index(("replace", str(second) + ".tmp", str(second)))
    synced = {event[1] for event in events[:commit] if event[0] == "fsync"}
    for name in ("model.pt", "trainer.pt", "save_order", STATE_FILE):  # small files: their atomic write's temporary
        assert any(path == f"{second}.tmp/{name}" or path.startswith(f"{second}.tmp/.{name}.") for path in synced), name
    assert f"{second}.tmp" in synced  # the folder's entries
    deleted = events.index(("rmtree", str(first)))
    assert ("fsync", str(tmp_path)) in events[commit:deleted]  # the rename itself, before the old one goes


class _FakeCuda:
    """CUDA's generators as torch.cuda shows them (one state per visible GPU, and the current GPU); unknown
    devices raise IndexError, as ``torch.cuda.default_generators[idx]`` does."""

    def __init__(self, monkeypatch, count: int, current: int):
        self.states = [torch.tensor([100 + i], dtype=torch.uint8) for i in range(count)]
        self.current = current

        def index(device):
            if device is None or device == "cuda":
                return self.current
            return device if isinstance(device, int) else torch.device(device).index

        def get(device="cuda"):
            return self.states[index(device)].clone()

        def set_(state, device="cuda"):
            self.states[index(device)] = state.clone()

        def set_all(states):
            for i, state in enumerate(states):
                set_(state, i)

        for name, value in {"is_available": lambda: True, "device_count": lambda: len(self.states),
                            "current_device": lambda: self.current, "get_rng_state": get, "set_rng_state": set_,
                            "get_rng_state_all": lambda: [s.clone() for s in self.states],
                            "set_rng_state_all": set_all}.items():
            monkeypatch.setattr(torch.cuda, name, value)


@pytest.mark.parametrize("saved_on, resumed_on", [((8, 3), (1, 0)), ((1, 0), (8, 3)), ((8, 3), (8, 3))])
def test_cuda_rng_resumes_on_the_gpu_in_use_whatever_the_layout(monkeypatch, saved_on, resumed_on):
    """A rank saved every visible GPU's generator and resumed them by index: resumed with another number of
    visible GPUs (one per process under a per-rank CUDA_VISIBLE_DEVICES, all of them under plain torchrun)
    ``set_rng_state_all`` raised IndexError, or set GPU 0 while the rank draws from GPU ``LOCAL_RANK``. The GPU
    the process uses must continue the generator of the GPU it used when it saved. (count, current) pairs."""
    from qwenlong.state.checkpoint import rng_state, set_rng_state

    saving = _FakeCuda(monkeypatch, *saved_on)
    saving.states[saving.current] = torch.tensor([42], dtype=torch.uint8)  # where the run's samples were drawn
    state = rng_state()
    resuming = _FakeCuda(monkeypatch, *resumed_on)
    set_rng_state(state)
    assert resuming.states[resuming.current].tolist() == [42]
    if saved_on == resumed_on:  # the same layout: every GPU as it was
        assert [s.tolist() for s in resuming.states] == [s.tolist() for s in saving.states]
