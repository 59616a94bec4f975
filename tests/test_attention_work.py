"""Work the varlen attention kernels issue, counted under the Triton interpreter (benchmarks/work/counting.py):
the meter's closed form equals the count on both backward paths (7 GEMMs, or 5 with atomic dq), and at full
size the RL-shaped batches launch no empty programs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/ is not an installed package

from benchmarks.work import attention as meter  # noqa: E402
from benchmarks.work.counting import interpreter_active  # noqa: E402
from qwenlong.kernels.attention import varlen as varlen_module  # noqa: E402


@pytest.mark.skipif(not interpreter_active(), reason="counts only under TRITON_INTERPRET=1")
@pytest.mark.parametrize("table", [80, 90])
@pytest.mark.parametrize(
    "lengths,heads,kv_heads,head_dim",
    [([130, 1, 0, 45, 7], 2, 1, 64), ([200, 2, 2, 2, 65], 4, 2, 32)],
    ids=["mixed-d64", "rl-shaped-d32"],
)
@pytest.mark.parametrize("deterministic", [True, False], ids=["7-gemm", "atomic-dq"])
def test_closed_form_equals_the_count(lengths, heads, kv_heads, head_dim, table, deterministic, monkeypatch):
    monkeypatch.setenv("QWENLONG_BACKEND", "triton")
    monkeypatch.setattr(varlen_module, "tile_table", lambda device: table)
    counted = meter.count(lengths, heads, kv_heads, head_dim, torch.bfloat16, deterministic)
    formula = meter.closed_form(lengths, heads, kv_heads, head_dim, torch.bfloat16, table, deterministic)
    assert set(counted) == set(formula) == ({"fwd", "dkdv", "dq"} if deterministic else {"fwd", "dkdv_atomic"})
    for kernel, work in counted.items():
        assert work == {key: formula[kernel][key] for key in work}, kernel
        assert formula[kernel]["programs"] == formula[kernel]["useful tiles"]
    assert counted["fwd"]["flops"] >= meter.causal_minimum(lengths, heads, head_dim)


@pytest.mark.parametrize("table", [90, 80])
def test_full_size_batches_launch_only_useful_programs(table):
    """The issue's targets at full size: programs <= 1.2x useful tiles (here exactly 1x) on every batch,
    where the old grid launched 13x to 200x; FLOPs within tile padding of the causal minimum."""
    for batch, lengths in meter.full_batches().items():
        works = meter.closed_form(lengths, 40, 8, 128, torch.bfloat16, table)
        atomic = meter.closed_form(lengths, 40, 8, 128, torch.bfloat16, table, deterministic=False)
        row = meter._row(batch, lengths, 40, 128, "closed form", works, atomic)
        for kernel in ("fwd", "dkdv", "dq", "atomic bwd"):
            assert row[f"{kernel} / useful"] == 1.0
        if batch.startswith("RL"):
            assert row["fwd old grid / useful"] > 10
        assert 1.0 <= row["fwd FLOPs / min"] < 1.2
        assert 1.4 <= row["bwd FLOPs / min"] < 1.4 * 1.2  # 7 GEMMs against the 5 of the minimum
        assert 1.0 <= row["atomic bwd FLOPs / min"] < 1.2  # the 5 GEMMs of the minimum
