"""No dead knobs: every leaf key of the run config is read by the code that acts on it.

A short pipeline runs in-process while every config dataclass records which of its fields the code
reads (loading, saving, validation and ``__post_init__`` checks do not count: a key only validated
is dead). Keys such a run cannot reach (multi-process, vLLM, a judge server, alternatives of a key the run
sets) are listed in ``EXERCISED_ELSEWHERE`` with the test that shows their effect, and that test must
exist. A new key therefore fails this test until something reads it or a test for it is named here.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from qwenlong.config import Config, config_from_dict  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CODE = (ROOT / "qwenlong", ROOT / "kernels")
# loading, saving and validating a config read every key: none of that is acting on one (a method of a config
# section that turns it into what the code uses, such as RewardConfig.judge_options, does count)
NOT_READERS = tuple(ROOT / "qwenlong" / "config" / name for name in ("__init__.py", "typed.py", "validation.py"))

# key -> "tests/file.py::test_name: why the traced run does not reach it"
EXERCISED_ELSEWHERE: dict[str, str] = {
    "sft.epochs": "tests/test_config_keys.py::test_epochs_set_the_number_of_steps: the traced run gives steps",
    "rl.phases[].epochs": "tests/test_config_keys.py::test_epochs_set_the_number_of_steps: the traced run gives steps",
    "distributed.backend": "tests/test_distributed_training.py::test_two_processes_match_one: one process here",
    "distributed.offload_optimizer": "tests/test_config_keys.py::test_offload_reaches_deepspeed: no ZeRO here",
    "distributed.offload_params": "tests/test_config_keys.py::test_offload_reaches_deepspeed: no ZeRO here",
    "rollout.tensor_parallel_size": "tests/test_plan.py::test_placement_32_ranks_tp4_sp8: the HF engine here",
    "rollout.gpu_memory_utilization": "tests/test_plan.py::test_kv_capacity_below_one_sequence_is_refused: HF engine",
    "rollout.kv_cache_memory_bytes":
        "tests/test_rollout_vllm.py::test_rl_pipeline_syncs_the_vllm_engine_after_each_update: the HF engine here",
    "rollout.sleep_between_phases": "tests/test_plan.py::test_sleep_setting_decides_the_wrapping: the HF engine here",
    **{f"rl.memory_agent.{key}": "tests/test_memory_agent.py::test_pipeline_memory_agent_stage_merges_and_evaluates: "
       "the stage is off here" for key in ("after_phase", "steps", "chunk_tokens", "memory_tokens", "answer_tokens",
                                            "select_topk", "synthetic_documents", "prompts_per_step")},
    "rl.memory_agent.data": "tests/test_memory_agent.py::test_pipeline_memory_agent_stage_merges_and_evaluates: the "
                            "stage is off here, and that test reads synthetic agent data, not files",
}


def leaf_keys(cls: type, prefix: str = "") -> dict[str, tuple[type, str]]:
    """Every leaf key path of a config dataclass -> (the dataclass that holds it, its field name)."""
    hints = typing.get_type_hints(cls)
    keys = {}
    for field in dataclasses.fields(cls):
        path = f"{prefix}{field.name}"
        hint = hints[field.name]
        inner = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        origin = typing.get_origin(hint)
        if dataclasses.is_dataclass(hint):
            keys.update(leaf_keys(hint, path + "."))
        elif origin is list and inner:
            keys.update(leaf_keys(inner[0], path + "[]."))
        elif inner:  # an optional section: its own keys
            keys.update(leaf_keys(inner[0], path + "."))
        else:
            keys[path] = (cls, field.name)
    return keys


def config_classes(cls: type, seen: set | None = None) -> set[type]:
    seen = set() if seen is None else seen
    seen.add(cls)
    for hint in typing.get_type_hints(cls).values():
        for candidate in (hint, *typing.get_args(hint)):
            if dataclasses.is_dataclass(candidate) and candidate not in seen:
                config_classes(candidate, seen)
    return seen


def _is_reader(frame) -> bool:
    path = Path(frame.f_code.co_filename)
    if frame.f_code.co_name == "__post_init__" or not any(path.is_relative_to(c) for c in CODE):
        return False
    return not any(path.is_relative_to(n) for n in NOT_READERS)


@pytest.fixture
def traced_reads(monkeypatch):
    reads: set[tuple[type, str]] = set()
    for cls in config_classes(Config):
        names = {f.name for f in dataclasses.fields(cls)}

        def getattribute(self, name, _cls=cls, _names=names):
            if name in _names and _is_reader(sys._getframe(1)):
                reads.add((_cls, name))
            return object.__getattribute__(self, name)

        monkeypatch.setattr(cls, "__getattribute__", getattribute)
    return reads


def test_exercised_elsewhere_names_real_keys_and_tests():
    keys = leaf_keys(Config)
    for key, where in EXERCISED_ELSEWHERE.items():
        assert key in keys, f"{key}: not a config key (remove it from EXERCISED_ELSEWHERE)"
        test_file, rest = where.split("::", 1)
        test_name = rest.split(":", 1)[0]
        assert f"def {test_name}(" in (ROOT / test_file).read_text(), f"{key}: {where} names no existing test"


@pytest.mark.slow
def test_every_config_key_is_read(tmp_path, monkeypatch, traced_reads):
    from qwenlong.pipeline.run import run_pipeline

    monkeypatch.setenv("QWENLONG_BACKEND", "torch")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cfg = config_from_dict({
        "model": {"tiny": {"vocab_size": 512, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1},
                  "dtype": "float32"},
        "data": {"synthetic": {"task": "copy_marked_fact", "num_train": 24, "num_eval": 4, "max_document_tokens": 160,
                               "num_distractor_facts": 1, "teacher_accuracy": 0.75},
                 "task_balanced": True},
        "sft": {"steps": 2, "token_budget": 1024, "max_seq_len": 300},
        "rl": {"group_size": 2, "gen_prompts_per_step": 2, "train_prompts_per_step": 2, "mini_batch_size": 1,
               "advantage": "task-std", "clip_ratio_c": 3.0, "kl_coef": 0.01, "entropy_coef": 0.01,
               "entropy_control": {"tau_token": 5.0, "tau_sequence": 5.0, "entropy_low": 0.1, "entropy_high": 9.0},
               "dynamic_sampling": {"enabled": True, "max_rounds": 1},
               "overlong": {"enabled": True, "buffer": 4},
               "phases": [{"name": "a", "max_input_tokens": 200, "max_output_tokens": 8, "steps": 2,
                           "data": ["synthetic_copy"]},
                          {"name": "b", "max_input_tokens": 400, "max_output_tokens": 8, "steps": 1}]},
        # an evaluation judge that is never reached (the untrained policy extracts no answer): built, not asked
        "eval": {"max_output_tokens": 8, "samples_per_prompt": 1, "every_steps": 2,
                 "judge": {"judge": "openai", "judge_endpoint": "http://127.0.0.1:9/v1", "judge_model": "m",
                           "judge_api_key_env": "QWENLONG_TEST_UNSET_KEY"}},
        "output": {"dir": str(tmp_path / "run"), "log_every_steps": 2, "save_every_steps": 1},
    })
    run = run_pipeline(cfg)
    # the untrained policy's rewards are all 0, so dynamic sampling dropped every group: one update on
    # groups whose rewards differ reaches what a real step's update reads
    from qwenlong.trainers.grpo import Group, GRPOTrainer, PromptExample

    trainer = GRPOTrainer(run.model, engine=None, reward=None, cfg=cfg.rl, decode=str, output_dir=tmp_path / "u")
    trainer.backend.start(lr=1e-3, weight_decay=0.0, total_steps=4, warmup_steps=0, schedule="constant",
                          grad_clip=1.0)
    groups = [Group(PromptExample(f"p{g}", [5, 6, 7, 8], "synthetic_copy", ["x"]), [[9, 10], [11, 12, 13]],
                    [[-1.0, -1.0], [-1.0, -1.0, -1.0]], [1.0, 0.0], [1.0, 0.0]) for g in range(2)]
    trainer.update(groups)
    unread = [key for key, owner in leaf_keys(Config).items()
              if owner not in traced_reads and key not in EXERCISED_ELSEWHERE]
    assert not unread, f"config keys nothing outside qwenlong/config read in a pipeline run: {unread}"


def test_epochs_set_the_number_of_steps(tmp_path):
    from qwenlong.config import RLConfig, SFTConfig
    from qwenlong.curriculum import Phase
    from qwenlong.trainers import GRPOTrainer, SFTTrainer
    from tests.test_rl_step import tiny_model

    pairs = [([1, 2, 3], [4, 5]) for _ in range(12)]
    sft_steps = [SFTTrainer(tiny_model(seed=0), pairs, SFTConfig(epochs=e, token_budget=16, max_seq_len=16),
                            output_dir=tmp_path / f"sft{e}").total_steps for e in (1, 2)]
    assert sft_steps[1] == 2 * sft_steps[0] > 0
    trainer = GRPOTrainer(tiny_model(seed=0), engine=None, reward=None, decode=str, output_dir=tmp_path / "rl",
                          cfg=RLConfig(train_prompts_per_step=4, phases=[Phase("p", 8, 8, steps=1)]))
    assert [trainer.phase_steps(Phase("p", 8, 8, epochs=e), 40) for e in (1, 2.5)] == [10, 25]


def test_offload_reaches_deepspeed():
    pytest.importorskip("deepspeed")
    from qwenlong.config import DistributedConfig
    from qwenlong.distributed.zero import deepspeed_config

    plain = deepspeed_config(DistributedConfig(deepspeed_stage=3), grad_clip=1.0, bf16=True)["zero_optimization"]
    both = deepspeed_config(DistributedConfig(deepspeed_stage=3, offload_optimizer=True, offload_params=True),
                            grad_clip=1.0, bf16=True)["zero_optimization"]
    assert "offload_optimizer" not in plain and "offload_param" not in plain
    assert both["offload_optimizer"]["device"] == both["offload_param"]["device"] == "cpu"


def test_eval_judge_and_rules_take_effect():
    from qwenlong.config import config_from_dict
    from qwenlong.pipeline.run import build_eval_reward, build_reward
    from qwenlong.rewards import RewardItem

    base = {"model": {"tiny": {"hidden_size": 32}}, "data": {"synthetic": {"num_train": 10}}, "sft": {"steps": 1},
            "rl": {"phases": [{"name": "a", "max_input_tokens": 64, "max_output_tokens": 16, "steps": 1}]}}
    judged = config_from_dict({**base, "eval": {"judge": {"judge": "openai", "judge_endpoint": "http://127.0.0.1:9/v1",
                                                          "judge_model": "evaluator"}}})
    assert build_reward(judged).judge is None and build_eval_reward(judged).judge is not None
    # an answer listing many candidates: the release's rules accept it, the default rules do not
    item = RewardItem("musique", "<think>x</think> Therefore, the answer is Paris, London, Rome, Berlin, Madrid, "
                      "Vienna, Oslo, Lisbon, Prague, Dublin.", ["Paris"], "Which city?")
    scores = {rules: build_eval_reward(config_from_dict({**base, "eval": {"rules": rules}})).score([item])[0].score
              for rules in ("release", "default")}
    assert scores == {"release": 1.0, "default": 0.0}
