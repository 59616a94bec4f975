"""qwenlong plan: what the run's settings change in the plan (the KL reference, PPO epochs, the attention
implementation, the host's RAM shared by CPU processes), argument mistakes reported as errors (exit status 2,
one line) rather than verdicts, and the numbers docs/plan.md quotes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qwenlong.config import ConfigError, load_config
from qwenlong.plan import make_plan
from qwenlong.plan.hardware import GPUS, GiB

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
L1_32B, L15, TINY = CONFIGS / "qwenlong-l1-32b.yaml", CONFIGS / "qwenlong-l1.5.yaml", CONFIGS / "tiny.yaml"
# the 7B run of the review's reproduction: ZeRO-2, vLLM, one 16K-token phase
SEVEN_B = ["model.tiny=null", "model.name=Qwen/Qwen2.5-7B", "model.dtype=bfloat16", "model.gradient_checkpointing=true",
           "distributed.deepspeed_stage=2", "sft.enabled=false", "eval.enabled=false", "rollout.engine=vllm",
           "rl.micro_batch_token_budget=16384", "rl.overlong.enabled=false",
           "rl.phases=[{name: a, steps: 1, max_input_tokens: 8000, max_output_tokens: 8000}]"]


def _part(plan, label):
    return next((p for p in plan.parts if p.label == label), None)


def _lines(lines):
    return {line.label: line.bytes for line in lines}


# ----------------------------------------------------------------------------- the KL reference policy


def _frozen_copy_bytes(dtype: str) -> tuple[int, int]:
    """(bytes of the policy's parameters, bytes of the KL reference the trainer builds from it): the tiny preset's
    model as transformers builds it, and ``TrainingBackend.frozen_copy()``, what ``GRPOTrainer.set_reference``
    keeps (``DeepSpeedBackend`` under stages 1-2 returns the same copy; ZeRO-3 refuses KL)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from qwenlong.distributed.backend import TrainingBackend

    t = load_config(TINY).model.tiny
    config = Qwen2Config(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                         num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                         num_key_value_heads=t.num_key_value_heads, tie_word_embeddings=t.tie_word_embeddings)
    policy = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    reference = TrainingBackend(policy).frozen_copy()

    def storages(model):
        return {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}

    mine, copied = storages(policy), storages(reference)
    assert not set(mine) & set(copied)  # a copy: no storage shared with the policy
    assert {p.device for p in reference.parameters()} == {next(policy.parameters()).device}
    assert {p.dtype for p in reference.parameters()} == {getattr(torch, dtype)}
    return sum(mine.values()), sum(copied.values())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kl_reference_raises_both_rl_peaks_by_the_frozen_copy_the_trainer_keeps(dtype):
    """With rl.kl_coef > 0 the trainer holds a whole frozen copy of the policy beside it through RL: both RL
    peaks (training and generating, HF or vLLM engine) rise by exactly that copy's bytes, as built here, under
    ZeRO 0-2, with the optimizer offloaded or not; SFT's peak does not move."""
    policy_bytes, reference_bytes = _frozen_copy_bytes(dtype)
    assert reference_bytes == policy_bytes
    for setting in (["distributed.deepspeed_stage=0"], ["distributed.deepspeed_stage=1"],
                    ["distributed.deepspeed_stage=2", "rollout.engine=vllm"],
                    ["distributed.deepspeed_stage=2", "distributed.offload_optimizer=true"]):
        without, with_kl = (make_plan(load_config(TINY, [f"model.dtype={dtype}", *setting, f"rl.kl_coef={kl}"]), 2,
                                      "h100-80gb") for kl in (0, 0.001))
        assert with_kl.rl.train_bytes - without.rl.train_bytes == reference_bytes, setting
        assert with_kl.rl.generate_bytes - without.rl.generate_bytes == reference_bytes, setting
        assert with_kl.sft.train_bytes == without.sft.train_bytes, setting
        assert _lines(with_kl.rl.train)["KL reference weights"] == reference_bytes


def test_kl_reference_costs_one_more_forward_per_step():
    """``GRPOTrainer._old_logprobs`` runs the reference over the same batches as the old policy: the step gains
    exactly one more old-log-prob forward, and the 7B run of the review (ZeRO-2, 16K tokens) no longer plans
    identically with and without KL."""
    without = make_plan(load_config(TINY, SEVEN_B), 8, "h100-80gb")
    with_kl = make_plan(load_config(TINY, [*SEVEN_B, "rl.kl_coef=0.001"]), 8, "h100-80gb")
    old = _part(with_kl, "old log-probs")
    assert _part(without, "reference log-probs") is None
    assert _part(with_kl, "reference log-probs").seconds == old.seconds == _part(without, "old log-probs").seconds
    for end in (0, 1):
        total = [sum(p.seconds[end] for p in plan.parts) for plan in (without, with_kl)]
        assert total[1] - total[0] == pytest.approx(old.seconds[end], rel=1e-9)
    assert with_kl.rl.train_bytes - without.rl.train_bytes == with_kl.shape.params * 2  # P x bf16 bytes
    out = [subprocess.run([sys.executable, "-m", "qwenlong", "plan", "--config", str(TINY), "--gpus", "8",
                           *SEVEN_B, *kl], capture_output=True, text=True, timeout=60).stdout
           for kl in ([], ["rl.kl_coef=0.001"])]
    assert out[0] != out[1] and "KL reference weights" in out[1] and "reference log-probs" in out[1]


# ----------------------------------------------------------------------------- PPO epochs


def test_ppo_epochs_repeat_the_training_passes_not_the_old_logprobs():
    """``GRPOTrainer.update`` computes the old log-probs once, then trains ``rl.ppo_epochs`` times over the
    batch: the train part scales with the epochs, the rest of the step does not; under ZeRO-3 every epoch's
    passes gather the parameters again (one forward, then three passes per epoch with checkpointing)."""
    one, three = (make_plan(load_config(TINY, [*SEVEN_B, f"rl.ppo_epochs={n}"]), 8, "h100-80gb") for n in (1, 3))
    for end in (0, 1):
        assert _part(three, "train").seconds[end] == pytest.approx(3 * _part(one, "train").seconds[end], rel=1e-9)
        assert _part(three, "old log-probs").seconds == _part(one, "old log-probs").seconds
        total = [sum(p.seconds[end] for p in plan.parts) for plan in (one, three)]
        assert total[1] - total[0] == pytest.approx(2 * _part(one, "train").seconds[end], rel=1e-9)
    one, three = (make_plan(load_config(L1_32B, [f"rl.ppo_epochs={n}"]), 32, "h100-80gb") for n in (1, 3))
    gathers = [_part(plan, "ZeRO-3 parameter gathers") for plan in (one, three)]
    assert gathers[1].seconds[1] == pytest.approx(gathers[0].seconds[1] * (1 + 3 * 3) / (1 + 3), rel=1e-9)


# ----------------------------------------------------------------------------- attention implementations


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_an_attention_the_planner_does_not_model_is_refused_by_name(attention):
    """eager (heads x T x T probabilities per layer) and sdpa (PyTorch's choice of kernel for a T x T mask)
    are refused naming model.attention, in one line, exit status 2; under Ulysses SP every layer runs our
    attention whatever model.attention says, so the 32B preset (SP 8) plans as with ``qwenlong``."""
    cfg = load_config(TINY, [*SEVEN_B, f"model.attention={attention}"])
    with pytest.raises(ConfigError, match=rf"^model.attention: '{attention}' .* does not model"):
        make_plan(cfg, 8, "h100-80gb")
    out = subprocess.run([sys.executable, "-m", "qwenlong", "plan", "--config", str(TINY), "--gpus", "8", *SEVEN_B,
                          f"model.attention={attention}"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    assert re.fullmatch(rf"qwenlong plan: error: model.attention: '{attention}' [^\n]*\n", out.stderr), out.stderr
    ours = make_plan(load_config(L1_32B), 32, "h100-80gb")
    theirs = make_plan(load_config(L1_32B, [f"model.attention={attention}"]), 32, "h100-80gb")
    assert theirs.rl.train == ours.rl.train and theirs.verdict() == ours.verdict()


def test_eager_refusal_states_the_probabilities_one_layer_keeps():
    """At 16,384 tokens a 28-head bf16 layer keeps 28 x 16384^2 x (4 + 2) bytes of probabilities (fp32 softmax
    output, bf16 copy): 42 GiB, which the message says."""
    with pytest.raises(ConfigError, match=r"16,384 tokens per micro-batch: 42\.0 GiB"):
        make_plan(load_config(TINY, [*SEVEN_B, "model.attention=eager"]), 8, "h100-80gb")


def _triton_backward_peak(deterministic: bool, dtype, tokens: int = 256, heads: int = 4, kv_heads: int = 2,
                          head_dim: int = 32) -> int:
    """Peak bytes that ``_triton_backward`` allocates (dq, dk, dv, delta; the fp32 dq and its cast on the atomic
    path), its kernels not launched: the buffers are the code's own, the arithmetic is not needed."""
    import torch
    from test_plan import _live_bytes_mode

    import qwenlong.kernels.attention.varlen as varlen

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    q = torch.randn(tokens, heads, head_dim).to(dtype)
    k, v = (torch.randn(tokens, kv_heads, head_dim).to(dtype) for _ in range(2))
    out, do, lse = torch.randn_like(q), torch.randn_like(q), torch.randn(heads, tokens)
    cu = torch.tensor([0, tokens // 3, tokens], dtype=torch.int32)
    plan = varlen.batch_plan(cu, cu, tokens, tokens)
    mode = _live_bytes_mode([q, k, v, out, do, lse, cu])
    kernels = {name: getattr(varlen, name) for name in ("_attn_bwd_delta", "_attn_bwd_dkdv", "_attn_bwd_dq")}
    try:
        for name in kernels:
            setattr(varlen, name, NoLaunch())
        with mode:
            varlen._triton_backward(do, None, q, k, v, out, lse, cu, cu, plan, 0.1, (-1, 0), deterministic)
    finally:
        for name, kernel in kernels.items():
            setattr(varlen, name, kernel)
    return mode.peak


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32"])
def test_atomic_attention_backward_buffers_match_the_plan(dtype_name):
    """``model.attention: qwenlong_atomic`` adds dq into a zeroed fp32 buffer and casts it at the end: the
    planner's attention workspace on a GPU against the buffers ``_triton_backward`` allocates, both variants
    (bf16: 4 bytes per dq element more; fp32: the buffer is dq itself), within 1%."""
    import torch

    from qwenlong.plan.memory import attention_workspace_bytes
    from qwenlong.plan.models import ModelShape

    dtype = getattr(torch, dtype_name)
    shape = ModelShape(name="layer", layers=1, hidden=128, intermediate=256, heads=4, kv_heads=2, head_dim=32,
                       vocab=64)
    for deterministic in (True, False):
        measured = _triton_backward_peak(deterministic, dtype)
        planned = attention_workspace_bytes(shape, 256, dtype.itemsize, 1, 256, cuda=True,
                                            atomic=not deterministic)
        assert abs(planned - measured) / measured < 0.01, (deterministic, planned, measured)
    if dtype == torch.bfloat16:
        atomic = make_plan(load_config(TINY, [*SEVEN_B, "model.attention=qwenlong_atomic"]), 8, "h100-80gb")
        assert atomic.rl.train_bytes >= make_plan(load_config(TINY, SEVEN_B), 8, "h100-80gb").rl.train_bytes


# ----------------------------------------------------------------------------- CPU processes share the RAM


def test_cpu_plan_and_preflight_give_each_process_the_same_share_of_ram(monkeypatch):
    """``qwenlong plan --gpu cpu --gpus 4`` and the pre-flight check of a 4-process CPU run compare a process's
    peak with the same quarter of the RAM: with RAM twice that peak both say it does not fit, in the same words
    (the plan used to offer each process all the RAM)."""
    import torch

    import qwenlong.plan.hardware as hardware
    from qwenlong.plan.preflight import preflight

    cfg = load_config(TINY)
    plan = make_plan(cfg, 4, "cpu")
    peak = max(plan.rl.train_bytes, plan.rl.generate_bytes, plan.sft.train_bytes)
    real_sysconf = os.sysconf
    monkeypatch.setattr(hardware.os, "sysconf", lambda name: {"SC_PHYS_PAGES": 2 * peak // 4096,
                                                              "SC_PAGE_SIZE": 4096}.get(name) or real_sysconf(name))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    plan = make_plan(cfg, 4, "cpu")
    assert plan.device.memory_bytes == 2 * peak // 4096 * 4096 // 4
    assert not plan.fits
    assert preflight(cfg, world_size=4) == plan.verdict()
    assert make_plan(cfg, 1, "cpu").fits and preflight(cfg, world_size=1) is None


# ----------------------------------------------------------------------------- argument mistakes: exit 2, one line


SIZES = '"num_hidden_layers": 2, "hidden_size": 64, "vocab_size": 100, "intermediate_size": 128'
# case: (the arguments, or a local config.json's text to point model.name at; what the error line must say)
MISTAKES = {
    "gpus 0": (["--gpus", "0"], "--gpus: must be >= 1, got 0"),
    "gpus -2": (["--gpus", "-2"], "--gpus: must be >= 1, got -2"),
    "gpus 12": (["--gpus", "12"], "--gpus: 12 is not a multiple of distributed.sp_size (8)"),
    "unknown model": (["--gpus", "32", "model.name=foo/bar"], "model.name: 'foo/bar' is neither"),
    "config.json without heads": ("{" + SIZES + "}", "config.json has no num_attention_heads"),
    "config.json not JSON": ("{" + SIZES, "config.json is not a readable JSON file"),
    "config.json heads as text": ("{" + SIZES + ', "num_attention_heads": "4"}',
                                  "config.json: num_attention_heads must be a whole number >= 1, got '4'"),
    "config.json kv heads": ("{" + SIZES + ', "num_attention_heads": 4, "num_key_value_heads": 3}',
                             "config.json: kv_heads: 3 must divide heads (4)"),
}


@pytest.mark.parametrize("case", list(MISTAKES))
def test_argument_mistakes_are_one_line_errors_with_exit_2(case, tmp_path, capsys):
    """A mistake in the arguments is an error naming the argument (exit status 2, as for a bad config key), not
    a traceback with exit status 1, which means "does not fit"."""
    from qwenlong.cli import main

    args, expected = MISTAKES[case]
    if isinstance(args, str):  # a local model folder whose config.json holds this text
        (tmp_path / "config.json").write_text(args)
        args, expected = ["--gpus", "32", f"model.name={tmp_path}"], f"model.name: {tmp_path}/{expected}"
    assert main(["plan", "--config", str(L1_32B), *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("qwenlong plan: error: ")
    assert expected in err, err


def test_an_argument_mistake_exits_2_from_the_command_line():
    out = subprocess.run([sys.executable, "-m", "qwenlong", "plan", "--config", str(L1_32B), "--gpus", "12"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stdout == "" and "Traceback" not in out.stderr
    assert out.stderr.startswith("qwenlong plan: error: --gpus: 12")


# ----------------------------------------------------------------------------- docs/plan.md's numbers


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def _doc_row(preset: str) -> list[str]:
    doc = (ROOT / "docs" / "plan.md").read_text()
    [row] = [line for line in doc.splitlines() if line.startswith(f"| `{preset}` |")]
    return [cell.strip() for cell in row.strip("|").split("|")]


@pytest.mark.parametrize("preset", [L1_32B, L15])
def test_the_presets_table_of_docs_plan_md_is_what_the_planner_prints(preset):
    """The row of each preset (32 x H100-80GB) quotes the planner's own numbers: training and generation
    peaks, the step's range and the 120K throughput, as ``qwenlong plan`` prints them."""
    plan = make_plan(load_config(preset), 32, "h100-80gb")
    _, verdict, train, generate, step, throughput = _doc_row(preset.name)
    assert plan.fits and verdict.startswith("fits")
    assert train == _gib(plan.rl.train_bytes) and generate == _gib(plan.rl.generate_bytes)
    fast, slow = (sum(p.seconds[end] for p in plan.parts) for end in (0, 1))
    assert step == f"{fast:,.0f}..{slow:,.0f} s"
    rates = [re.search(r"(\S+\.\.\S+) tokens/s", line).group(1) for line in plan.throughput]
    assert throughput == f"train {rates[0]} / GPU; decode {rates[1]} / engine"


def test_the_numbers_docs_plan_md_quotes_in_its_text_are_what_the_planner_prints():
    """The 32B preset's variants the text discusses (no sleep, the optimizer on the GPU, 12,000 tokens,
    gpu_memory_utilization 0.9) and the published setups' rows, against the planner."""
    doc = " ".join((ROOT / "docs" / "plan.md").read_text().split())

    def plan(overrides, config=L1_32B, gpus=32):
        return make_plan(load_config(config, overrides), gpus, "h100-80gb")

    awake = plan(["rollout.sleep_between_phases=false"])
    awake_state = plan(["rollout.sleep_between_phases=false", "distributed.offload_optimizer=false"])
    over = plan(["rollout.sleep_between_phases=false", "distributed.offload_optimizer=false",
                 "rl.micro_batch_token_budget=12000"])
    assert awake.fits and awake_state.fits and not over.fits
    assert "rollout.sleep_between_phases=true" in over.verdict()
    for quoted in (f"Without sleep the idle engine keeps 0.6 of each GPU through training: "
                   f"{_gib(awake.rl.train_bytes)}",
                   f"with the optimizer on the GPU as well, {_gib(awake_state.rl.train_bytes)}",
                   f"just under the {_gib(GPUS['h100-80gb'].memory_bytes)} of an H100",
                   f"at 12,000 tokens per rank it is over ({_gib(over.rl.train_bytes)})"):
        assert quoted in doc, quoted
    kl = plan(["distributed.deepspeed_stage=2", "distributed.offload_params=false", "rl.kl_coef=0.001"])
    assert f"policy to both peaks ({_gib(_lines(kl.rl.train)['KL reference weights'])} for 32B)" in doc
    base = plan([])
    assert f"an engine holds KV for {round(base.rl.kv_capacity_tokens / 1000)}K tokens" in doc
    wide = plan(["rollout.gpu_memory_utilization=0.9"])
    fast, slow = (sum(p.seconds[end] for p in wide.parts) for end in (0, 1))
    assert f"KV for {round(wide.rl.kv_capacity_tokens / 1000)}K tokens), which the planner puts at " \
           f"{fast:,.0f}..{slow:,.0f} s a step" in doc
    b = ["model.tiny=null", "model.dtype=bfloat16", "model.gradient_checkpointing=true",
         "distributed.deepspeed_stage=3", "distributed.offload_optimizer=true", "distributed.offload_params=true",
         "eval.enabled=false"]
    alst = plan([*b, "model.name=meta-llama/Llama-3.1-8B", "rl.enabled=false", "sft.token_budget=500000",
                 "sft.max_seq_len=500000"], config=TINY, gpus=1)
    assert not alst.fits and f"does not fit: {_gib(alst.sft.train_bytes)} at 500K" in doc
    assert re.search(r"sft\.token_budget=(\d+)", alst.verdict()).group(0) in doc
    unsloth = plan([*b, "model.name=Qwen/Qwen3-8B", "sft.enabled=false", "rl.micro_batch_token_budget=110000",
                    "rl.phases=[{name: a, steps: 1, max_input_tokens: 10000, max_output_tokens: 100000}]",
                    "rl.gen_prompts_per_step=1", "rl.train_prompts_per_step=1", "rl.mini_batch_size=1",
                    "rl.group_size=4", "rollout.engine=vllm", "rollout.gpu_memory_utilization=0.9"],
                   config=TINY, gpus=1)
    assert unsloth.fits
    assert f"fits, {_gib(unsloth.rl.train_bytes)} training" in doc
    assert f"{_gib(unsloth.rl.generate_bytes)} generating" in doc
