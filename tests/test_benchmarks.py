"""Benchmarks: the runner's smoke sizes write complete results, and the shared pieces measure what they say.

Nothing here checks a speed: the quick run only proves every benchmark runs end to end and records
its environment, setup and rows (speed lives in the results files, not in tests).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # benchmarks/ is not an installed package

from benchmarks.common import PeakMemory, card_slug, document_lengths, kernel_backend, time_ms  # noqa: E402

# bench name in the file name -> row keys every measured row must carry, and whether it draws a plot
EXPECTED = {
    "attention": (("variant", "layout", "total tokens", "peak MiB", "fwd+bwd ms", "fwd+bwd tokens/s"), True),
    "logprobs-memory": (("variant", "T", "V", "peak MiB", "seconds"), True),
    "train-step-tiny": (("stack", "total tokens", "peak MiB", "step ms", "tokens/s", "TFLOP/s", "loss"), True),
    "rl-step": (("prompt tokens", "generate s", "score wait s", "score (overlapped) s", "old log-probs s", "update s",
                 "step s"), False),
    "packing": (("op", "n", "cpp_wall_s", "speedup"), False),
    "sequence-parallel": (("sp", "step_ms", "a2a_ms", "a2a_share"), False),
}
ENVIRONMENT_KEYS = ("card", "driver", "cuda", "torch", "triton", "date")


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    env = os.environ | {"TRITON_INTERPRET": "0"}  # the CPU paths, not kernels under the interpreter
    env.pop("QWENLONG_BACKEND", None)
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _measured(row: dict) -> bool:
    return row.get("status", "ok") == "ok"


@pytest.mark.slow
@pytest.mark.parametrize("bench", list(EXPECTED))
def test_quick_run_writes_complete_results(quick_results, bench):
    files = [p for p in sorted(quick_results.glob("*.json")) if json.loads(p.read_text())["bench"] == bench]
    assert len(files) == 1, sorted(p.name for p in quick_results.iterdir())
    result = json.loads(files[0].read_text())
    assert result["bench"] == bench and result["title"] and result["setup"]
    assert all(result["environment"][key] for key in ENVIRONMENT_KEYS)
    assert files[0].name.startswith(card_slug(result["environment"]["card"]) + "-")
    assert files[0].with_suffix(".md").read_text().startswith(f"# {result['title']}")
    keys, plotted = EXPECTED[bench]
    measured = [row for row in result["rows"] if _measured(row)]
    assert measured, result["rows"]
    for row in measured:
        missing = [key for key in keys if key not in row]
        assert not missing, (missing, row)
    for row in result["rows"]:  # a baseline that did not run says why instead of carrying a number
        if not _measured(row):
            assert row["status"].startswith(("OOM", "not available", "over the memory cap")), row
    if plotted and importlib.util.find_spec("matplotlib") is not None:
        png = quick_results / result["plot"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_quick_train_step_compares_every_stack_and_finds_the_largest_context(quick_results):
    result = json.loads(next(quick_results.glob("*-train-step-tiny.json")).read_text())
    stacks = {row["stack"] for row in result["rows"]}
    assert stacks == {"qwenlong", "hf-sdpa (one row)", "hf-sdpa (padded)", "flex (doc mask)"}
    largest = {row["stack"]: row for row in result["tables"]["Largest context that fits"]}
    assert set(largest) == stacks
    ours = largest["qwenlong"]["largest fitting tokens"]
    assert isinstance(ours, int) and ours >= 256
    # the same packed documents: our loss equals the padded baseline's (both compute the per-document loss)
    losses = {row["stack"]: row["loss"] for row in result["rows"] if _measured(row)}
    assert losses["qwenlong"] == pytest.approx(losses["hf-sdpa (padded)"], abs=2e-4)


@pytest.mark.slow
def test_readme_table_is_built_from_the_results_files(quick_results, capsys):
    from qwenlong.cli import main

    assert main(["bench", "--readme-table", "--out", str(quick_results)]) == 0
    printed = capsys.readouterr().out
    results = [json.loads(p.read_text()) for p in quick_results.glob("*.json")]
    titles = {result["title"] for result in results}
    assert {result["bench"] for result in results} >= set(EXPECTED) and len(titles) == len(results)
    for title in titles:
        assert f"### {title} (" in printed


def test_train_step_flops_against_a_hand_count():
    from transformers import Qwen2Config

    from benchmarks.bench_train_step import train_step_flops

    def config(layers):
        return Qwen2Config(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=layers,
                           num_attention_heads=2, num_key_value_heads=1)

    # head_dim 4. Per layer and token, multiply-adds: q 8x8 = 64, k 8x4 = 32, v 32, o 64, MLP 3 x 8 x 16
    # = 384 -> 576; LM head 10 x 8 = 80. Five tokens: forward matmuls 2 x 5 x (576 + 80) = 6560 FLOPs.
    # Attention over documents of 3 and 2 tokens: causal pairs 6 + 3 = 9, QK^T and PV at 2 x 4 FLOPs
    # each per head, 2 heads -> 4 x 2 x 4 x 9 = 288 per layer. A step is 3 forwards.
    assert train_step_flops(config(1), [3, 2]) == 3 * (6560 + 288)
    assert train_step_flops(config(2), [3, 2]) == 3 * (2 * 5 * (2 * 576 + 80) + 2 * 288)


def test_peak_memory_sees_a_temporary_allocation():
    with PeakMemory("cpu") as peak:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, written so its pages are resident
        del block
    assert 60 <= peak.mib < 200
    with PeakMemory("cpu") as idle:
        pass
    assert idle.mib < 16


def test_time_ms_takes_the_median_over_fresh_inputs():
    made, seen = [], []

    def setup():
        made.append(torch.randn(4))
        return (made[-1],)

    assert time_ms(seen.append, setup=setup, warmup=2, repeats=3) >= 0
    assert len(made) == len(seen) == 5
    assert all(a is b for a, b in zip(made, seen, strict=True))


def test_document_lengths():
    for total in (64, 1000, 8192):
        lengths = document_lengths(total)
        assert sum(lengths) == total and min(lengths) >= 1 and max(lengths) <= max(64, total // 4)
    assert document_lengths(4096, "single") == [4096]
    with pytest.raises(ValueError, match="layout"):
        document_lengths(10, "diagonal")


def test_a_benchmark_leaves_the_kernel_path_as_it_found_it(monkeypatch):
    """A kernel path chosen for one measurement stays inside it: on a GPU run, the log-probs benchmark's last
    variant (our PyTorch path) once set QWENLONG_BACKEND for the attention benchmark after it, which then
    timed the blockwise PyTorch attention as ours (1.1 s instead of 4 ms)."""
    import benchmarks.__main__ as runner
    from benchmarks import bench_logprobs

    monkeypatch.delenv("QWENLONG_BACKEND", raising=False)
    with kernel_backend("torch"):
        assert os.environ["QWENLONG_BACKEND"] == "torch"
    assert "QWENLONG_BACKEND" not in os.environ
    monkeypatch.setenv("QWENLONG_BACKEND", "auto")
    hidden, weight, targets = bench_logprobs.make_inputs(12, 8, 40, torch.float32, "cpu", True, valid=5)
    for op in bench_logprobs.OPS:
        bench_logprobs.ours("torch", op)(hidden, weight, targets)
        assert os.environ["QWENLONG_BACKEND"] == "auto", op

    def sets_a_path(argv):
        os.environ["QWENLONG_BACKEND"] = "torch"

    monkeypatch.setitem(runner.BENCHMARKS, "fake", "fake_benchmark_module")
    monkeypatch.setitem(sys.modules, "fake_benchmark_module", type(sys)("fake_benchmark_module"))
    sys.modules["fake_benchmark_module"].main = sets_a_path
    assert runner.main(["--only", "fake"]) == 0
    assert os.environ["QWENLONG_BACKEND"] == "auto"
