"""The package skeleton: cheap and layered imports, the env report, the CLI, the extension."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


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
