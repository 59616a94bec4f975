"""tools/gpu_check.sh, the one command for a lent GPU machine: its plan fits the device's 10-minute command
limit, and what it packs fits what the device gives back (at most 8 files of at most 16 MiB, no deeper than
two folders, plain names). Runs the script's --dry-run and its pack step on fake results (a few seconds)."""

from __future__ import annotations

import os
import re
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.sh"
DEVICE_COMMAND_LIMIT_S = 600
DEVICE_FILES, DEVICE_FILE_BYTES = 8, 16 * 2**20
STEPS = ["env", "wheels", "build", "gpu-tests", "tiles", "bench", "pack"]


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def _plan(*args: str) -> tuple[dict[str, int], int, int]:
    """(limit per step, kill-after seconds, the worst case the plan states) from --dry-run."""
    proc = _run("--dry-run", *args)
    assert proc.returncode == 0, proc.stderr
    limits = {name: int(limit) for name, limit in re.findall(r"^step (\S+) +limit +(\d+) s", proc.stdout, re.M)}
    kill_after = int(re.search(r"kill-after (\d+) s", proc.stdout).group(1))
    worst = int(re.search(r"^worst case: (\d+) s", proc.stdout, re.M).group(1))
    return limits, kill_after, worst


@pytest.mark.parametrize("mode", [(), ("--quick",)])
def test_plan_fits_the_device_command_limit(mode):
    limits, kill_after, worst = _plan(*mode)
    assert list(limits) == STEPS
    assert all(limit > 0 for limit in limits.values()), limits
    # every step spending its whole limit and its kill-after grace: still inside the command limit
    assert worst == sum(limits.values()) + kill_after * len(limits)
    assert worst < DEVICE_COMMAND_LIMIT_S, f"{mode}: the steps' limits add up to {worst} s"


def test_gpu_tests_step_names_the_kernel_test_files():
    """The steps run in ``bash -c``: the kernel test files reach the step there (once an array did not, and the
    step ran the whole suite instead of the three files). The plan prints them as the step sees them."""
    proc = _run("--dry-run")
    line = next(line for line in proc.stdout.splitlines() if line.startswith("step gpu-tests"))
    kernel_part = line.split("-n 8", 1)[1]
    for name in ("tests/test_attention.py", "tests/test_logprobs.py", "tests/test_grpo_loss.py"):
        assert name in kernel_part and (ROOT / name).is_file(), line


def test_quick_shrinks_every_step():
    full, _, full_worst = _plan()
    quick, _, quick_worst = _plan("--quick")
    assert all(quick[step] <= full[step] for step in STEPS), (quick, full)
    assert quick_worst < full_worst


def test_unknown_step_is_refused_by_name():
    proc = _run("--steps", "env,benchmark")
    assert proc.returncode == 2
    assert "--steps: unknown step 'benchmark'" in proc.stderr


def test_gpu_tests_step_leaves_the_kernel_tests_to_a_gpu(tmp_path):
    """Without a GPU the step runs the gpu-marked tests (all skip) but not the kernel test files, which the
    interpreter would spend minutes on, past the step's limit (the README's test command runs them anyway)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU runs the kernel tests natively")
    proc = _run("--quick", "--steps", "gpu-tests", env=os.environ | {"OUT": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    row = re.search(r"^gpu-tests +\d+ +\d+ +(\S+) +(.*)$", proc.stdout, re.M)
    assert row and row.group(1) == "ok", proc.stdout[-2000:]
    assert "kernels: 0 skipped (no GPU" in row.group(2)
    # the step's own output comes back as it is written (a call cut at its limit still returns it), and the
    # main log after every step
    _assert_device_can_return(tmp_path)
    assert "skipped" in (tmp_path / "gpu-tests.log").read_text()
    assert "=== gpu-tests: ok in" in (tmp_path / "gpu_check.log").read_text()


def _pack(tmp_path: Path, results: dict[str, bytes]) -> tuple[subprocess.CompletedProcess, Path]:
    """Runs the pack step alone on ``results`` (paths under the scratch's results/ folder) into a fresh $OUT."""
    scratch, out = tmp_path / "scratch", tmp_path / "out"
    for name, content in results.items():
        path = scratch / "results" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    env = os.environ | {"GPU_CHECK_SCRATCH": str(scratch), "OUT": str(out)}
    return _run("--steps", "pack", env=env), out


def _assert_device_can_return(out: Path) -> list[Path]:
    files = [path for path in out.rglob("*") if path.is_file()]
    assert 0 < len(files) <= DEVICE_FILES, files
    for path in files:
        relative = path.relative_to(out)
        assert len(relative.parts) <= 3, relative  # $OUT/a/b/file comes back, $OUT/a/b/c/file does not
        assert all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in relative.parts), relative
        assert path.stat().st_size <= DEVICE_FILE_BYTES, (relative, path.stat().st_size)
    return files


def test_pack_returns_every_result_in_few_files(tmp_path):
    results = {f"bench/h200-2026-12-03-fake{i:02d}.{ext}": os.urandom(64) + f"result {i}".encode()
               for i in range(20) for ext in ("json", "md")}
    results["gpu-tests.xml"] = b"<testsuites/>"
    proc, out = _pack(tmp_path, results)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = _assert_device_can_return(out)
    assert {path.name for path in files} == {"results.tar.gz", "summary.txt", "gpu_check.log"}
    with tarfile.open(out / "results.tar.gz") as archive:
        packed = {member.name: archive.extractfile(member).read() for member in archive if member.isfile()}
    for name, content in results.items():
        assert packed[f"results/{name}"] == content, name
    assert "logs/pack.log" in packed
    assert re.search(r"^pack +\d+ +\d+ +ok ", (out / "summary.txt").read_text(), re.M)


def test_pack_drops_plots_that_would_pass_the_file_size_limit(tmp_path):
    results = {"bench/h200-2026-12-03-attention.png": os.urandom(DEVICE_FILE_BYTES + 2**20),  # incompressible
               "bench/h200-2026-12-03-attention.json": b'{"rows": []}'}
    proc, out = _pack(tmp_path, results)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _assert_device_can_return(out)
    with tarfile.open(out / "results.tar.gz") as archive:
        names = archive.getnames()
    assert "results/bench/h200-2026-12-03-attention.json" in names
    assert not any(name.endswith(".png") for name in names)


def test_tile_sweep_candidates_replace_part_of_one_config_and_are_checked(tmp_path):
    """tools/tile_sweep.py: a candidate replaces part of one kernel's config and leaves the rest as the table has
    it; the smoke run (the interpreter, tiny shapes) times the tables' configs and a candidate of each sweep,
    whose outputs and gradients match the table's on the same inputs, and writes them as JSON."""
    import json
    import sys

    import torch

    sys.path.insert(0, str(ROOT / "tools"))
    import tile_sweep

    from qwenlong.kernels.attention import varlen

    base = varlen._configs(128, torch.bfloat16, 90)
    for kernel, _ in tile_sweep.ATTENTION_CANDIDATES:
        assert kernel in base, kernel
    args = type("Args", (), {"smoke": True})()
    sweep = tile_sweep.attention_sweep(args, torch.device("cpu"), torch.float32)
    kernel, tile = tile_sweep.ATTENTION_CANDIDATES[0]
    with sweep.apply((kernel, tile)):
        patched = varlen._configs(128, torch.bfloat16, 90)
    assert patched[kernel] == dict(zip(tile_sweep.ATTENTION_FIELDS, tile, strict=True))
    assert {k: v for k, v in patched.items() if k != kernel} == {k: v for k, v in base.items() if k != kernel}
    assert varlen._configs(128, torch.bfloat16, 90) == base  # restored
    lm_head = tile_sweep.lm_head_sweep(args, torch.device("cpu"), torch.float32)
    table = lm_head.table()
    assert all(set(candidate) <= set(table) for candidate in tile_sweep.LM_HEAD_CANDIDATES)  # no key nothing reads
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "tile_sweep.py"), "--smoke", "--limit", "1", "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    sweeps = json.loads((tmp_path / "tile-sweep.json").read_text())["sweeps"]
    assert list(sweeps) == ["attention", "lm-head"]
    for name, result in sweeps.items():
        rows = result["rows"]
        assert [row["candidate"] for row in rows][0] == "table" and len(rows) == 2, rows
        assert all(row["status"] == "ok" and row["fwd ms"] > 0 and row["bwd ms"] > 0 for row in rows), rows
        assert rows[1]["max rel error"] < 1e-4, (name, rows[1])  # fp32 under the interpreter: summation order only


def test_a_failed_cuda_build_still_installs_the_triton_kernels(tmp_path):
    """The build step's editable install is what makes qwenlong.kernels importable on the machine: when the CUDA
    build fails, the step installs without the CUDA part (and still says FAILED), else the GPU tests and both
    benchmarks of the lease fail on the import. A fake nvcc and a python3 that says torch is a CUDA build and
    fails pip's CUDA build stand in for the GPU machine."""
    import shutil

    bin_dir, pip_log = tmp_path / "bin", tmp_path / "pip.log"
    bin_dir.mkdir()
    (bin_dir / "nvcc").write_text("#!/bin/sh\necho 'fake nvcc'\n")
    (bin_dir / "python3").write_text(f"""#!/usr/bin/env bash
if [ "$1" = -c ] && [[ $2 == *"torch.version.cuda or ''"* ]]; then echo 13.0; exit 0; fi
if [ "$1 $2 $3" = "-m pip install" ]; then
  echo "QWENLONG_BUILD_CUDA=${{QWENLONG_BUILD_CUDA:-}} $*" >>{pip_log}
  [ "${{QWENLONG_BUILD_CUDA:-}}" = 1 ] && {{ echo 'fake: nvcc error'; exit 1; }}
  exit 0
fi
exec {shutil.which("python3")} "$@"
""")
    for fake in ("nvcc", "python3"):
        (bin_dir / fake).chmod(0o755)
    env = os.environ | {"OUT": str(tmp_path / "out"), "PATH": f"{bin_dir}:{os.environ['PATH']}",
                        "CUDA_HOME": str(tmp_path)}
    proc = _run("--quick", "--steps", "build", env=env)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    installs = pip_log.read_text().splitlines()
    assert len(installs) == 2 and all("-e " in line for line in installs), installs
    assert installs[0].startswith("QWENLONG_BUILD_CUDA=1 ") and installs[1].startswith("QWENLONG_BUILD_CUDA=0 ")
    row = re.search(r"^build +\d+ +\d+ +(FAILED rc=1) +(.*)$", proc.stdout, re.M)
    assert row and "installed without the CUDA part" in row.group(2), proc.stdout[-2000:]


def test_a_benchmark_that_crashes_leaves_the_other_its_results(tmp_path):
    """The two benchmarks run in a process each: a crash in one (a segfault, an abort, or a CUDA error that
    poisons the context, an illegal address or a device-side assert, fails every later op of the process) still
    leaves the other its rows and results files, and the summary says which failed. Here logprobs aborts."""
    crash = tmp_path / "crash"
    crash.mkdir()
    (crash / "sitecustomize.py").write_text('import os, sys\nif "logprobs" in sys.argv:\n    os.abort()\n')
    scratch = tmp_path / "scratch"
    env = os.environ | {"OUT": str(tmp_path / "out"), "GPU_CHECK_SCRATCH": str(scratch),
                        "PYTHONPATH": os.pathsep.join(filter(None, [str(crash), os.environ.get("PYTHONPATH")]))}
    proc = _run("--quick", "--steps", "bench", env=env)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert list((scratch / "results" / "bench").glob("*-attention.json")), proc.stdout[-3000:]
    row = re.search(r"^bench +\d+ +\d+ +(FAILED rc=\d+) +(.*)$", proc.stdout, re.M)
    assert row and "logprobs FAILED" in row.group(2) and "attention done" in row.group(2), proc.stdout[-2000:]
