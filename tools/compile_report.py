"""Offline compile report: every Triton kernel built ahead of time for sm_90 and sm_80, no GPU needed.

Kernel modules under ``qwenlong.kernels`` declare their builds with ``compile_specs()`` (see
``kernels/utils/compile_spec.py``). Each spec is compiled with ``triton.compile`` for the
``GPUTarget`` of each arch it is meant for, with the divisibility hints the JIT would give its
``aligned`` arguments at launch; the cubin is then read with ``cuobjdump`` (shipped inside
Triton's package):

- ``--dump-resource-usage`` gives registers, stack and local bytes and static shared memory;
- ``--dump-sass`` gives the instructions: HGMMA (sm_90 warpgroup MMA, wgmma) and its shapes
  (``HGMMA.64x128x16.F32.BF16`` is m64 n128 k16), HMMA (warp MMA, mma.sync), and STL/LDL, the
  local-memory stores and loads register spills become. Loops are read from backward branches:
  a spill inside an innermost loop runs once per MMA step, one outside it once per outer iteration.

The table goes to stdout and to ``--output`` (markdown; by default docs/compile_report.md, the
committed report, which only a full run writes), the rows optionally to ``--json``. The exit
status is 1 on a compile error, on a build asking for more shared memory per block than its GPUs
have (``SHARED_LIMIT_BYTES``), or on spills in a spec marked ``hot`` (unless ``--allow-spills``),
2 when ``--require-specs`` finds none, and 1 when ``--check`` finds the committed report out of date.

    python tools/compile_report.py                 # compile, print, write docs/compile_report.md
    python tools/compile_report.py --check         # CI: also fail if the committed report is stale
    python tools/compile_report.py --module qwenlong.kernels.attention.varlen --arch 90   # explore: print only
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib
import json
import multiprocessing
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = ROOT / "docs" / "compile_report.md"
DEFAULT_PACKAGE = "qwenlong.kernels"
ARCHS = (90, 80)
TITLE = "# Compile report"

_FUNCTION_LINE = re.compile(r"^\s*Function (\S+):\s*$")
_RESOURCE_FIELD = re.compile(r"([A-Z]+(?:\[\d+\])?):(\d+)")
# a SASS instruction line ("/*0a40*/   @!P0 HMMA.16816.F32.BF16 R4, ...;") split up: address, opcode,
# modifiers (".64x128x16.F32.BF16"), operands up to the ";"
_SASS_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(?:@!?\w+\s+)?([A-Z][A-Z0-9_]*)((?:\.\w+)*)\s*([^;]*);")
_SASS_FUNCTION = re.compile(r"^\s*Function\s*:")  # "Function : _attn_fwd" in --dump-sass
_HGMMA_SHAPE = re.compile(r"^\.(\d+)x(\d+)x(\d+)\b")
_BRANCH_TARGET = re.compile(r"(0x[0-9a-f]+)\s*$")  # "0x4a50", "P6, 0x4a50", "UR4, 0x4a50": the target is last
SPILL_OPCODES = ("STL", "LDL")
NARROW_WGMMA_N = 64  # the open targets' bar: a narrower wgmma does too little work per instruction
# The most shared memory one block may ask for on the GPUs that run each arch's builds: sm_90 (H100, H200,
# H20) opts in to 227 KB; the sm_80 builds also serve sm_86 and sm_89 (A10, L40S, RTX 30/40), the smallest
# at 99 KB (A100 allows 163 KB). A build over its limit compiles here but cannot launch there.
SHARED_LIMIT_BYTES = {90: 227 * 1024, 80: 99 * 1024}


@dataclasses.dataclass
class Row:
    """One (spec, arch) build and what its cubin says."""

    module: str
    kernel: str
    arch: int | None
    config: str = ""
    num_warps: int = 0
    num_stages: int = 0
    hot: bool = True
    registers: int | None = None
    stack_bytes: int | None = None
    local_bytes: int | None = None
    shared_bytes: int | None = None  # dynamic (what Triton requests at launch) + static
    spill_stores: int | None = None  # STL instructions in the SASS
    spill_loads: int | None = None  # LDL instructions in the SASS
    hgmma: int | None = None
    hgmma_shapes: dict[str, int] | None = None  # "64x128x16" -> static count, widest N first
    hmma: int | None = None
    loop_spills: int | None = None  # STL/LDL inside innermost loops
    instructions: int | None = None
    error: str | None = None

    @property
    def spills(self) -> bool:
        counts = (self.stack_bytes, self.local_bytes, self.spill_stores, self.spill_loads)
        return any(count for count in counts)

    @property
    def over_shared_limit(self) -> bool:
        limit = SHARED_LIMIT_BYTES.get(self.arch)
        return limit is not None and self.shared_bytes is not None and self.shared_bytes > limit

    @property
    def status(self) -> str:
        if self.error:
            return "error"
        if self.over_shared_limit:
            return f"SHARED > {SHARED_LIMIT_BYTES[self.arch] // 1024} KB"
        if self.spills:
            return "SPILLS (hot)" if self.hot else "spills"
        return "ok"


# ---------------------------------------------------------------- reading the cubin


def parse_resource_usage(text: str) -> dict[str, dict[str, int]]:
    """``cuobjdump --dump-resource-usage`` output -> {function: {"REG": .., "STACK": .., ...}}."""
    usage: dict[str, dict[str, int]] = {}
    function = None
    for line in text.splitlines():
        match = _FUNCTION_LINE.match(line)
        if match:
            function = match.group(1)
        elif function and "REG:" in line:
            usage[function] = {key: int(value) for key, value in _RESOURCE_FIELD.findall(line)}
            function = None
    return usage


@dataclasses.dataclass(frozen=True)
class SassInstruction:
    """One instruction of ``--dump-sass``: ``@P0 HGMMA.64x64x16.F32.BF16 R24, ...`` at ``/*3330*/``."""

    address: int
    opcode: str  # "HGMMA"
    modifiers: str  # ".64x64x16.F32.BF16"
    operands: str  # "R24, gdesc[UR20], RZ, !UPT"


def parse_sass(text: str) -> list[list[SassInstruction]]:
    """``cuobjdump --dump-sass`` output -> the instructions of each function (addresses restart per function)."""
    functions: list[list[SassInstruction]] = []
    for line in text.splitlines():
        if _SASS_FUNCTION.match(line):
            functions.append([])
            continue
        match = _SASS_INSTRUCTION.match(line)
        if match:
            if not functions:  # a dump without a function header: one anonymous function
                functions.append([])
            address, opcode, modifiers, operands = match.groups()
            functions[-1].append(SassInstruction(int(address, 16), opcode, modifiers, operands.strip()))
    return functions


def count_sass(functions: list[list[SassInstruction]]) -> dict[str, int]:
    """Static instruction counts of parsed SASS (:func:`parse_sass`), by opcode without modifiers."""
    counts: dict[str, int] = {}
    for instruction in (i for function in functions for i in function):
        counts[instruction.opcode] = counts.get(instruction.opcode, 0) + 1
    return counts


def hgmma_shapes(functions: list[list[SassInstruction]]) -> dict[str, int]:
    """Static count of each HGMMA shape, "MxNxK" -> count, widest N first (then M, then K, all descending)."""
    counts: dict[tuple[int, int, int], int] = {}
    for instruction in (i for function in functions for i in function if i.opcode == "HGMMA"):
        match = _HGMMA_SHAPE.match(instruction.modifiers)
        if match is None:
            raise ValueError(f"HGMMA without an MxNxK shape at 0x{instruction.address:x}: {instruction.modifiers!r}")
        m, n, k = (int(size) for size in match.groups())
        counts[m, n, k] = counts.get((m, n, k), 0) + 1
    ordered = sorted(counts, key=lambda shape: (-shape[1], -shape[0], -shape[2]))
    return {f"{m}x{n}x{k}": counts[m, n, k] for m, n, k in ordered}


def loop_ranges(function: list[SassInstruction]) -> list[tuple[int, int]]:
    """[header, last back-edge] address ranges of a function's loops, sorted.

    A loop is a ``BRA`` whose target lies below its own address (the trap ``BRA`` to itself after
    ``EXIT`` is not one). Back-edges to the same header (a ``continue``) close one loop, up to the last.
    """
    last_latch: dict[int, int] = {}
    for instruction in function:
        if instruction.opcode != "BRA":
            continue
        target = _BRANCH_TARGET.search(instruction.operands)
        if target is not None and int(target.group(1), 16) < instruction.address:
            header = int(target.group(1), 16)
            last_latch[header] = max(last_latch.get(header, 0), instruction.address)
    return sorted(last_latch.items())


def innermost_loops(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The ranges that contain no other range."""

    def contains(outer: tuple[int, int], inner: tuple[int, int]) -> bool:
        return outer != inner and outer[0] <= inner[0] and inner[1] <= outer[1]

    return [loop for loop in ranges if not any(contains(loop, other) for other in ranges)]


def innermost_loop_spills(functions: list[list[SassInstruction]]) -> int:
    """STL/LDL instructions inside innermost loops: the spills that run once per MMA step."""
    count = 0
    for function in functions:
        loops = innermost_loops(loop_ranges(function))
        count += sum(
            1
            for instruction in function
            if instruction.opcode in SPILL_OPCODES and any(start <= instruction.address <= end for start, end in loops)
        )
    return count


def format_shapes(shapes: dict[str, int] | None) -> str:
    """{"64x128x16": 4, "64x32x16": 16} -> "64x128x16 x4, 64x32x16 x16"; "-" when there is none."""
    return ", ".join(f"{shape} x{count}" for shape, count in shapes.items()) if shapes else "-"


def narrow_shapes(shapes: dict[str, int] | None) -> list[str]:
    """The shapes in ``shapes`` whose N is below ``NARROW_WGMMA_N``."""
    return [shape for shape in shapes or {} if int(shape.split("x")[1]) < NARROW_WGMMA_N]


def find_cuobjdump() -> str:
    """The cuobjdump inside the installed Triton package, else the one on PATH."""
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if bundled.is_file() and os.access(bundled, os.X_OK):
        return str(bundled)
    on_path = shutil.which("cuobjdump")
    if on_path is None:
        raise FileNotFoundError(f"cuobjdump not found: neither {bundled} nor on PATH")
    return on_path


def _cuobjdump(flag: str, cubin: Path) -> str:
    result = subprocess.run([find_cuobjdump(), flag, str(cubin)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"cuobjdump {flag} failed: {result.stderr.strip()}")
    return result.stdout


def toolchain() -> str:
    """Triton and the versions of the ptxas builds it ships (sm_90 and sm_80 may use different ones)."""
    import triton

    versions = []
    for ptxas in sorted(Path(find_cuobjdump()).parent.glob("ptxas*")):
        out = subprocess.run([str(ptxas), "--version"], capture_output=True, text=True).stdout
        found = re.search(r"\bV(\d[\d.]*)", out)
        versions.append(f"{ptxas.name} {found.group(1) if found else 'unknown'}")
    return ", ".join([f"Triton {triton.__version__}", *versions])


# ---------------------------------------------------------------- compiling one spec


def describe_config(spec) -> str:
    """'bf16 BLOCK_M=64 BLOCK_N=64': the pointer dtypes, then the constexpr values."""
    dtypes = []
    for kind in spec.signature.values():
        if kind.startswith("*") and kind[1:] not in dtypes:
            dtypes.append(kind[1:])
    constexprs = [f"{name}={value}" for name, value in spec.constexprs.items()]
    return " ".join(["/".join(dtypes), *constexprs]).strip()


def compile_row(module_name: str, index: int, arch: int) -> Row:
    """Compile spec ``index`` of ``module_name`` for ``sm_{arch}`` and read its cubin."""
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")  # runs in worker processes too
    import triton
    from triton.backends.compiler import GPUTarget

    spec = importlib.import_module(module_name).compile_specs()[index]
    row = Row(
        module=module_name, kernel=spec.name, arch=arch, config=describe_config(spec),
        num_warps=spec.num_warps, num_stages=spec.num_stages, hot=spec.hot,
    )  # fmt: skip
    try:
        source = triton.compiler.ASTSource(
            fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=divisibility_hints(spec)
        )
        options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / "kernel.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            usage = parse_resource_usage(_cuobjdump("--dump-resource-usage", cubin))
            sass_text = _cuobjdump("--dump-sass", cubin)
        functions = parse_sass(sass_text)
        sass = count_sass(functions)
        shapes, loop_spills = hgmma_shapes(functions), innermost_loop_spills(functions)  # SASS it cannot read: error
        kernel_usage = usage[compiled.metadata.name]
    except Exception as exc:  # a compile error is a result to report, not a crash
        print(f"error compiling {module_name}:{spec.name} for sm_{arch}:\n{traceback.format_exc()}", file=sys.stderr)
        row.error = _summary(exc)
        return row
    row.registers = kernel_usage["REG"]
    row.stack_bytes = kernel_usage["STACK"]
    row.local_bytes = kernel_usage["LOCAL"]
    row.shared_bytes = compiled.metadata.shared + kernel_usage["SHARED"]
    row.spill_stores = sass.get("STL", 0)
    row.spill_loads = sass.get("LDL", 0)
    row.hgmma = sass.get("HGMMA", 0)
    row.hgmma_shapes = shapes
    row.hmma = sass.get("HMMA", 0)
    row.loop_spills = loop_spills
    row.instructions = sum(sass.values())
    return row


def divisibility_hints(spec) -> dict[tuple[int], list]:
    """``ASTSource`` attrs for ``spec.aligned``: what the JIT attaches to a pointer aligned to 16 bytes or an
    integer divisible by 16 when it specializes a launch."""
    return {(spec.fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in spec.aligned}


# ---------------------------------------------------------------- finding specs


def discover_modules(package: str) -> tuple[list[str], list[Row]]:
    """Modules under ``package`` that define ``compile_specs``, and a row per module that failed to import."""
    errors: list[Row] = []

    def import_error(name: str) -> None:
        errors.append(Row(module=name, kernel="(import)", arch=None, error=_last_exception()))

    try:
        root = importlib.import_module(package)
    except Exception:
        return [], [Row(module=package, kernel="(import)", arch=None, error=_last_exception())]
    names = [package]
    if hasattr(root, "__path__"):
        names += [info.name for info in pkgutil.walk_packages(root.__path__, package + ".", onerror=import_error)]
    found = []
    for name in names:
        try:
            module = importlib.import_module(name)
        except Exception:
            import_error(name)
            continue
        specs = getattr(module, "compile_specs", None)
        # a package that re-exports compile_specs names the module that defines it: compile once
        defining = getattr(specs, "__module__", name)
        if callable(specs) and defining not in found:
            found.append(defining)
    return found, errors


def collect_jobs(modules: list[str], archs: list[int]) -> tuple[list[tuple[str, int, int]], list[Row]]:
    """(module, spec index, arch) for every spec and each of ``archs`` it is meant for; a row per module whose
    compile_specs() fails."""
    jobs, errors = [], []
    for name in modules:
        try:
            specs = importlib.import_module(name).compile_specs()
        except Exception:
            errors.append(Row(module=name, kernel="compile_specs()", arch=None, error=_last_exception()))
            continue
        jobs += [(name, index, arch) for index, spec in enumerate(specs) for arch in archs if arch in spec.archs]
    return jobs, errors


def _last_exception() -> str:
    """Print the exception being handled in full; return its one-line summary."""
    print(traceback.format_exc(), file=sys.stderr)
    return _summary(sys.exc_info()[1])


def _summary(exc: BaseException) -> str:
    """'CompilationError: <last line of the message>': Triton puts the reason last."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[-1]}" if lines else type(exc).__name__


def compile_all(jobs: list[tuple[str, int, int]], processes: int) -> list[Row]:
    """Compile every job, in ``processes`` worker processes when more than one (results in job order)."""
    if processes <= 1 or len(jobs) <= 1:
        return _with_progress((compile_row(*job) for job in jobs), len(jobs))
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked Triton/torch state
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
        return _with_progress(pool.map(compile_row, *zip(*jobs, strict=True)), len(jobs))


def _with_progress(results, total: int) -> list[Row]:
    rows = []
    for done, row in enumerate(results, 1):
        print(f"[{done}/{total}] {row.module}:{row.kernel} sm_{row.arch}: {row.status}", file=sys.stderr, flush=True)
        rows.append(row)
    return rows


# ---------------------------------------------------------------- report


def _cell(value) -> str:
    return "-" if value is None else str(value)


def _kernel_name(row: Row) -> str:
    """'attention.compile_specs:attention_fwd_bf16_d64': the module below the default package, then the spec."""
    return f"{row.module.removeprefix(DEFAULT_PACKAGE + '.')}:{row.kernel}"


def hot_loop_summary(rows: list[Row]) -> list[str]:
    """The lines under the table, one per open target: sm_90 hot builds with a wgmma narrower than n64
    (and which shapes), and hot builds that spill inside an innermost loop (and how many STL/LDL)."""
    narrow = [
        f"{_kernel_name(row)} ({', '.join(narrow_shapes(row.hgmma_shapes))})"
        for row in rows
        if row.hot and row.arch == 90 and narrow_shapes(row.hgmma_shapes)
    ]
    in_loops = [f"{_kernel_name(row)} sm_{row.arch} ({row.loop_spills})" for row in rows if row.hot and row.loop_spills]
    return [
        f"- sm_90 hot builds with wgmma narrower than n{NARROW_WGMMA_N}: {'; '.join(narrow) or 'none'}",
        f"- hot builds with STL/LDL inside an innermost loop: {'; '.join(in_loops) or 'none'}",
    ]


def markdown_table(rows: list[Row]) -> str:
    header = (
        "| kernel | arch | dtype / config | warps/stages | registers | spill st/ld | loop spills | stack/local B "
        "| shared B | HGMMA | wgmma | HMMA | instructions | status |"
    )
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for row in rows:
        spills = f"{_cell(row.spill_stores)}/{_cell(row.spill_loads)}"
        memory = f"{_cell(row.stack_bytes)}/{_cell(row.local_bytes)}"
        status = row.status if not row.error else f"error: {row.error}".replace("|", "\\|").replace("\n", " ")
        cells = [
            _kernel_name(row), "-" if row.arch is None else f"sm_{row.arch}", row.config,
            f"{row.num_warps}/{row.num_stages}", _cell(row.registers), spills, _cell(row.loop_spills), memory,
            _cell(row.shared_bytes), _cell(row.hgmma), format_shapes(row.hgmma_shapes), _cell(row.hmma),
            _cell(row.instructions), status,
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(rows: list[Row], tools: str) -> str:
    """The committed report: how it is made, the toolchain, then the table (deterministic: no dates)."""
    limits = ", ".join(f"sm_{arch}: {limit} B" for arch, limit in SHARED_LIMIT_BYTES.items())
    intro = [
        TITLE,
        "",
        "Every Triton kernel that declares `compile_specs()` compiled ahead of time (no GPU) with",
        "`triton.compile` for a `GPUTarget`, read back from the cubin with `cuobjdump`.",
        "Regenerate with `python tools/compile_report.py`; CI runs it with `--check`.",
        "",
        f"Toolchain: {tools}",
        "",
        "Each build is compiled for the archs whose launcher picks its config, and with the divisibility-16 hint",
        "the JIT gives at launch to the pointers and strides a spec declares aligned (vectorized, pipelined loads).",
        "Registers are per thread. Spill st/ld count STL/LDL (local-memory) instructions in the SASS;",
        "stack/local are bytes per thread; shared is dynamic (requested by Triton) plus static bytes per block.",
        "Loop spills count the STL/LDL inside innermost loops (found from backward branches in the SASS): those",
        "run once per MMA step, the others once per outer iteration or once per program.",
        "HGMMA is sm_90 warpgroup MMA (wgmma), with its MxNxK shapes under wgmma (widest N first), HMMA warp MMA",
        "(mma.sync); counts are static, not executed. Any spill in a spec marked hot fails CI, as does shared",
        f"memory over what the arch's GPUs let a block have ({limits}).",
        "",
    ]
    if not rows:
        return "\n".join([*intro, "No kernel module exposes `compile_specs()` yet.", ""])
    return "\n".join([*intro, markdown_table(rows), "", *hot_loop_summary(rows), ""])


def exit_status(rows: list[Row], allow_spills: bool) -> int:
    """1 when any build failed to compile, asks for more shared memory than its GPUs have, or spilled in a
    hot spec (unless spills are allowed)."""
    if any(row.error or row.over_shared_limit for row in rows):
        return 1
    if not allow_spills and any(row.spills and row.hot for row in rows):
        return 1
    return 0


def explain_failures(rows: list[Row], allow_spills: bool) -> None:
    for row in rows:
        where = f"{row.module}:{row.kernel}" + ("" if row.arch is None else f" on sm_{row.arch}")
        if row.error:
            print(f"FAIL {where}: {row.error}", file=sys.stderr)
        elif row.over_shared_limit:
            print(
                f"FAIL {where} [{row.config}, {row.num_warps} warps, {row.num_stages} stages]: {row.shared_bytes} B of "
                f"shared memory per block, over the {SHARED_LIMIT_BYTES[row.arch]} B the GPUs of sm_{row.arch} builds "
                "allow: it would not launch; use fewer stages or a smaller tile",
                file=sys.stderr,
            )
        elif row.spills and row.hot:
            verdict = "allowed by --allow-spills" if allow_spills else "FAIL"
            print(
                f"{verdict} {where} [{row.config}, {row.num_warps} warps]: spills in a hot kernel "
                f"({row.spill_stores} STL / {row.spill_loads} LDL, stack {row.stack_bytes} B, local "
                f"{row.local_bytes} B, {row.registers} registers; {row.loop_spills} of the STL/LDL inside an innermost "
                "loop): use a smaller tile or more warps",
                file=sys.stderr,
            )


def is_stale(path: Path, report: str) -> bool:
    """True when the committed report at ``path`` differs from ``report`` made by the same toolchain."""
    if not path.is_file():
        print(f"--check: {path} does not exist; run tools/compile_report.py and commit it", file=sys.stderr)
        return True
    committed = path.read_text()
    toolchain_line = next(line for line in report.splitlines() if line.startswith("Toolchain:"))
    if toolchain_line not in committed.splitlines():
        print(f"--check: {path} was made with another toolchain (now: {toolchain_line}); not compared", file=sys.stderr)
        return False
    if committed != report:
        print(f"--check: {path} is out of date; run tools/compile_report.py and commit it", file=sys.stderr)
        return True
    return False


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", choices=ARCHS, help="compute capability (repeatable)")
    parser.add_argument("--package", default=DEFAULT_PACKAGE, help="package searched for compile_specs()")
    parser.add_argument("--module", action="append", help="compile only this module's specs (repeatable)")
    default = DEFAULT_OUTPUT.relative_to(ROOT)
    parser.add_argument("--output", type=Path, help=f"markdown report path (default: {default}, on full runs only)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes")
    parser.add_argument("--check", action="store_true", help="do not write --output; fail if it is out of date")
    parser.add_argument("--allow-spills", action="store_true", help="report spills in hot kernels without failing")
    parser.add_argument("--require-specs", action="store_true", help="fail when no module exposes compile_specs()")
    return parser.parse_args(argv)


def report_path(args: argparse.Namespace) -> Path | None:
    """Where the report goes: ``--output``, else the committed report, which only a run over every
    module and arch of the default package may write or check (narrower runs just print)."""
    if args.output is not None:
        return args.output
    return None if args.module or args.arch or args.package != DEFAULT_PACKAGE else DEFAULT_OUTPUT


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.environ.pop("TRITON_INTERPRET", "0") not in ("", "0"):
        # must happen before any @triton.jit runs: interpreted functions cannot be compiled
        print("note: ignoring TRITON_INTERPRET: the report needs the real compiler", file=sys.stderr)
    archs = args.arch or list(ARCHS)

    if args.module:
        modules, rows = args.module, []
        missing = [name for name in modules if not hasattr(importlib.import_module(name), "compile_specs")]
        if missing:
            print(f"error: --module {', '.join(missing)}: no compile_specs() defined", file=sys.stderr)
            return 1
    else:
        modules, rows = discover_modules(args.package)
    jobs, spec_errors = collect_jobs(modules, archs)
    rows += spec_errors
    if not jobs and not rows:
        print(f"no module under {args.package} exposes compile_specs(); nothing to compile")
        if args.require_specs:
            print("error: --require-specs: no compile specs found", file=sys.stderr)
            return 2
    rows += compile_all(jobs, args.jobs)

    report = markdown_report(rows, toolchain())
    print(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        records = [dataclasses.asdict(row) | {"status": row.status, "spills": row.spills} for row in rows]
        args.json.write_text(json.dumps(records, indent=2) + "\n")
    stale, output = False, report_path(args)
    if output is None:
        print(f"note: a partial run (--module/--arch/--package) leaves {DEFAULT_OUTPUT} alone", file=sys.stderr)
    elif args.check:
        stale = is_stale(output, report)
    else:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(report)
    explain_failures(rows, args.allow_spills)
    return exit_status(rows, args.allow_spills) or int(stale)


if __name__ == "__main__":
    sys.exit(main())
