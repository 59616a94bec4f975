"""What every benchmark script shares: the environment record, timing, peak memory, packed
document lengths, and the results files (JSON + markdown table + PNG plot).

Timing: on a GPU, CUDA events around each run; on CPU, ``time.perf_counter``. Either way the
reported number is the median of ``repeats`` runs after ``warmup`` runs, each run on fresh
inputs from ``setup`` (made outside the timed region).

Peak memory of a block (:class:`PeakMemory`): on a GPU, ``torch.cuda.max_memory_allocated``
during the block minus what was allocated before it; on CPU, the growth of the process's
peak resident set (``VmHWM``) over the resident set before the block, after returning freed
heap to the OS (``malloc_trim``) and resetting the peak (``/proc/self/clear_refs``), so
earlier blocks do not hide or inflate it.

Results: ``<out>/<card>-<date>-<bench>.json`` holds ``bench``, ``title``, ``environment``,
``setup``, ``rows`` (one dict per measurement; a baseline that could not run says
``"not available"``, one that ran out of memory ``"OOM"``) and ``notes``; ``.md`` beside it
has the same as a table, ``.png`` the plot when matplotlib is installed.
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
NOT_AVAILABLE = "not available"
OOM = "OOM"


# ----------------------------------------------------------------------------- environment
def _gpu_driver() -> str:
    if shutil.which("nvidia-smi") is None:
        return "unknown (no nvidia-smi)"
    query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader",
             "-i", str(torch.cuda.current_device())]
    try:
        return subprocess.run(query, capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({type(exc).__name__})"


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def environment() -> dict:
    """Card (``"cpu"`` without a GPU), driver, library versions, machine (with its 1-minute load average
    when the results are written) and UTC time of the run."""
    gpu = torch.cuda.is_available()
    return {
        "card": torch.cuda.get_device_name() if gpu else "cpu",
        "driver": _gpu_driver() if gpu else "n/a",
        "cuda": torch.version.cuda or "n/a",
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "cpu cores": os.cpu_count(),
        "torch threads": torch.get_num_threads(),
        "load average": round(os.getloadavg()[0], 2),  # other jobs on the machine: CPU timings depend on it
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------- inputs
def document_lengths(total: int, layout: str = "packed", seed: int = 0, shortest: int = 64) -> list[int]:
    """``packed``: mixed document lengths (``shortest`` tokens to a quarter of ``total``) summing to
    ``total``; ``single``: one document of ``total`` tokens."""
    if layout == "single":
        return [total]
    if layout != "packed":
        raise ValueError(f"layout: expected 'packed' or 'single', got {layout!r}")
    gen = torch.Generator().manual_seed(seed)
    lengths, left = [], total
    while left > 0:
        n = min(left, int(torch.randint(shortest, max(shortest + 1, total // 4), (1,), generator=gen)))
        lengths.append(n)
        left -= n
    return lengths


# ----------------------------------------------------------------------------- timing
@contextmanager
def kernel_backend(name: str) -> Iterator[None]:
    """``QWENLONG_BACKEND=name`` inside the block, restored after it: a path chosen for one measurement must not
    carry over to the next (a later benchmark in the same process would time the wrong kernels)."""
    previous = os.environ.get("QWENLONG_BACKEND")
    os.environ["QWENLONG_BACKEND"] = name
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("QWENLONG_BACKEND", None)
        else:
            os.environ["QWENLONG_BACKEND"] = previous


def time_ms(run: Callable[..., object], *, setup: Callable[[], Sequence] | None = None, device: str = "cpu",
            warmup: int = 1, repeats: int = 5) -> float:
    """Median milliseconds of ``run(*setup())`` over ``repeats`` runs after ``warmup`` runs."""
    cuda = torch.device(device).type == "cuda"
    times = []
    for i in range(warmup + repeats):
        args = setup() if setup is not None else ()
        if cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            run(*args)
            stop.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(stop)
        else:
            begin = time.perf_counter()
            run(*args)
            elapsed = (time.perf_counter() - begin) * 1e3
        del args  # freed before setup() makes the next run's inputs: never two runs' inputs at once
        if i >= warmup:
            times.append(elapsed)
    return statistics.median(times)


# ----------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _release_cpu_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: freed heap may stay resident and hide some growth
        pass


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.mib``: the block's peak extra memory
    (see the module docstring for how it is measured on each device)."""

    def __init__(self, device: str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.mib: float | None = None

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self._before = torch.cuda.memory_allocated()
        else:
            _release_cpu_memory()
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
            self._before = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _status_kib("VmHWM") * 1024
        self.mib = round((peak - self._before) / 2**20, 1)


def memory_method(device: str) -> str:
    """One line saying what :class:`PeakMemory` measures on ``device``, for the results' setup."""
    if torch.device(device).type == "cuda":
        return "torch.cuda.max_memory_allocated during the op minus memory allocated before it"
    return "peak resident set (VmHWM) growth during the op, after malloc_trim and a VmHWM reset"


# ----------------------------------------------------------------------------- results
def card_slug(card: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")


def results_stem(bench: str, env: dict) -> str:
    return f"{card_slug(env['card'])}-{env['date'][:10]}-{bench}"


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    columns = list(columns or dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def to_markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# {result['title']}", "",
             f"{env['card']} (driver {env['driver']}, CUDA {env['cuda']}), torch {env['torch']}, "
             f"triton {env['triton']}, transformers {env['transformers']}, {env['cpu cores']} CPU cores"
             + (f" (load average {env['load average']})" if "load average" in env else "") + f", {env['date']}", ""]
    lines += [f"- {key}: {value}" for key, value in result["setup"].items()]
    lines += ["", markdown_table(result["rows"], result.get("columns"))]
    for name, table in result.get("tables", {}).items():
        lines += ["", f"## {name}", "", markdown_table(table)]
    if result.get("notes"):
        lines += [""] + [f"- {note}" for note in result["notes"]]
    if result.get("plot"):
        lines += ["", f"![{result['title']}]({result['plot']})"]
    return "\n".join(lines) + "\n"


def write_results(bench: str, title: str, rows: list[dict], *, setup: dict, out_dir: Path | str = RESULTS_DIR,
                  env: dict | None = None, notes: Iterable[str] = (), tables: dict[str, list[dict]] | None = None,
                  columns: Sequence[str] | None = None, plot: dict | None = None) -> Path:
    """Write ``<stem>.json`` and ``<stem>.md`` (and ``<stem>.png`` when ``plot`` is given and matplotlib
    imports) under ``out_dir``; ``plot`` holds :func:`plot_vs_length`'s keyword arguments. Returns the
    JSON path."""
    env = env or environment()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = results_stem(bench, env)
    result = {"bench": bench, "title": title, "environment": env, "setup": setup, "rows": rows,
              "notes": list(notes)}
    if columns:
        result["columns"] = list(columns)
    if tables:
        result["tables"] = tables
    if plot is not None and plot_vs_length(rows, out_dir / f"{stem}.png", title=title, **plot):
        result["plot"] = f"{stem}.png"
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    markdown = to_markdown(result)
    (out_dir / f"{stem}.md").write_text(markdown)
    print(markdown, flush=True)
    return out_dir / f"{stem}.json"


def plot_vs_length(rows: Sequence[dict], path: Path, *, x: str, series: Sequence[str], metrics: Sequence[str],
                   title: str = "") -> bool:
    """One panel per metric (e.g. tokens/s, peak MiB) against ``x`` (context length), one line per
    distinct value of the ``series`` columns (ours and each baseline), log-log; rows whose value is not
    a number are left out. Returns False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        labels = [", ".join(str(row.get(key, "")) for key in series) for row in rows]
        for name in dict.fromkeys(labels):
            points = sorted((row[x], row[metric]) for row, label in zip(rows, labels, strict=True) if label == name
                            and isinstance(row.get(metric), (int, float)) and isinstance(row.get(x), (int, float)))
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=str(name))
        ax.set(xlabel=x, ylabel=metric, xscale="log", yscale="log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def load_results(directory: Path | str = RESULTS_DIR) -> list[dict]:
    """Every results JSON under ``directory`` (written by :func:`write_results`), newest date first."""
    results = [json.loads(p.read_text()) for p in sorted(Path(directory).glob("*.json"))]
    return sorted((r for r in results if "bench" in r), key=lambda r: (r["bench"], r["environment"]["date"]),
                  reverse=True)
