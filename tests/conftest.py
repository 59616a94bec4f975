"""Test set-up: without a GPU, Triton kernels run under the CPU interpreter.

``TRITON_INTERPRET=1`` must be set before any ``@triton.jit`` function is defined, so it is
set here, at import time, before tests import qwenlong.kernels. The interpreter's bf16
arithmetic is wrong (it computes on the raw uint16 bits) and it cannot run descriptor reductions; the fixes from
``qwenlong.kernels.utils.interpreter`` are installed for the whole session.

Where pytest-xdist is installed (the ``dev`` extra), a plain ``pytest`` spreads the tests over the
machine's cores (``helpers.auto_test_workers``; ``-n N`` or ``-n 0`` chooses otherwise).
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import auto_test_workers, free_tcp_port

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from qwenlong.kernels.utils.interpreter import install_interpreter_fixes  # noqa: E402

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    install_interpreter_fixes()

DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """Without ``-n``, run on ``-n auto`` with work stealing (the test durations range from milliseconds to a
    minute). Runs before xdist's own hook reads the option; not in xdist's workers, with ``--pdb`` or
    ``--collect-only``, or without pytest-xdist."""
    if not config.pluginmanager.hasplugin("xdist") or hasattr(config, "workerinput"):
        return
    option = config.option
    if option.numprocesses is None and not option.usepdb and not option.collectonly:
        option.numprocesses = "auto"
        if option.dist == "no":
            option.dist = "worksteal"


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """``-n auto``: ``helpers.auto_test_workers()``, unless ``PYTEST_XDIST_AUTO_NUM_WORKERS`` says otherwise."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # xdist's own implementation reads it
    return auto_test_workers()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> str:
    """Where kernel tests put their tensors: 'cuda' with a GPU, else 'cpu' (interpreter)."""
    return DEVICE


@pytest.fixture
def free_port() -> int:
    """A free loopback TCP port for a gloo process group's rendezvous."""
    return free_tcp_port()


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch) -> str:
    """Each kernel path in turn, through ``QWENLONG_BACKEND``: the chunked PyTorch one and the Triton kernels
    (under the CPU interpreter without a GPU). A test that parametrizes ``backend`` itself overrides this."""
    monkeypatch.setenv("QWENLONG_BACKEND", request.param)
    return request.param


@pytest.fixture(scope="module")
def qwen():
    """The Qwen tokenizer, loaded once per test module."""
    from qwenlong.data import load_qwen_tokenizer

    return load_qwen_tokenizer()
