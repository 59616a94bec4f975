"""Typed YAML configs: presets load, bad keys and types name the key path, overrides apply."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import yaml

from qwenlong.config import (
    Config,
    ConfigError,
    apply_override,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)
from qwenlong.curriculum import Phase

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRESETS = sorted(CONFIGS.glob("*.yaml"))

MINIMAL = {
    "model": {"tiny": {"hidden_size": 32}},
    "data": {"synthetic": {"num_train": 10}},
    "sft": {"steps": 3},
    "rl": {"phases": [{"name": "a", "max_input_tokens": 64, "max_output_tokens": 16, "steps": 2},
                      {"name": "b", "max_input_tokens": 128, "max_output_tokens": 16, "steps": 2}]},
}


def test_presets_exist():
    assert {p.name for p in PRESETS} >= {"tiny.yaml", "qwenlong-l1-32b.yaml", "qwenlong-l1.5.yaml"}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_every_preset_loads_validates_and_round_trips(preset, tmp_path):
    cfg = load_config(preset)
    assert isinstance(cfg, Config) and cfg.rl.phases
    assert all(isinstance(phase, Phase) for phase in cfg.rl.phases)
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_presets_knobs_take_effect(tmp_path):
    """The presets' settings change what runs: checked on what the code builds from them, not on the YAML."""
    pytest.importorskip("transformers")
    import random

    import torch

    from qwenlong.curriculum import PromptSampler
    from qwenlong.trainers import GRPOTrainer
    from qwenlong.trainers.grpo import Group, PromptExample
    from tests.test_rl_step import tiny_model

    l1 = load_config(CONFIGS / "qwenlong-l1-32b.yaml")
    trainer = GRPOTrainer(tiny_model(seed=0), engine=None, reward=None, cfg=l1.rl, decode=str,
                          output_dir=tmp_path / "l1")
    assert [trainer.phase_steps(phase, 1280) for phase in l1.rl.phases] == [10, 10]  # an epoch of 128-prompt steps
    # clip-high equals clip-low in the demo run: a ratio of 1.25 on a positive token is clipped at 1.2
    from qwenlong.kernels.logprobs.policy_math import policy_loss_per_token

    loss, _ = policy_loss_per_token(torch.tensor([0.0]), torch.tensor([-0.22314355]), torch.tensor([1.0]),
                                    l1.rl.clip_low, l1.rl.clip_high)
    assert float(loss) == pytest.approx(-1.2)
    zero_backend = pytest.importorskip("qwenlong.distributed.zero")
    zero = zero_backend.deepspeed_config(l1.distributed, grad_clip=l1.rl.grad_clip, bf16=True)["zero_optimization"]
    assert zero["stage"] == 3 and "offload_param" in zero and "offload_optimizer" in zero

    l15 = load_config(CONFIGS / "qwenlong-l1.5.yaml")
    trainer = GRPOTrainer(tiny_model(seed=0), engine=None, reward=None, cfg=l15.rl, decode=str,
                          output_dir=tmp_path / "l15", task_balanced=l15.data.task_balanced)
    rng = random.Random(0)
    groups = [Group(PromptExample(f"e{i}", [1, 2], task, ["x"]), [[3]] * 8, [[0.0]] * 8,
                    [rng.random() * scale for _ in range(8)], []) for i, (task, scale) in
              enumerate([("docmath", 1.0), ("docmath", 1.0), ("musique", 9.0), ("musique", 9.0)])]
    for g in groups:
        g.rewards[:] = g.task_rewards
    rewards = torch.tensor([g.rewards for g in groups])
    per_group = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + l15.rl.advantage_eps)
    assert not torch.allclose(trainer._advantages(groups), per_group)  # task-std, not each group's own std
    sampler = PromptSampler(["docmath"] * 30 + ["musique"] * 3, key="k", balanced=l15.data.task_balanced)
    drawn = sampler.draw(6)
    assert sum(i >= 30 for i in drawn) == 3  # equal counts per task though musique has 10x fewer prompts


def test_synthetic_tasks_match_the_data_generator():
    from qwenlong.config import SyntheticDataConfig
    from qwenlong.data.synthetic import TASKS

    task_type = typing.get_type_hints(SyntheticDataConfig)["task"]
    assert set(typing.get_args(task_type)) == {*TASKS, "mixed"}


def test_minimal_config_gets_defaults():
    cfg = config_from_dict(MINIMAL)
    assert cfg.model.tiny.hidden_size == 32 and cfg.model.tiny.num_hidden_layers == 2
    assert cfg.rl.retrospective.max_mean_reward == 0.5 and cfg.rl.retrospective.max_fraction == 0.3
    assert cfg.rl.loss_aggregation == "token-mean" and cfg.rollout.engine == "hf"


def with_change(path: str, value):
    """MINIMAL with one raw value replaced (no validation yet)."""
    data = yaml.safe_load(yaml.safe_dump(MINIMAL))
    apply_override(data, f"{path}={yaml.safe_dump(value, default_flow_style=True).strip()}")
    return data


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("rl.clip_hi", 0.3, r"^rl\.clip_hi: unknown key \(did you mean rl\.clip_high\? allowed: "),
        ("rl.phases.1.max_input", 10,
         r"^rl\.phases\.1\.max_input: unknown key \(did you mean rl\.phases\.1\.max_input_tokens\? allowed: "),
        ("sdf", {}, r"^sdf: unknown key \(did you mean sft\? allowed: "),
        ("zzz", {}, r"^zzz: unknown key \(allowed: "),  # nothing close: no guess
        ("rl.phases.0.max_input_tokens", "20K", r"^rl\.phases\.0\.max_input_tokens: expected int, got str"),
        ("rl.group_size", 8.5, r"^rl\.group_size: expected int, got float"),
        ("rl.group_size", True, r"^rl\.group_size: expected int, got bool"),
        ("rl.lr", "fast", r"^rl\.lr: expected float, got str"),
        ("rl.loss_aggregation", "sum", r"^rl\.loss_aggregation: expected one of"),
        ("rl.phases", {"name": "a"}, r"^rl\.phases: expected a list"),
        ("rl.phases.1", {"name": "b", "max_output_tokens": 4, "steps": 1}, r"^rl\.phases\.1\.max_input_tokens: requ"),
        ("rl.phases.1.steps", None, r"^rl\.phases\.1\.steps: set exactly one of steps and epochs"),
        ("rl.dynamic_sampling", 3, r"^rl\.dynamic_sampling: expected a mapping"),
        ("model.name", "some/model", r"^model\.name: set exactly one"),
        ("sft.steps", None, r"^sft\.steps: set exactly one"),
        ("rl.top_p", 1.5, r"^rl\.top_p: expected in \(0, 1\]"),
        ("rl.group_size", 0, r"^rl\.group_size: expected >= 1"),
        ("rollout.kv_cache_memory_bytes", 0, r"^rollout\.kv_cache_memory_bytes: expected > 0 or null, got 0"),
        ("rollout.sleep_between_phases", True, r"^rollout\.sleep_between_phases: only the vllm engine sleeps"),
        ("rl.clip_low", -0.1, r"^rl\.clip_low: expected >= 0"),
        ("distributed.deepspeed_stage", 4, r"^distributed\.deepspeed_stage: expected 0, 1, 2 or 3"),
        ("rl.mini_batch_size", 48, r"^rl\.mini_batch_size: must divide"),
        ("rl.phases.1.name", "a", r"^rl\.phases\.1\.name: duplicate phase name"),
        ("rl.overlong", {"enabled": True, "buffer": 17}, r"^rl\.overlong\.buffer: 17 exceeds rl\.phases\.0"),
        ("reward.judge", "openai", r"^reward\.judge_endpoint: the openai judge needs"),
        ("reward.judge", "local", r"^reward\.judge_model: the local judge needs"),
        ("rl.phases", [], r"^rl\.phases: RL needs at least one phase"),
        ("data.synthetic.min_document_tokens", 32, r"^data\.synthetic\.min_document_tokens: expected 64 <="),
        ("data.synthetic.task", "sorting", r"^data\.synthetic\.task: expected one of"),
    ],
)
def test_bad_values_name_the_key(path, value, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(with_change(path, value))


def test_atomic_attention_under_sequence_parallel_is_refused():
    data = with_change("model.attention", "qwenlong_atomic")
    assert config_from_dict(data).model.attention == "qwenlong_atomic"
    apply_override(data, "distributed.sp_size=2")
    with pytest.raises(ConfigError, match=r"^model\.attention: 'qwenlong_atomic' has no sequence-parallel form"):
        config_from_dict(data)


def test_kl_under_zero3_is_refused_when_the_config_loads():
    """Before any stage runs (it was refused when RL built its reference, after SFT had run)."""
    data = with_change("distributed.deepspeed_stage", 3)
    config_from_dict(data)  # kl_coef 0 (the default) is fine
    apply_override(data, "rl.kl_coef=0.001")
    with pytest.raises(ConfigError, match=r"^rl\.kl_coef: a KL reference policy \(kl_coef 0.001\) under ZeRO-3"):
        config_from_dict(data)
    apply_override(data, "rl.enabled=false")
    config_from_dict(data)  # no RL, no reference
    apply_override(data, "rl.enabled=true")
    apply_override(data, "distributed.deepspeed_stage=2")
    config_from_dict(data)


def test_float16_under_deepspeed_is_refused():
    data = with_change("distributed.deepspeed_stage", 2)
    config_from_dict(data)  # bfloat16 (the default) is fine
    data["model"]["dtype"] = "float16"
    with pytest.raises(ConfigError, match=r"^model\.dtype: float16 under DeepSpeed would need loss scaling"):
        config_from_dict(data)


def test_load_error_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**MINIMAL, "rollout": {"engine": "sglang"}}))
    with pytest.raises(ConfigError, match=r"bad\.yaml: rollout\.engine: expected one of \['hf', 'vllm'\]"):
        load_config(bad)


def test_overrides_apply_and_are_validated():
    cfg = config_from_dict(
        MINIMAL,
        overrides=[
            "rl.phases.0.max_input_tokens=100",  # phases' input budgets must grow: below phase 1's 128
            "rl.lr=1e-5",  # YAML 1.1 reads this as a string; float fields accept it
            "rl.dynamic_sampling.enabled=true",
            "rl.retrospective.max_fraction=0.25",
            "model.tiny.num_hidden_layers=3",
            "data.eval_files=[a.parquet, b.parquet]",
            "reward.judge_model=",
        ],
    )
    assert cfg.rl.phases[0].max_input_tokens == 100 and cfg.rl.phases[1].max_input_tokens == 128
    assert cfg.rl.lr == 1e-5 and cfg.rl.dynamic_sampling.enabled and cfg.rl.retrospective.max_fraction == 0.25
    assert cfg.model.tiny.num_hidden_layers == 3 and cfg.data.eval_files == ["a.parquet", "b.parquet"]
    assert cfg.reward.judge_model is None
    assert MINIMAL["rl"]["phases"][0]["max_input_tokens"] == 64  # the caller's dict is untouched
    with pytest.raises(ConfigError, match=r"^rl\.phases\.5: no item 5 in a list of 2"):
        config_from_dict(MINIMAL, ["rl.phases.5.steps=1"])
    with pytest.raises(ConfigError, match=r"^rl\.phases\.0\.stepz: unknown key"):
        config_from_dict(MINIMAL, ["rl.phases.0.stepz=1"])
    with pytest.raises(ConfigError, match=r"^rl\.group_size: expected int, got str"):
        config_from_dict(MINIMAL, ["rl.group_size=eight"])
    with pytest.raises(ConfigError, match="dotted.key=value"):
        config_from_dict(MINIMAL, ["rl.group_size"])


def test_judge_options_fit_make_judge(monkeypatch):
    from qwenlong.rewards.judge import OpenAIJudge, make_judge

    assert config_from_dict(MINIMAL).reward.judge_options() is None
    monkeypatch.setenv("TEST_JUDGE_KEY", "k")
    cfg = config_from_dict(MINIMAL, ["reward.judge=openai", "reward.judge_endpoint=http://127.0.0.1:9/v1",
                                     "reward.judge_model=m", "reward.judge_api_key_env=TEST_JUDGE_KEY"])
    judge = make_judge(cfg.reward.judge_options())  # builds the client; sends nothing
    assert isinstance(judge, OpenAIJudge) and judge.model == "m" and judge.api_key == "k"
    local = config_from_dict(MINIMAL, ["reward.judge=local", "reward.judge_model=some/path"]).reward
    assert local.judge_options() == {"backend": "local", "model": "some/path"}


def test_preset_with_override_from_file():
    cfg = load_config(CONFIGS / "tiny.yaml", ["rl.phases.1.steps=5", "output.dir=/tmp/x"])
    assert cfg.rl.phases[1].steps == 5 and cfg.output.dir == "/tmp/x"


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("rl.lr", float("nan"), r"^rl\.lr: expected a finite number, got nan"),
        ("rl.clip_high", float("inf"), r"^rl\.clip_high: expected a finite number, got inf"),
        ("rl.phases.0", {"name": "a", "max_input_tokens": 64, "max_output_tokens": 16, "epochs": float("nan")},
         r"^rl\.phases\.0\.epochs: expected a finite number"),
        ("rl.overlong.penalty_factor", float("inf"), r"^rl\.overlong\.penalty_factor: expected a finite number"),
        ("rl.advantage_eps", float("-inf"), r"^rl\.advantage_eps: expected a finite number"),
        ("sft.steps", 0, r"^sft\.steps: expected >= 1, got 0"),
        ("sft.lr", 0.0, r"^sft\.lr: expected > 0"),
        ("sft.grad_clip", 0.0, r"^sft\.grad_clip: expected > 0"),
        ("rl.weight_decay", -0.1, r"^rl\.weight_decay: expected >= 0"),
        ("model.tiny.hidden_size", 0, r"^model\.tiny\.hidden_size: expected >= 1"),
        ("model.tiny.num_hidden_layers", -2, r"^model\.tiny\.num_hidden_layers: expected >= 1"),
        ("model.tiny.hidden_size", 30, r"^model\.tiny\.num_attention_heads: 4 heads must split hidden_size 30"),
        ("model.tiny.num_attention_heads", 32, r"^model\.tiny\.num_attention_heads: 32 heads must split"),
        ("model.tiny.num_key_value_heads", 3, r"^model\.tiny\.num_key_value_heads: 3 must divide"),
        ("data.synthetic.num_train", 0, r"^data\.synthetic\.num_train: expected >= 1"),
        ("rl.phases.1.max_input_tokens", 64, r"^rl\.phases\.1\.max_input_tokens: a phase reads the prompts past "
                                             r"the previous phase's budget: expected > rl\.phases\.0\.max_input_tokens"
                                             r"=64, got 64 \(set rl\.phases\.1\.min_input_tokens"),
        ("rl.phases.1.max_input_tokens", 32, r"^rl\.phases\.1\.max_input_tokens: a phase reads the prompts past"),
        ("rl.phases.1.min_input_tokens", -1, r"^rl\.phases\.1\.min_input_tokens: expected 0 <= min_input_tokens <= "
                                             r"max_input_tokens=\d+ \(or null: past the previous phase's budget\), "
                                             r"got -1"),
        ("rl.phases.0.min_input_tokens", 65, r"^rl\.phases\.0\.min_input_tokens: expected 0 <= min_input_tokens <= "
                                             r"max_input_tokens=64"),
        ("rl.phases.1.name", "../../etc", r"^rl\.phases\.1\.name: expected 1-64 letters"),
        ("rl.phases.1.name", "a/b", r"^rl\.phases\.1\.name: expected"),
        ("rl.phases.1.name", "-x", r"^rl\.phases\.1\.name: expected"),
        ("rl.phases.1.name", "x" * 65, r"^rl\.phases\.1\.name: expected"),
        ("reward", {"judge": "openai", "judge_model": "m", "judge_endpoint": "file:///etc/passwd"},
         r"^reward\.judge_endpoint: expected an http:// or https:// URL with a host, got 'file:///etc/passwd'"),
        ("reward", {"judge": "openai", "judge_model": "m", "judge_endpoint": "localhost:8000/v1"},
         r"^reward\.judge_endpoint: expected an http"),
        ("reward", {"judge": "openai", "judge_model": "m", "judge_endpoint": "http:///v1"},
         r"^reward\.judge_endpoint: expected an http"),
        # the evaluation's own judge is checked as the training reward's is (it raised at the first evaluation)
        ("eval.judge", {"judge": "openai", "judge_model": "m", "judge_endpoint": "http://h/v1", "judge_concurrency": 0},
         r"^eval\.judge\.judge_concurrency: expected >= 1, got 0"),
        ("eval.judge", {"judge": "openai", "judge_model": "m", "judge_endpoint": "http://h/v1", "judge_timeout_s": -5},
         r"^eval\.judge\.judge_timeout_s: expected > 0, got -5"),
    ],
)
def test_out_of_range_and_unsafe_values_name_the_key(path, value, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(with_change(path, value))


def test_good_values_next_to_the_bad_ones_pass():
    cfg = config_from_dict(MINIMAL, ["rl.phases.1.name=long-docs_2.v1", "reward.judge=openai",
                                     "reward.judge_model=m", "reward.judge_endpoint=https://judge.internal:8443/v1",
                                     "model.tiny.num_key_value_heads=1"])
    assert cfg.rl.phases[1].name == "long-docs_2.v1" and cfg.reward.judge_endpoint.startswith("https://")
    # a phase that re-reads shorter prompts (QwenLong-L1.5's last phase) may keep the previous phase's budget
    cfg = config_from_dict(MINIMAL, ["rl.phases.1.max_input_tokens=64", "rl.phases.1.min_input_tokens=0"])
    assert (cfg.rl.phases[1].max_input_tokens, cfg.rl.phases[1].min_input_tokens) == (64, 0)


def test_duplicate_yaml_keys_are_rejected(tmp_path):
    text = yaml.safe_dump(MINIMAL, sort_keys=False)
    path = tmp_path / "twice.yaml"
    path.write_text(text + "sft:\n  lr: 0.1\n")  # a second top-level `sft` would silently replace the first
    with pytest.raises(ConfigError, match=r"twice\.yaml: sft: duplicate key \(line \d+ and line \d+\)"):
        load_config(path)
    path.write_text("rl:\n  lr: 1.0e-6\n  group_size: 4\n  lr: 1.0e-3\n")
    with pytest.raises(ConfigError, match=r"twice\.yaml: lr: duplicate key \(line 2 and line 4\)"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"^rl\.phases\.0: name: duplicate key"):
        config_from_dict(MINIMAL, ["rl.phases.0={name: a, name: b}"])
    from qwenlong.config.typed import load_yaml

    # YAML merge keys still work, and a mapping may override what it merges
    assert load_yaml("d: &d {a: 1, b: 2}\ne:\n  <<: *d\n  b: 3\n")["e"] == {"a": 1, "b": 3}


def test_cli_config_errors_are_one_line_and_exit_2(tmp_path, capsys):
    from qwenlong.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(MINIMAL) + "seed: 1\nseed: 2\n")
    assert main(["sft", "--config", str(bad)]) == 2
    assert main(["rl", "--config", str(CONFIGS / "tiny.yaml"), "rl.lr=.nan"]) == 2
    assert main(["pipeline", "--config", str(CONFIGS / "tiny.yaml"), "--resume",
                 f"output.dir={tmp_path / 'never-ran'}"]) == 2
    assert main(["sft", "--config", str(tmp_path / "missing.yaml")]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 4 and "Traceback" not in "".join(lines)
    assert lines[0].startswith("qwenlong sft: error: ") and "bad.yaml: seed: duplicate key" in lines[0]
    assert "rl.lr: expected a finite number, got nan" in lines[1]
    assert "output.dir: " in lines[2] and "never-ran does not exist" in lines[2]
    assert "missing.yaml: cannot read the config" in lines[3]


def test_a_phase_may_not_take_the_memory_agent_stage_name():
    """The memory-agent stage is recorded as ``rl:memory-agent`` and checkpointed as ``rl-memory-agent-stepN``, as a
    phase named ``memory-agent`` is: with the stage on, whichever ran first marked the other done (the phase never
    trained, or the expert was never trained and merged). Refused while the stage is on; the name is free without it."""
    stage = ["rl.memory_agent.enabled=true", "rl.memory_agent.after_phase=a"]
    with pytest.raises(ConfigError, match=r"^rl\.phases\.1\.name: 'memory-agent' is the memory-agent stage's"):
        config_from_dict(MINIMAL, [*stage, "rl.phases.1.name=memory-agent"])
    with pytest.raises(ConfigError, match=r"^rl\.phases\.0\.name: 'memory-agent' is the memory-agent stage's"):
        config_from_dict(MINIMAL, [*stage[:1], "rl.memory_agent.after_phase=memory-agent",
                                   "rl.phases.0.name=memory-agent"])
    assert config_from_dict(MINIMAL, ["rl.phases.1.name=memory-agent"]).rl.phases[1].name == "memory-agent"
    assert config_from_dict(MINIMAL, [*stage, "rl.phases.1.name=memory-agent-2"]).rl.memory_agent.enabled
    pytest.importorskip("transformers")
    from qwenlong.config.validation import MEMORY_AGENT_STAGE
    from qwenlong.pipeline.memory_agent_stage import STAGE

    assert STAGE == f"rl:{MEMORY_AGENT_STAGE}"  # the name validation reserves is the stage's
