"""tools/compile_report.py: ahead-of-time builds for sm_90/sm_80 read back from the cubin.

The end-to-end test runs the tool in its own process on the toy kernels below (this file is
importable as a module: the tool imports it by name and calls ``compile_specs()``). The
toolchain is real ptxas, so the asserts are about facts of the hardware, not of a version:
a bf16 ``tl.dot`` is HMMA (mma.sync) on sm_80; on sm_90 with 4 warps (one warpgroup) and a
64-row tile it is HGMMA (wgmma), and a 64x64x32 tile is two m64n64k16 wgmma (one warpgroup
covers the 64 rows, the whole 64-wide N in one instruction, K=32 in two k16 steps); a 64x128
fp32 accumulator held by one warp needs 256 registers per thread, more than the 255 a thread can
have, so it must spill, but the toy kernel has no loop, so none of those spills is inside one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton
import triton.language as tl

from qwenlong.kernels.utils.compile_spec import CompileSpec

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "compile_report.py"


def _load_tool():
    spec = importlib.util.spec_from_file_location("compile_report", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


@triton.jit
def tile_matmul(a_ptr, b_ptr, c_ptr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C = A @ B for one row-major tile: A is BLOCK_M x BLOCK_K, B is BLOCK_K x BLOCK_N."""
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    inner = tl.arange(0, BLOCK_K)
    a = tl.load(a_ptr + rows[:, None] * BLOCK_K + inner[None, :])
    b = tl.load(b_ptr + inner[:, None] * BLOCK_N + cols[None, :])
    tl.store(c_ptr + rows[:, None] * BLOCK_N + cols[None, :], tl.dot(a, b))


def compile_specs() -> list[CompileSpec]:
    signature = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*fp32"}
    signature |= dict.fromkeys(("BLOCK_M", "BLOCK_N", "BLOCK_K"), "constexpr")

    def tile(m, n, k):
        return {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}

    return [
        CompileSpec("matmul", tile_matmul, signature, tile(64, 64, 32), num_warps=4, num_stages=1),
        CompileSpec("matmul_one_warp", tile_matmul, signature, tile(64, 128, 32), num_warps=1, num_stages=1),
        # as the JIT builds it for 16-byte aligned tensors, and only for sm_90
        CompileSpec(
            "matmul_aligned",
            tile_matmul,
            signature,
            tile(64, 64, 32),
            num_warps=4,
            num_stages=1,
            archs=(90,),
            aligned=("a_ptr", "b_ptr", "c_ptr"),
        ),
        # tl.dot needs K >= 16: this build must be reported as a compile error
        CompileSpec("matmul_k8", tile_matmul, signature, tile(64, 64, 8), num_warps=4, num_stages=1),
    ]


def run_tool(*args: str, pythonpath: Path, interpret: bool = True) -> subprocess.CompletedProcess:
    paths = [str(pythonpath), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    if interpret:
        env["TRITON_INTERPRET"] = "1"  # as under tests/conftest.py: the tool must drop it itself
    else:
        env.pop("TRITON_INTERPRET", None)
    return subprocess.run(
        [sys.executable, str(TOOL), *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )


@pytest.mark.slow
def test_report_on_toy_kernels(tmp_path):
    out_md, out_json = tmp_path / "report.md", tmp_path / "report.json"
    result = run_tool(
        "--module", Path(__file__).stem, "--output", str(out_md), "--json", str(out_json), "--jobs", "2",
        pythonpath=Path(__file__).parent,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "ignoring TRITON_INTERPRET" in result.stderr
    rows = {(row["kernel"], row["arch"]): row for row in json.loads(out_json.read_text())}
    names = ("matmul", "matmul_one_warp", "matmul_k8")
    assert set(rows) == {(name, arch) for name in names for arch in (90, 80)} | {("matmul_aligned", 90)}

    for arch in (90, 80):
        clean = rows["matmul", arch]
        assert clean["status"] == "ok", clean
        assert 0 < clean["registers"] <= 255 and clean["instructions"] > 0
        assert clean["spill_stores"] == clean["spill_loads"] == clean["stack_bytes"] == clean["local_bytes"] == 0
        assert clean["shared_bytes"] > 0  # the bf16 operand tiles are staged through shared memory
        assert clean["config"] == "bf16/fp32 BLOCK_M=64 BLOCK_N=64 BLOCK_K=32"

        spilled = rows["matmul_one_warp", arch]
        assert spilled["spills"] and spilled["status"] == "SPILLS (hot)", spilled
        assert f"FAIL {Path(__file__).stem}:matmul_one_warp on sm_{arch}" in result.stderr

        broken = rows["matmul_k8", arch]
        assert broken["status"] == "error" and broken["error"] and broken["registers"] is None

        assert rows["matmul_one_warp", arch]["loop_spills"] == 0  # no loop: every spill runs once per program

    assert rows["matmul", 80]["hmma"] > 0 and rows["matmul", 80]["hgmma"] == 0
    assert rows["matmul", 80]["hgmma_shapes"] == {}
    assert rows["matmul", 90]["hgmma"] == 2 and rows["matmul", 90]["hgmma_shapes"] == {"64x64x16": 2}
    # 16-byte aligned operands load in vector instructions: the same tile takes fewer instructions
    aligned = rows["matmul_aligned", 90]
    assert aligned["status"] == "ok" and aligned["hgmma_shapes"] == {"64x64x16": 2}
    assert aligned["instructions"] < rows["matmul", 90]["instructions"]

    report = out_md.read_text()
    assert report.startswith(tool.TITLE) and "Toolchain: Triton " in report
    assert report.count("| test_compile_report:") == 7
    assert "| 64x64x16 x2 |" in report
    assert "- sm_90 hot builds with wgmma narrower than n64: none\n" in report
    assert "- hot builds with STL/LDL inside an innermost loop: none\n" in report
    assert report in result.stdout


def test_each_spec_is_compiled_for_its_archs_with_its_alignment_hints(monkeypatch):
    specs = compile_specs()
    monkeypatch.setitem(sys.modules, "toy_kernels", type(sys)("toy_kernels"))
    sys.modules["toy_kernels"].compile_specs = lambda: specs
    jobs, errors = tool.collect_jobs(["toy_kernels"], [90, 80])
    aligned = next(index for index, spec in enumerate(specs) if spec.name == "matmul_aligned")
    assert not errors and len(jobs) == 2 * len(specs) - 1
    assert ("toy_kernels", aligned, 90) in jobs and ("toy_kernels", aligned, 80) not in jobs
    assert tool.divisibility_hints(specs[aligned]) == {(index,): [["tt.divisibility", 16]] for index in (0, 1, 2)}
    assert tool.divisibility_hints(specs[0]) == {}


def test_aligned_must_name_runtime_arguments():
    signature = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*fp32", "BLOCK_M": "constexpr"}
    for wrong in ("BLOCK_M", "d_ptr"):
        with pytest.raises(ValueError, match="aligned"):
            CompileSpec("matmul", tile_matmul, signature, {"BLOCK_M": 64}, aligned=(wrong,))


def test_only_a_full_run_writes_the_committed_report(tmp_path):
    assert tool.report_path(tool.parse_args([])) == tool.DEFAULT_OUTPUT
    assert tool.report_path(tool.parse_args(["--check"])) == tool.DEFAULT_OUTPUT
    assert tool.report_path(tool.parse_args(["--module", "m"])) is None
    assert tool.report_path(tool.parse_args(["--arch", "90"])) is None
    assert tool.report_path(tool.parse_args(["--package", "other_kernels"])) is None
    assert tool.report_path(tool.parse_args(["--arch", "90", "--output", str(tmp_path / "r.md")])) == tmp_path / "r.md"


def test_no_specs_is_not_an_error_unless_required(tmp_path):
    package = tmp_path / "kernels_without_specs"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "ops.py").write_text("def add(x, y):\n    return x + y\n")
    out_md = tmp_path / "report.md"
    common = ("--package", package.name, "--output", str(out_md))

    result = run_tool(*common, pythonpath=tmp_path, interpret=False)
    assert result.returncode == 0, result.stderr
    assert "exposes compile_specs(); nothing to compile" in result.stdout
    assert "No kernel module exposes `compile_specs()` yet." in out_md.read_text()

    result = run_tool(*common, "--require-specs", pythonpath=tmp_path, interpret=False)
    assert result.returncode == 2 and "--require-specs" in result.stderr


def test_discovery_compiles_a_reexported_compile_specs_once(tmp_path, monkeypatch):
    package = tmp_path / "reexporting_kernels"
    package.mkdir()
    (package / "__init__.py").write_text("from .ops import compile_specs\n")
    (package / "ops.py").write_text("def compile_specs():\n    return []\n")
    (package / "plain.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert tool.discover_modules(package.name) == (["reexporting_kernels.ops"], [])


def test_import_errors_are_reported(tmp_path):
    package = tmp_path / "broken_kernels"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "bad.py").write_text("import not_a_module_anywhere\n")
    result = run_tool("--package", package.name, "--output", str(tmp_path / "r.md"), pythonpath=tmp_path)
    assert result.returncode == 1
    assert "FAIL broken_kernels.bad:(import)" in result.stderr and "not_a_module_anywhere" in result.stderr


RESOURCE_USAGE = """
Resource usage:
 Common:
  GLOBAL:0
 Function tile_matmul:
  REG:255 STACK:80 SHARED:1024 LOCAL:0 CONSTANT[0]:568 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function helper:
  REG:12 STACK:0 SHARED:0 LOCAL:16 CONSTANT[0]:360 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

SASS = """
\tcode for sm_90a
\t\tFunction : tile_matmul
        /*0000*/                   LDC R1, c[0x0][0x28] ;                        /* 0x00000a00ff017b82 */
                                                                                 /* 0x000fe20000000800 */
        /*06d0*/                   HMMA.16816.F32.BF16 R4, R32, R8.reuse, RZ ;   /* 0x000000082004723c */
        /*06e0*/              @!P0 HMMA.16816.F32.BF16 R12, R36, R8, RZ ;        /* 0x00000008240c723c */
        /*0700*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ; /* 0x00e00000041879f0 */
        /*0710*/                   STL.64 [R1+0x8], R4 ;                         /* 0x0000080401007387 */
        /*0720*/               @P1 LDL R6, [R1+0x8] ;                            /* 0x0000080001067983 */
        /*0730*/                   EXIT ;                                        /* 0x000000000000794d */
"""


def test_parse_resource_usage():
    usage = tool.parse_resource_usage(RESOURCE_USAGE)
    assert set(usage) == {"tile_matmul", "helper"}
    assert usage["tile_matmul"]["REG"] == 255 and usage["tile_matmul"]["STACK"] == 80
    assert usage["tile_matmul"]["SHARED"] == 1024 and usage["tile_matmul"]["CONSTANT[0]"] == 568
    assert usage["helper"]["LOCAL"] == 16 and usage["helper"]["REG"] == 12


def test_count_sass_reads_predicated_instructions_and_skips_encodings():
    counts = tool.count_sass(tool.parse_sass(SASS))
    assert counts == {"LDC": 1, "HMMA": 2, "HGMMA": 1, "STL": 1, "LDL": 1, "EXIT": 1}


# Two functions (addresses restart in each). "nested": an outer loop 0x30..0xb0 (back-edge in the
# "BRA P6, target" form) around an inner loop 0x50..0x90 with a spill store and load inside it, one spill
# store in the outer loop only, one before and one after both, a forward branch and the trap BRA to
# itself after EXIT. "continue_loop": one loop whose header 0x10 two back-edges close (0x30, then 0x50):
# the spill between them is in the loop; the STL at 0x60 lies in "nested"'s inner range but no loop of its own.
SASS_WITH_LOOPS = """
\tcode for sm_90a
\t\tFunction : nested
        /*0000*/                   LDC R1, c[0x0][0x28] ;                          /* 0x00000a00ff017b82 */
        /*0010*/                   STL [R1], R2 ;                                  /* 0x0000000201007387 */
        /*0020*/              @!P0 BRA 0x100 ;                                     /* 0x0000000000949947 */
        /*0030*/                   LDL R3, [R1] ;                                  /* 0x0000000001037983 */
        /*0040*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ; /* 0x00e00000041879f0 */
        /*0050*/                   HGMMA.64x32x16.F32.BF16 R88, R124, gdesc[UR8].tnspB, RZ ; /* 0x4060000c7c587df0 */
        /*0060*/                   STL.64 [R1+0x8], R4 ;                           /* 0x0000080401007387 */
        /*0070*/               @P1 LDL.LU R6, [R1+0x8] ;                           /* 0x0000080001067983 */
        /*0080*/                   HGMMA.64x32x16.F32.BF16 R88, R128, gdesc[UR8].tnspB, R88, gsb0 ; /* 0x4060 */
        /*0090*/               @P1 BRA 0x50 ;                                      /* 0xfffffffc00fc1947 */
        /*00a0*/                   STL [R1+0x10], R7 ;                             /* 0x0000100701007387 */
        /*00b0*/              @!P2 BRA P6, 0x30 ;                                  /* 0xfffffffc00fca947 */
        /*00c0*/                   LDL R8, [R1+0x10] ;                             /* 0x0000100001087983 */
        /*00d0*/                   EXIT ;                                          /* 0x000000000000794d */
        /*00e0*/                   BRA 0xe0;                                       /* 0xfffffffc00fc7947 */
\t\tFunction : continue_loop
        /*0000*/                   LDC R1, c[0x0][0x28] ;                          /* 0x00000a00ff017b82 */
        /*0010*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;  /* 0x00e00000041879f0 */
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;  /* 0x00e00000081879f0 */
        /*0030*/               @P0 BRA 0x10 ;                                      /* 0xfffffffc00fc0947 */
        /*0040*/                   STL [R1], R2 ;                                  /* 0x0000000201007387 */
        /*0050*/           @!UP0 BRA.U !UP1, 0x10 ;                                /* 0xfffffffc00fc8547 */
        /*0060*/                   STL [R1+0x4], R3 ;                              /* 0x0000040301007387 */
        /*0070*/                   EXIT ;                                          /* 0x000000000000794d */
"""

# a loop with no spill inside: a spill before it and one after it
SASS_LOOP_WITHOUT_SPILL = """
\t\tFunction : clean_loop
        /*0000*/                   STL [R1], R2 ;                                  /* 0x0000000201007387 */
        /*0010*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;  /* 0x00e00000041879f0 */
        /*0020*/                   ISETP.GE.AND P0, PT, R0, 0x4, PT ;              /* 0x000000040000780c */
        /*0030*/              @!P0 BRA 0x10 ;                                      /* 0xfffffffc00fc8947 */
        /*0040*/                   LDL R2, [R1] ;                                  /* 0x0000000001027983 */
        /*0050*/                   EXIT ;                                          /* 0x000000000000794d */
"""


def test_parse_sass_splits_functions_and_reads_each_instruction():
    nested, continue_loop = tool.parse_sass(SASS_WITH_LOOPS)
    assert [len(nested), len(continue_loop)] == [15, 8]
    assert nested[6] == tool.SassInstruction(0x60, "STL", ".64", "[R1+0x8], R4")
    assert nested[11] == tool.SassInstruction(0xB0, "BRA", "", "P6, 0x30")
    assert nested[14] == tool.SassInstruction(0xE0, "BRA", "", "0xe0")
    assert continue_loop[5] == tool.SassInstruction(0x50, "BRA", ".U", "!UP1, 0x10")


def test_hgmma_shapes_widest_n_first():
    shapes = tool.hgmma_shapes(tool.parse_sass(SASS_WITH_LOOPS))
    assert list(shapes.items()) == [("64x128x16", 1), ("64x64x16", 2), ("64x32x16", 2)]
    assert tool.format_shapes(shapes) == "64x128x16 x1, 64x64x16 x2, 64x32x16 x2"
    assert tool.narrow_shapes(shapes) == ["64x32x16"]
    assert tool.hgmma_shapes(tool.parse_sass(SASS)) == {"64x64x16": 1}
    assert tool.format_shapes({}) == tool.format_shapes(None) == "-"


def test_hgmma_without_a_shape_is_an_error():
    broken = "        /*0700*/                   HGMMA.F32.BF16 R24, gdesc[UR4], RZ ;\n"
    with pytest.raises(ValueError, match="HGMMA without an MxNxK shape at 0x700"):
        tool.hgmma_shapes(tool.parse_sass(broken))


def test_loops_come_from_backward_branches():
    nested, continue_loop = tool.parse_sass(SASS_WITH_LOOPS)
    assert tool.loop_ranges(nested) == [(0x30, 0xB0), (0x50, 0x90)]  # not the forward branch, not the trap
    assert tool.innermost_loops(tool.loop_ranges(nested)) == [(0x50, 0x90)]
    assert tool.loop_ranges(continue_loop) == [(0x10, 0x50)]  # one header, two back-edges: one loop
    assert tool.innermost_loops([(0x10, 0x80), (0x20, 0x40), (0x50, 0x70)]) == [(0x20, 0x40), (0x50, 0x70)]


def test_spills_inside_innermost_loops():
    nested, continue_loop = tool.parse_sass(SASS_WITH_LOOPS)
    counts = tool.count_sass([nested, continue_loop])
    assert counts["STL"] == 5 and counts["LDL"] == 3
    assert tool.innermost_loop_spills([nested]) == 2  # the STL.64 and LDL.LU of the inner loop
    assert tool.innermost_loop_spills([continue_loop]) == 1  # between the two back-edges, not after the last
    assert tool.innermost_loop_spills([nested, continue_loop]) == 3
    assert tool.innermost_loop_spills(tool.parse_sass(SASS_LOOP_WITHOUT_SPILL)) == 0
    assert tool.innermost_loop_spills(tool.parse_sass(SASS)) == 0  # spills but no loop


def test_hot_loop_summary_lists_narrow_wgmma_on_sm90_hot_builds_and_loop_spills():
    narrow, wide = {"64x128x16": 4, "64x32x16": 16}, {"64x128x16": 4}
    rows = [
        _row(kernel="fwd", hgmma_shapes=wide, loop_spills=0),
        _row(kernel="bwd", hgmma_shapes=narrow, loop_spills=0),
        _row(kernel="cold", hgmma_shapes=narrow, loop_spills=5, hot=False),
        _row(kernel="ampere", arch=80, hgmma_shapes={}, loop_spills=3, spill_stores=3),
        _row(kernel="broken", error="CompilationError: boom"),
    ]
    assert tool.hot_loop_summary(rows) == [
        "- sm_90 hot builds with wgmma narrower than n64: m:bwd (64x32x16)",
        "- hot builds with STL/LDL inside an innermost loop: m:ampere sm_80 (3)",
    ]
    assert tool.hot_loop_summary(rows[:1]) == [
        "- sm_90 hot builds with wgmma narrower than n64: none",
        "- hot builds with STL/LDL inside an innermost loop: none",
    ]
    report = tool.markdown_report(rows, "Triton 9.9, ptxas 1.0")
    assert report.endswith("\n".join(["", *tool.hot_loop_summary(rows), ""]))
    assert "| 0/0 | 0 | 0/0 |" in report and "| 64x128x16 x4, 64x32x16 x16 |" in report
    assert "| 3/0 | 3 | 0/0 |" in report and "| - |" in report


def _row(**fields):
    base = dict(module="m", kernel="k", arch=90, registers=128, stack_bytes=0, local_bytes=0)
    return tool.Row(**(base | dict(spill_stores=0, spill_loads=0) | fields))


@pytest.mark.parametrize(
    "fields, status",
    [
        ({}, "ok"),
        ({"stack_bytes": 80}, "SPILLS (hot)"),
        ({"local_bytes": 16}, "SPILLS (hot)"),
        ({"spill_stores": 3}, "SPILLS (hot)"),
        ({"spill_loads": 1, "hot": False}, "spills"),
        ({"error": "CompilationError: boom"}, "error"),
        ({"shared_bytes": 232_448}, "ok"),  # sm_90 (H100, H200): 227 KB a block at most
        ({"shared_bytes": 232_449}, "SHARED > 227 KB"),
        ({"shared_bytes": 232_449, "stack_bytes": 8}, "SHARED > 227 KB"),
        ({"shared_bytes": 101_376, "arch": 80}, "ok"),  # sm_80 builds also run on sm_86/sm_89: 99 KB
        ({"shared_bytes": 101_377, "arch": 80}, "SHARED > 99 KB"),
        ({"shared_bytes": 200_000, "arch": None}, "ok"),
    ],
)
def test_status_of_one_build(fields, status):
    assert _row(**fields).status == status


def test_exit_status():
    ok, cold_spill, hot_spill = _row(), _row(stack_bytes=8, hot=False), _row(spill_stores=2)
    error = _row(error="CompilationError: boom")
    assert tool.exit_status([ok, cold_spill], allow_spills=False) == 0
    assert tool.exit_status([ok, hot_spill], allow_spills=False) == 1
    assert tool.exit_status([ok, hot_spill], allow_spills=True) == 0
    assert tool.exit_status([ok, error], allow_spills=True) == 1
    assert tool.exit_status([], allow_spills=False) == 0
    too_big = _row(shared_bytes=232_449, num_stages=3)
    assert tool.exit_status([ok, too_big], allow_spills=True) == 1  # it would not launch: not a spill to allow


def test_a_build_over_the_shared_memory_limit_is_explained(capsys):
    tool.explain_failures([_row(), _row(kernel="fwd", shared_bytes=260_000, num_stages=3)], allow_spills=True)
    err = capsys.readouterr().err
    assert err.startswith("FAIL m:fwd on sm_90") and "260000 B of shared memory" in err and "232448 B" in err


def test_check_detects_a_stale_report(tmp_path):
    report = tool.markdown_report([_row()], "Triton 9.9, ptxas 1.0")
    path = tmp_path / "compile_report.md"
    assert tool.is_stale(path, report)  # missing
    path.write_text(report)
    assert not tool.is_stale(path, report)
    path.write_text(report.replace("| 128 |", "| 96 |"))
    assert tool.is_stale(path, report)
    path.write_text(tool.markdown_report([_row(registers=96)], "Triton 1.0, ptxas 1.0"))
    assert not tool.is_stale(path, report)  # another toolchain: register counts are not comparable
