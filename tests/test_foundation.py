"""The package skeleton: cheap and layered imports, the env report, the CLI, the extension."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import auto_test_workers


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_kernels_import_stays_in_its_layer():
    code = (
        "import sys, qwenlong.kernels as k\n"
        "for name in k.__all__: getattr(k, name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'deepspeed', 'vllm')\n"
        "             or m.startswith(('qwenlong.trainers', 'qwenlong.rollout', 'qwenlong.rewards',\n"
        "                              'qwenlong.data', 'qwenlong.eval', 'qwenlong.cli', 'qwenlong.config',\n"
        "                              'qwenlong.integrations')))\n"
        "print(','.join(bad))\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"qwenlong.kernels pulled in: {result.stdout.strip()}"


CHECKOUT = Path(__file__).resolve().parents[1]


def _run_in_checkout(code: str, *options: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    """``code`` run by a Python started in the checkout's root, which is first on its sys.path."""
    env = {**os.environ, "PYTHONPATH": str(pythonpath) if pythonpath else ""}
    return subprocess.run([sys.executable, *options, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=CHECKOUT, env=env)  # fmt: skip


@pytest.mark.parametrize("ours_first", [True, False])
def test_checkout_root_does_not_shadow_another_kernels_package(tmp_path, ours_first):
    """Started in a checkout, ``import kernels`` gets the installed package of that name (transformers >= 5.25
    imports one), submodules included, and ``qwenlong.kernels`` is still ours, whichever is imported first."""
    other = tmp_path / "kernels"
    other.mkdir()
    (other / "__init__.py").write_text("ORIGIN = 'the other package'\n")
    (other / "layers.py").write_text("from . import ORIGIN as PARENT\n")
    imports = ["import qwenlong.kernels", "import kernels.layers"]
    code = "; ".join(imports if ours_first else imports[::-1])
    code += "; import kernels; print(kernels.ORIGIN, '|', kernels.layers.PARENT, '|', qwenlong.kernels.__file__)"
    result = _run_in_checkout(code, pythonpath=tmp_path)
    assert result.returncode == 0, result.stderr
    origin, parent, ours = (part.strip() for part in result.stdout.split("|"))
    assert origin == parent == "the other package"
    assert Path(ours).resolve() == CHECKOUT / "kernels" / "__init__.py"


def test_checkout_kernels_folder_is_not_a_top_level_package():
    """With no other ``kernels`` installed (``-S``: no site-packages), that name from a checkout is an empty
    namespace, as a folder without ``__init__.py`` would be (none of our ops under it, no file)."""
    code = ("import kernels; print(getattr(kernels, '__file__', None), kernels.__path__)\n"
            "from kernels import linear_logprobs")  # fmt: skip
    result = _run_in_checkout(code, "-S")
    assert result.stdout.split() == ["None", "[]"]
    assert result.returncode != 0
    assert "ImportError: cannot import name 'linear_logprobs' from 'kernels'" in result.stderr


def test_transformers_imports_from_a_checkout():
    """The real transformers, imported and run in a Python started in the checkout (where our kernels/ folder
    would answer to the name of the package transformers >= 5.25 imports)."""
    code = (
        "import qwenlong.kernels, transformers\n"
        "config = transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1,\n"
        "                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=64)\n"
        "model = transformers.AutoModelForCausalLM.from_config(config)\n"
        "import torch\n"
        "print(tuple(model(torch.tensor([[1, 2, 3]])).logits.shape))\n"
    )
    result = _run_in_checkout(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(1, 3, 64)"


def _pytest_in_checkout(*options: str) -> subprocess.CompletedProcess:
    """A plain ``pytest`` on one cheap test of this file, started in the checkout's root."""
    env = {name: value for name, value in os.environ.items()
           if name not in ("PYTEST_ADDOPTS", "PYTEST_XDIST_AUTO_NUM_WORKERS")}  # fmt: skip
    return subprocess.run([sys.executable, "-m", "pytest", "tests/test_foundation.py::test_unknown_attribute_errors",
                           "-p", "no:cacheprovider", *options], capture_output=True, text=True, timeout=300,
                          cwd=CHECKOUT, env=env)  # fmt: skip


def test_plain_pytest_spreads_over_the_cores():
    """The README's ``pytest`` runs on one xdist worker per core (at most 8, so a big machine does not run out of
    memory); ``-n 0`` keeps one process, and without the plugin the suite's set-up still loads."""
    pytest.importorskip("xdist")
    workers = auto_test_workers()
    spread = _pytest_in_checkout()
    assert spread.returncode == 0, spread.stdout[-3000:] + spread.stderr[-3000:]
    assert f"created: {workers}/{workers} worker" in spread.stdout, spread.stdout[-3000:]
    for options in (["-n", "0"], ["-p", "no:xdist"]):
        alone = _pytest_in_checkout(*options)
        assert alone.returncode == 0 and "1 passed" in alone.stdout, (options, alone.stdout[-3000:] + alone.stderr)
        assert "created:" not in alone.stdout, options


def test_import_qwenlong_is_cheap():
    result = _run_python("import sys, qwenlong; print('torch' in sys.modules, 'transformers' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


def test_unknown_attribute_errors():
    import qwenlong
    import qwenlong.kernels

    with pytest.raises(AttributeError):
        qwenlong.no_such_thing  # noqa: B018
    with pytest.raises(AttributeError):
        qwenlong.kernels.no_such_op  # noqa: B018


def test_cpp_extension_is_built():
    from qwenlong import _C

    assert _C.host is not None, _C.host_error
    assert _C.host.abi_version == 1


@pytest.mark.parametrize("command", [["-m", "qwenlong.env", "--json"], ["-m", "qwenlong", "env", "--json"]])
def test_env_report(command):
    import torch

    result = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    backends = info["backends"]
    assert backends["cpu_torch"]["available"] is True
    assert backends["cpp_extension"]["available"] is True
    assert backends["triton_interpreter"]["available"] is True
    assert backends["triton_gpu"]["available"] is torch.cuda.is_available()
    assert info["versions"]["torch"] in (torch.__version__, torch.__version__.split("+")[0])


def test_env_report_text():
    from qwenlong import env

    text = env.format_report(env.collect())
    for label in ("Triton on GPU", "Triton interpreter", "CUDA extension", "C++ extension", "CPU path"):
        assert label in text


def test_cli_rejects_unknown_command(capsys):
    from qwenlong.cli import main

    with pytest.raises(SystemExit):
        main(["no-such-command"])
    assert "invalid choice" in capsys.readouterr().err


def test_backend_selection(monkeypatch):
    import torch

    from qwenlong.kernels import backend

    monkeypatch.setenv(backend.ENV_VAR, "torch")
    assert backend.select_backend(torch.device("cpu")) == "torch"
    monkeypatch.setenv(backend.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="QWENLONG_BACKEND"):
        backend.select_backend(torch.device("cpu"))
    monkeypatch.setenv(backend.ENV_VAR, "cuda")
    with pytest.raises(RuntimeError, match="no CUDA-extension path"):
        backend.select_backend(torch.device("cpu"))
    monkeypatch.delenv(backend.ENV_VAR)
    expected = "triton" if backend.interpreter_enabled() else "torch"
    assert backend.select_backend(torch.device("cpu")) == expected


@pytest.mark.parametrize("value,interpreted", [("1", True), ("yes", True), ("false", False), ("off", False),
                                               ("0", False)])
def test_triton_interpret_is_read_as_triton_reads_it(value, interpreted):
    """``TRITON_INTERPRET=false`` means compiled kernels to Triton: CPU tensors must then take the PyTorch path
    (they were sent to the GPU-compiled kernels, and every op failed with "0 active drivers")."""
    pytest.importorskip("triton")
    script = ("import torch\n"
              "from qwenlong.kernels import linear_logprobs\n"
              "from qwenlong.kernels.backend import interpreter_enabled, select_backend\n"
              "h, w = torch.randn(3, 8), torch.randn(5, 8)\n"
              "logp = linear_logprobs(h, w, torch.tensor([1, 2, 3]))\n"
              "print(interpreter_enabled(), select_backend(torch.device('cpu')), bool(logp.isfinite().all()))\n")
    env = {**os.environ, "TRITON_INTERPRET": value}
    env.pop("QWENLONG_BACKEND", None)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [str(interpreted), "triton" if interpreted else "torch", "True"]


@pytest.mark.parametrize("capability,table", [((9, 0), 90), ((8, 0), 80), ((8, 9), 80), ((10, 0), 80)])
def test_tile_table_follows_the_gpu_generation(capability, table, monkeypatch):
    import torch

    from qwenlong.kernels import backend

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.version, "hip", None)
    assert backend.tile_table(torch.device("cuda", 0)) == table
    assert backend.tile_table(torch.device("cpu")) == 80  # the interpreter
    monkeypatch.setattr(torch.version, "hip", "6.2")  # ROCm reports gfx versions as capabilities
    assert backend.tile_table(torch.device("cuda", 0)) == 80


def test_lm_head_auto_takes_the_cuda_extension_on_a_gpu_where_it_is_built(monkeypatch):
    """``auto`` runs the fused LM-head ops on the CUDA extension where it was built (it was 2.4x faster than the
    Triton kernels on an H200), else on the Triton kernels; an explicit choice and CPU tensors are left alone."""
    import torch

    from qwenlong.kernels import backend
    from qwenlong.kernels.logprobs import cuda_backend
    from qwenlong.kernels.logprobs.linear_logprobs import logprob_backend

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    monkeypatch.setattr(cuda_backend, "available", lambda: True)
    assert logprob_backend(gpu) == "cuda"
    assert logprob_backend(cpu) == ("triton" if backend.interpreter_enabled() else "torch")
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    assert logprob_backend(gpu) == "triton"
    monkeypatch.delenv(backend.ENV_VAR)
    monkeypatch.setattr(cuda_backend, "available", lambda: False)
    assert logprob_backend(gpu) == "triton"
