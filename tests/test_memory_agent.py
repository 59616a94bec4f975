"""The memory agent (qwenlong.agents.memory) on a scripted engine: query split, chunking, the prompts of
every step, trajectory rewards, the advantage broadcast to every step's tokens, and the packed GRPO
loss over all steps against a per-step float64 reference; then the real HF engine and the eval CLI; a synced
engine's lockstep rounds; and, on two gloo processes, the in-place SCE merge under ZeRO-3 against one process's
and the pipeline's memory-agent stage under ZeRO-3 (with and without sequence parallelism) and plain data
parallelism."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from helpers import spawn
from transformers import Qwen2Config, Qwen2ForCausalLM

from qwenlong.agents import (
    AgentQuery,
    AgentStep,
    MemoryAgent,
    MemoryAgentConfig,
    Trajectory,
    chunk_document,
    chunk_ids,
    parse_memory_step,
    query_from_record,
    score_trajectories,
    split_query,
    trajectory_sequences,
)
from qwenlong.agents.memory import memory_step_prompt
from qwenlong.algorithms import group_advantages
from qwenlong.data import FORMAT_INSTRUCTION, apply_chat_template, build_prompt, train_demo_tokenizer
from qwenlong.data.synthetic import TWO_CHUNK_SOURCE, make_two_chunk_record
from qwenlong.kernels import grpo_loss
from qwenlong.rewards import HybridReward
from qwenlong.rollout import Completion, RolloutEngine
from qwenlong.trainers.packed import forward_hidden, lm_head_weight, pack_sequences, policy_hidden


@pytest.fixture(scope="module")
def tokenizer():
    texts = [make_two_chunk_record(i, 200).document for i in range(20)]
    texts += [build_prompt("x", "y"), "<memory> </memory> <plan> </plan> <think> </think> Therefore, the answer is"]
    return train_demo_tokenizer(texts, vocab_size=400)


class ScriptedEngine(RolloutEngine):
    """Answers each prompt with ``script(prompt_text, call_index)``; records every prompt and call."""

    def __init__(self, tokenizer, script):
        self.tokenizer, self.script = tokenizer, script
        self.prompts: list[str] = []
        self.calls: list[tuple[int, int]] = []  # (number of prompts, max_new_tokens)

    def generate(self, prompts, params, on_complete=None):
        self.calls.append((len(prompts), params.max_new_tokens))
        groups = []
        for ids in prompts:
            text = self.tokenizer.decode(ids)
            self.prompts.append(text)
            response = self.tokenizer(self.script(text, len(self.prompts) - 1), add_special_tokens=False)["input_ids"]
            response = response[: params.max_new_tokens]
            groups.append([Completion(response, [-0.01 * (k + 1) for k in range(len(response))], "stop")])
        return groups

    def update_weights(self, named_tensors):
        pass


KEY_FACT = re.compile(r"\[KEY FACT\] The (first|second) word of the password is (\w+)\.")


def reader(remember: bool):
    """A policy that copies the key facts of each chunk into its memory (and, with ``remember``, keeps the old
    memory), then answers from the memory alone."""

    def script(prompt: str, _: int) -> str:
        memory = re.search(r"<memory>\n(.*?)\n</memory>", prompt, re.S).group(1)
        if "<text>" in prompt:  # a memory step
            chunk = prompt.split("<text>\n", 1)[1].split("\n</text>", 1)[0]
            found = " ".join(m.group(0) for m in KEY_FACT.finditer(chunk))
            kept = memory if remember and memory != "(nothing yet)" else ""
            return f"<memory>{(kept + ' ' + found).strip()}</memory><plan>find the other word</plan>"
        words = dict((m.group(1), m.group(2)) for m in KEY_FACT.finditer(memory))
        answer = f"{words.get('first', 'none')} {words.get('second', 'none')}"
        return f"<think>\nfrom memory\n</think>\n\nTherefore, the answer is {answer}."

    return script


def test_split_query():
    assert split_query(f"What is the code?\n\n{FORMAT_INSTRUCTION}") == ("What is the code?", FORMAT_INSTRUCTION)
    assert split_query("Which year? Answer with a number only.") == ("Which year?", "Answer with a number only.")
    assert split_query("Who wrote it?") == ("Who wrote it?", "")
    assert split_query("Which year? Answer with a number. Respond with digits.") == (
        "Which year?", "Answer with a number. Respond with digits.")
    # a marker sentence followed by other text is part of the question: here the options of a choice question
    options = "Which clause? Answer with the letter of the option.\n(A) Clause 4\n(B) Clause 7"
    assert split_query(f"{options}\n\n{FORMAT_INSTRUCTION}") == (options, FORMAT_INSTRUCTION)
    assert split_query("Which year? Answer with a number. The text is long.") == (
        "Which year? Answer with a number. The text is long.", "")
    # a question that opens with a marker stays the question
    assert split_query(f"Answer with yes or no: is it red?\n{FORMAT_INSTRUCTION}") == (
        "Answer with yes or no: is it red?", FORMAT_INSTRUCTION)
    # a marker inside a sentence is part of the question
    assert split_query("Is the reply formatted as 'answer with care'?") == (
        "Is the reply formatted as 'answer with care'?", "")


def test_memory_steps_of_a_choice_question_see_its_options():
    """A question whose own text says how to answer keeps the options that follow it in ``q_core``, the part
    the memory steps read, whether the query comes from a record or from its rendered prompt."""
    from qwenlong.agents import query_from_prompt
    from qwenlong.data import DocQARecord
    from qwenlong.data.prompt import question_text

    record = DocQARecord("q1", "mc", "a long document", "Which clause limits liability? Answer with its letter.",
                         ("A",), choices=("Clause 4", "Clause 7"))
    for query in (query_from_record(record), query_from_prompt(build_prompt(record.document, question_text(record)))):
        assert query.question.startswith("Which clause limits liability? Answer with its letter.\n(A) Clause 4")
        assert query.instruction == FORMAT_INSTRUCTION
        assert "(B) Clause 7" in memory_step_prompt(query, "", "", "chunk", 1, 2)


def test_chunking(tokenizer):
    assert chunk_ids(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert chunk_ids([], 4) == [[]]
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunk_ids([1], 0)
    document = make_two_chunk_record(0, 300, tokenizer=tokenizer).document
    chunks = chunk_document(tokenizer, document, 64)
    assert "".join(chunks) == document
    lengths = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in chunks]
    assert len(chunks) == -(-len(tokenizer(document, add_special_tokens=False)["input_ids"]) // 64)
    assert all(n <= 64 + 1 for n in lengths)  # a cut inside a word may re-tokenise one token longer


def test_two_chunk_task_puts_facts_in_different_halves(tokenizer):
    for index in range(30):
        record = make_two_chunk_record(index, 240, tokenizer=tokenizer)
        ids = tokenizer(record.document, add_special_tokens=False)["input_ids"]
        first, second = chunk_document(tokenizer, record.document, -(-len(ids) // 2))
        assert "first word" in first and "second word" in second, index
        assert record.data_source == TWO_CHUNK_SOURCE and len(record.answers[0].split()) == 2


def _queries(tokenizer, count=3, tokens=300):
    return [query_from_record(make_two_chunk_record(i, tokens, tokenizer=tokenizer)) for i in range(count)]


def test_rollout_prompts_and_rewards(tokenizer):
    config = MemoryAgentConfig(chunk_tokens=100, memory_tokens=120, answer_tokens=80)
    queries = _queries(tokenizer)
    engine = ScriptedEngine(tokenizer, reader(remember=True))
    groups = MemoryAgent(engine, tokenizer, config).rollout(queries, group_size=2, seed=0)
    chunks = [chunk_document(tokenizer, q.document, 100) for q in queries]
    assert all(len(c) >= 3 for c in chunks)
    for query, query_chunks, group in zip(queries, chunks, groups, strict=True):
        for trajectory in group:
            assert [s.kind for s in trajectory.steps] == ["memory"] * len(query_chunks) + ["answer"]
            previous = "(nothing yet)"
            for t, (step, chunk) in enumerate(zip(trajectory.steps, query_chunks, strict=False)):
                prompt = tokenizer.decode(step.prompt_ids)
                # step t reads (m_{t-1}, p_{t-1}, x_t, q_core) and nothing else of the document
                assert f"<text>\n{chunk}\n</text>" in prompt and f"Part {t + 1} of {len(query_chunks)}" in prompt
                assert f"<memory>\n{previous}\n</memory>" in prompt and query.question in prompt
                assert all(other not in prompt for other in query_chunks if other != chunk)
                assert FORMAT_INSTRUCTION not in prompt  # the format instruction waits for the answer
                assert len(step.logprobs) == len(step.response_ids) > 0
                previous = parse_memory_step(step.text)[0]
            final = tokenizer.decode(trajectory.steps[-1].prompt_ids)
            assert "<text>" not in final and previous in final and FORMAT_INSTRUCTION in final
            assert trajectory.answer.endswith(f"the answer is {query.ground_truth[0]}.")
    # each round: one call for the memory steps of all 6 trajectories, then one for their answers
    assert engine.calls[0] == (6, 120) and engine.calls[-1] == (6, 80)
    assert score_trajectories(groups, HybridReward()).tolist() == [[1.0, 1.0]] * 3
    # a policy that forgets its memory loses the first word: reward 0
    forgetful = MemoryAgent(ScriptedEngine(tokenizer, reader(remember=False)), tokenizer, config)
    assert score_trajectories(forgetful.rollout(queries, 2), HybridReward()).tolist() == [[0.0, 0.0]] * 3


def _step(kind, prompt, response):
    return AgentStep(kind, prompt, response, [-0.1 * (i + 1) for i in range(len(response))], "", "stop")


def _trajectories():
    """Two queries x two trajectories of 2-3 steps with different lengths, token ids < 48."""
    gen = torch.Generator().manual_seed(7)

    def ids(n):
        return torch.randint(0, 48, (n,), generator=gen).tolist()

    query = AgentQuery("q", "", "", "")
    groups = []
    for shape in ([(5, 3), (6, 2), (4, 4)], [(3, 1), (7, 5)]), ([(2, 2), (5, 6)], [(4, 3), (3, 2), (6, 1)]):
        groups.append([Trajectory(query, len(steps) - 1, steps=[
            _step("memory" if i < len(steps) - 1 else "answer", ids(p), ids(r)) for i, (p, r) in enumerate(steps)])
            for steps in shape])
    return groups


def test_advantage_broadcast_to_every_step():
    groups = _trajectories()
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    advantages = group_advantages(rewards)
    sequences, prompt_lengths, response_values, sequence_values = trajectory_sequences(groups, advantages)
    flat = [t for g in groups for t in g]
    assert len(sequences) == sum(len(t.steps) for t in flat)
    batch = pack_sequences(sequences, prompt_lengths, response_values, sequence_values)
    position = 0
    for index, trajectory in enumerate(flat):
        for step in trajectory.steps:
            n, p = len(step.response_ids), len(step.prompt_ids)
            rows = slice(position + p - 1, position + p - 1 + n)  # the positions predicting the response
            assert batch.mask[rows].all() and int(batch.mask[position:position + p + n].sum()) == n
            assert batch.targets[rows].tolist() == step.response_ids
            assert torch.allclose(batch.token_values["advantages"][rows], advantages.flatten()[index].expand(n))
            assert batch.token_values["engine_logprobs"][rows].tolist() == pytest.approx(step.logprobs)
            assert batch.token_values["trajectory"][rows].eq(index).all()
            position += p + n
    assert int(batch.mask.sum()) == sum(t.generated_tokens for t in flat)
    with pytest.raises(ValueError, match="advantages"):
        trajectory_sequences(groups, advantages[:1])


def test_packed_grpo_loss_over_all_steps_matches_per_step_reference():
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64))
    groups = _trajectories()
    advantages = group_advantages(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    batch = pack_sequences(*trajectory_sequences(groups, advantages))
    old = batch.token_values["engine_logprobs"]
    hidden = forward_hidden(model, batch)
    loss, _ = grpo_loss(hidden, lm_head_weight(model), batch.targets, batch.token_values["advantages"], old,
                        batch.mask)
    loss.backward()

    # reference: each step alone through a float64 copy of the model, token-mean over all trajectories' tokens
    reference_model = copy.deepcopy(model).double()
    reference_model.zero_grad()
    flat = [t for g in groups for t in g]
    total = sum(t.generated_tokens for t in flat)
    reference = 0.0
    for trajectory, advantage in zip(flat, advantages.flatten().tolist(), strict=True):
        for step in trajectory.steps:
            ids = torch.tensor([step.prompt_ids + step.response_ids])
            logits = reference_model(input_ids=ids).logits[0]
            p = len(step.prompt_ids)
            logp = torch.log_softmax(logits[p - 1:-1], dim=-1).gather(-1, torch.tensor(step.response_ids)[:, None])
            ratio = torch.exp(logp.squeeze(-1) - torch.tensor(step.logprobs, dtype=torch.float64))
            clipped = ratio.clamp(1 - 0.2, 1 + 0.28)
            reference = reference - torch.minimum(ratio * advantage, clipped * advantage).sum() / total
    reference.backward()
    assert torch.allclose(loss.double(), reference, atol=1e-5)
    for packed, param in zip(model.parameters(), reference_model.parameters(), strict=True):
        assert torch.allclose(packed.grad.double(), param.grad, atol=1e-5, rtol=1e-4)


def test_hf_engine_rollout_records_every_step(tokenizer):
    from qwenlong.rollout import HFGenerateEngine

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=1024)).eval()
    engine = HFGenerateEngine(model, eos_token_id=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id)
    config = MemoryAgentConfig(chunk_tokens=80, memory_tokens=6, answer_tokens=5, temperature=1.0, top_p=1.0)
    queries = _queries(tokenizer, count=2, tokens=200)
    groups = MemoryAgent(engine, tokenizer, config).rollout(queries, group_size=2, seed=3)
    for query, group in zip(queries, groups, strict=True):
        template = len(apply_chat_template(tokenizer, memory_step_prompt(query, "", "", "", 1, 9), tokenize=True))
        chunks = len(chunk_document(tokenizer, query.document, 80))
        for trajectory in group:
            assert len(trajectory.steps) == chunks + 1
            for step in trajectory.steps:
                assert 0 < len(step.response_ids) <= (6 if step.kind == "memory" else 5)
                assert len(step.logprobs) == len(step.response_ids)
                assert all(lp <= 0 for lp in step.logprobs)
                # the context never holds more than the template, a chunk and the bounded memory (6 tokens,
                # re-tokenised: at most a few more) and plan
                assert len(step.prompt_ids) <= template + 80 + 2 * 6 * 3


def test_eval_cli_memory_agent(tmp_path, capsys):
    from qwenlong.cli import main

    out = tmp_path / "eval"
    assert main(["eval", "--synthetic", "1", "--agent", "memory", "--chunk-tokens", "96", "--memory-tokens", "4",
                 "--max-new-tokens", "4", "--no-judge", "--no-progress", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    two_chunk = [r for r in rows if r["benchmark"] == TWO_CHUNK_SOURCE]
    assert len(two_chunk) == 1 and two_chunk[0]["input_tokens"] > 96  # longer than one chunk, and not truncated
    capsys.readouterr()
    assert main(["eval", "--api-url", "http://127.0.0.1:1/v1", "--api-model", "m", "--agent", "memory"]) == 2
    assert "--agent memory" in capsys.readouterr().err  # one line naming the flag, no traceback


def test_memory_agent_trainer_trains_on_every_step(tokenizer, tmp_path, monkeypatch):
    from qwenlong.agents.rl import MemoryAgentTrainer
    from qwenlong.config import RLConfig
    from qwenlong.curriculum import Phase
    from qwenlong.trainers.grpo import PromptExample

    monkeypatch.setenv("QWENLONG_BACKEND", "torch")
    remembering = reader(remember=True)

    def every_other_forgets(prompt: str, index: int) -> str:
        if "<text>" not in prompt and index % 2:
            return "<think>\nlost it\n</think>\n\nTherefore, the answer is none."
        return remembering(prompt, index)

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=1024))
    before = copy.deepcopy(model)
    queries = {q.id: q for q in _queries(tokenizer, count=2, tokens=250)}
    examples = [PromptExample(q.id, [1, 2, 3], q.data_source, q.ground_truth, q.question) for q in queries.values()]
    cfg = RLConfig(group_size=2, gen_prompts_per_step=2, train_prompts_per_step=2, mini_batch_size=2, lr=1e-3,
                   micro_batch_token_budget=4096, phases=[Phase("agent", 10**6, 80, steps=1)])
    engine = ScriptedEngine(tokenizer, every_other_forgets)
    trainer = MemoryAgentTrainer(model, engine, HybridReward(), cfg, decode=tokenizer.decode, output_dir=tmp_path,
                                 queries=queries, tokenizer=tokenizer,
                                 agent_config=MemoryAgentConfig(chunk_tokens=100, memory_tokens=120))
    rollouts = []
    rollout_batch = trainer._rollout_batch
    trainer._rollout_batch = lambda groups, adv: rollouts.append((groups, adv, rollout_batch(groups, adv))) or \
        rollouts[-1][2]
    [metrics] = trainer.train_phase(cfg.phases[0], examples)

    [(groups, advantages, batch)] = rollouts
    trajectories = [t for g in groups for t in g.trajectories]
    assert [t.reward for t in trajectories] == [1.0, 0.0, 1.0, 0.0]  # every other trajectory forgets
    assert advantages[:, 0].gt(0).all() and advantages[:, 1].lt(0).all()
    steps = [step for t in trajectories for step in t.steps]
    assert len(batch.sequences) == len(steps) and sum(batch.response_tokens) == sum(t.generated_tokens
                                                                                   for t in trajectories)
    per_step = [a for t, a in zip(trajectories, advantages.flatten().tolist(), strict=True) for _ in t.steps]
    assert batch.advantages == pytest.approx(per_step)
    assert batch.rewards == [t.reward for t in trajectories for _ in t.steps]
    assert metrics["agent_steps_per_trajectory"] == pytest.approx(len(steps) / 4)
    assert metrics["reward_mean"] == 0.5 and metrics["updates"] == 1
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before.parameters(), strict=True))
    assert list((tmp_path / "checkpoints").glob("rl-agent-step000001*"))


def test_pipeline_memory_agent_stage_merges_and_evaluates(tmp_path, monkeypatch):
    """The pipeline's memory-agent stage on configs/tiny-l15.yaml cut small, after a stand-in for its phase:
    the expert trains (its KL measured against RL's start, the reference the RL trainer hands it), the policy
    becomes the SCE merge of the phase's policy and the expert over RL's start, and both answer as memory
    agents on documents past the window."""
    from pathlib import Path

    from qwenlong.config import load_config
    from qwenlong.merge import sce_merge_tensor
    from qwenlong.pipeline import build
    from qwenlong.pipeline.memory_agent_stage import memory_agent_stage
    from qwenlong.pipeline.run import Run, build_engine, build_reward
    from qwenlong.state.checkpoint import model_weights

    monkeypatch.setenv("QWENLONG_BACKEND", "torch")  # the kernels' PyTorch paths: the interpreter is slow
    root = Path(__file__).resolve().parent.parent
    small = ["sft.enabled=false", "eval.max_output_tokens=8", "eval.samples_per_prompt=1",
             "data.synthetic.num_train=120", "rl.dynamic_sampling.enabled=false", "rl.group_size=2",
             "rl.memory_agent.steps=1", "rl.memory_agent.synthetic_documents=2", "rl.memory_agent.prompts_per_step=2",
             "rl.memory_agent.memory_tokens=8", "rl.memory_agent.answer_tokens=8", "rl.memory_agent.chunk_tokens=200",
             # KL on, AEPO off (positive-only could leave no token in the loss, and no KL to log)
             "rl.kl_coef=0.1", "rl.entropy_control.entropy_low=null", "rl.entropy_control.entropy_high=null",
             "output.export=none", f"output.dir={tmp_path}"]
    cfg = load_config(root / "configs" / "tiny-l15.yaml", small)
    run = Run(cfg)
    # the phase the stage follows: the policy RL started from (the model as built), moved a little
    with torch.no_grad():
        for param in run.model.parameters():
            param.add_(torch.randn_like(param) * 0.01)
    run.backend.start(lr=1e-3, weight_decay=0.0, total_steps=1, warmup_steps=0, schedule="constant", grad_clip=1.0)
    phase_checkpoint = run.backend.save(tmp_path / "checkpoints" / "rl-long-docs-step000001", state={"step": 1})
    run.finish("rl:long-docs", phase_checkpoint)

    rl_start = build.build_model(cfg, run.tokenizer).requires_grad_(False)  # no SFT: the model as built
    memory_agent_stage(run, build_engine(run), build_reward(cfg), reference=rl_start)
    assert run.state["done"][-1] == "rl:memory-agent"
    assert set(run.state["agent_evals"]) == {"expert-agent", "merged-agent", "merged-full-context"}
    # the first update starts from the phase's policy: against RL's start its KL is > 0 (against itself, 0)
    [first_step] = run.logger.records("rl/memory-agent")
    assert first_step["kl_mean"] > 1e-6
    checkpoints = tmp_path / "checkpoints"
    base = rl_start.state_dict()
    full = model_weights(phase_checkpoint)
    expert = model_weights(checkpoints / "rl-memory-agent-step000001")
    merged = model_weights(checkpoints / "memory-agent-merged")
    assert run.state["last_checkpoint"].endswith("memory-agent-merged")
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, sce_merge_tensor(base[name], [full[name], expert[name]], 0.1), msg=name)
        torch.testing.assert_close(run.model.state_dict()[name], tensor, msg=name)  # the policy is the merge
    assert any(not torch.equal(merged[n], full[n]) and not torch.equal(merged[n], expert[n]) for n in merged)

    # the two-chunk documents (2 x 200 tokens) are past the 350-token window: cut in full-context mode, whole
    # for the agent
    def rows(label):
        text = (tmp_path / "eval" / f"memory-agent-{label}" / "predictions.jsonl").read_text()
        return [json.loads(line) for line in text.splitlines()]

    assert all(r["input_tokens"] > 350 for r in rows("merged-agent"))
    assert all(r["input_tokens"] <= 350 for r in rows("merged-full-context"))
    results = json.loads((tmp_path / "eval" / "memory-agent-merged-full-context" / "results.json").read_text())
    assert results["benchmarks"][0]["truncated"] == 2


class SyncedScriptedEngine(ScriptedEngine):
    """A ScriptedEngine that says every rank must call it together (as ZeRO-3 HF generate or placed vLLM)."""

    synced = True


def test_synced_engine_joins_every_call_of_the_busiest_rank(tokenizer):
    """On a synced engine a rank whose documents are shorter (here: one chunk, while another rank still reads
    its second) makes the same calls as the busiest rank, with no prompts; its own trajectories are unchanged."""
    queries = _queries(tokenizer, count=1, tokens=150)
    config = MemoryAgentConfig(chunk_tokens=200, memory_tokens=40, answer_tokens=20)
    alone = ScriptedEngine(tokenizer, reader(remember=True))
    [[expected]] = MemoryAgent(alone, tokenizer, config).rollout(queries, seed=3)
    assert alone.calls == [(1, 40), (1, 20)]  # one chunk, then the answer

    other_rank = iter([(True, False), (True, False), (False, True), (False, False)])  # two chunks, then its answer
    gathered = []

    def gather(mine):
        gathered.append(mine)
        return [mine, next(other_rank)]

    synced = SyncedScriptedEngine(tokenizer, reader(remember=True))
    [[trajectory]] = MemoryAgent(synced, tokenizer, config, gather=gather).rollout(queries, seed=3)
    # round 1: both read; round 2: this rank answers while the other reads; round 3: the other answers
    assert gathered == [(True, False), (False, True), (False, False), (False, False)]
    assert synced.calls == [(1, 40), (0, 40), (1, 20), (0, 20)]
    assert trajectory.answer == expected.answer and [s.response_ids for s in trajectory.steps] == \
        [s.response_ids for s in expected.steps]
    with pytest.raises(ValueError, match="gather: a synced engine"):
        MemoryAgent(synced, tokenizer, config)


# --- two processes: the stage under DeepSpeed ZeRO-3, data and sequence parallel ranks ---------------------------


def _whole_shape(tensor):
    return tuple(getattr(tensor, "ds_shape", tensor.shape))


def _check_zero3_merge_matches_one_process(shared):
    """``merge_into_model`` on a ZeRO-3 partitioned model (tied embeddings: one parameter under two names): the
    gathered result equals, element for element, the single-process SCE merge of the same three models, and is
    within float32 rounding of the float64 per-entry reference; sources that lack a tensor fail on both ranks."""
    from datetime import timedelta

    from test_merge import direct_sce

    from qwenlong.config.schema import DistributedConfig
    from qwenlong.distributed import build_backend, init_distributed
    from qwenlong.distributed.zero import checkpoint_weights
    from qwenlong.merge import merge_into_model, sce_merge_tensor

    cfg = DistributedConfig(backend="gloo", deepspeed_stage=3)
    ctx = init_distributed(cfg, timeout=timedelta(seconds=120))
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    backend = build_backend(model, ctx, cfg)
    assert model.get_input_embeddings().weight.numel() == 0  # partitioned from here on
    # three models drawn alike on both ranks (fresh seed per run of the test), written by rank 0
    seed = int(torch.randint(0, 2**31, (1,)).item()) if ctx.is_main else None
    generator = torch.Generator().manual_seed(ctx.broadcast(seed))
    shapes = {name: _whole_shape(t) for name, t in model.state_dict(keep_vars=True).items()}
    names = [n for n in shapes if n != "lm_head.weight"]  # tied: the embeddings' tensor
    base = {n: torch.randn(shapes[n], generator=generator) for n in names}
    full = {n: base[n] + 0.1 * torch.randn(shapes[n], generator=generator) for n in names}
    # the expert moved half of the entries only: the merge's sign election and weights differ per entry
    expert = {n: base[n] + 0.1 * torch.randn(shapes[n], generator=generator)
              * (torch.rand(shapes[n], generator=generator) < 0.5) for n in names}
    for state in (base, full, expert):
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    if ctx.is_main:
        for label, state in (("base", base), ("full", full), ("expert", expert)):
            (shared / label).mkdir(parents=True)
            torch.save(state, shared / label / "model.pt")
    ctx.barrier()
    backend.load_weights(shared / "expert")  # the expert is the model itself, as in the stage

    def sources():
        return checkpoint_weights(shared / "base"), [checkpoint_weights(shared / "full")]

    assert merge_into_model(model, sources if ctx.is_main else None,
                            lambda b, models: sce_merge_tensor(b, models, 0.3)) == len(names)
    merged = backend.state_dict()
    assert merged["lm_head.weight"] is merged["model.embed_tokens.weight"]
    for name in names:
        one_process = sce_merge_tensor(base[name], [full[name], expert[name]], 0.3)
        assert torch.equal(merged[name], one_process), name
        torch.testing.assert_close(merged[name].double(), direct_sce(base[name], [full[name], expert[name]], 0.3),
                                   rtol=1e-5, atol=1e-6, msg=name)
        assert not torch.equal(merged[name], expert[name]) and not torch.equal(merged[name], full[name]), name

    if ctx.is_main:
        (shared / "lacking").mkdir()
        torch.save({k: v for k, v in base.items() if k != "model.norm.weight"}, shared / "lacking" / "model.pt")
    ctx.barrier()
    with pytest.raises(ValueError, match=r"merge sources: 1 problem\(s\): base: model\.norm\.weight is missing"):
        merge_into_model(model, (lambda: (checkpoint_weights(shared / "lacking"), [])) if ctx.is_main else None,
                         lambda b, models: sce_merge_tensor(b, models))
    assert all(torch.equal(t, merged[n]) for n, t in backend.state_dict().items())  # left as it was


class LengthParityReward(HybridReward):
    """Rewards an answer of odd length: a random tiny policy gets mixed rewards, so the expert's step updates."""

    def score(self, items):
        from qwenlong.rewards.hybrid import RewardResult

        return [RewardResult(float(len(item.response) % 2), float(len(item.response) % 2), None, None)
                for item in items]


def _check_stage(shared, stage: int, sp_size: int):
    """The pipeline's memory-agent stage on configs/tiny-l15.yaml cut small, after a stand-in for its phase,
    under ``deepspeed_stage`` / ``sp_size`` on two ranks: the expert trains (rank 1 joins every rollout call
    without prompts of its own when it is an SP peer or the engine is synced), the policy becomes the SCE
    merge of the phase's policy and the expert over RL's start (as one process computes it from the
    checkpoints), it stays so through an optimizer step at lr 0 (DeepSpeed's fp32 copies follow the merge),
    and both models answer as memory agents, each rank its share."""
    from pathlib import Path

    from qwenlong.config import load_config
    from qwenlong.merge import sce_merge_tensor
    from qwenlong.pipeline import build
    from qwenlong.pipeline.memory_agent_stage import memory_agent_stage
    from qwenlong.pipeline.run import Run, build_engine
    from qwenlong.state.checkpoint import model_weights

    root = Path(__file__).resolve().parent.parent
    out = shared / f"stage-zero{stage}-sp{sp_size}"
    small = ["sft.enabled=false", "eval.max_output_tokens=6", "eval.samples_per_prompt=1",
             "data.synthetic.num_train=40", "data.synthetic.num_eval=4", "rl.dynamic_sampling.enabled=false",
             "rl.group_size=2", "rl.memory_agent.steps=1", "rl.memory_agent.synthetic_documents=3",
             "rl.memory_agent.prompts_per_step=3", "rl.memory_agent.memory_tokens=6",
             "rl.memory_agent.answer_tokens=6", "rl.memory_agent.chunk_tokens=200",
             "model.tiny.hidden_size=64", "model.tiny.intermediate_size=96", "output.export=none",
             f"distributed.deepspeed_stage={stage}", f"distributed.sp_size={sp_size}", f"output.dir={out}"]
    cfg = load_config(root / "configs" / "tiny-l15.yaml", small)
    run = Run(cfg)
    ctx = run.ctx
    # the phase the stage follows: the model as built (RL's start, no SFT), moved a little, as rank 0 writes it
    base = build.build_model(cfg, run.tokenizer).state_dict()
    generator = torch.Generator().manual_seed(8)
    moved = {name: t + 0.01 * torch.randn(t.shape, generator=generator) for name, t in base.items()}
    if ctx.is_main:
        (out / "moved").mkdir(parents=True)
        torch.save(moved, out / "moved" / "model.pt")
    ctx.barrier()
    run.backend.load_weights(out / "moved")
    run.backend.start(lr=1e-3, weight_decay=0.0, total_steps=1, warmup_steps=0, schedule="constant", grad_clip=1.0)
    phase_checkpoint = run.backend.save(out / "checkpoints" / "rl-long-docs-step000001", state={"step": 1})
    run.finish("rl:long-docs", phase_checkpoint)

    memory_agent_stage(run, build_engine(run), LengthParityReward())
    assert run.state["done"][-1] == "rl:memory-agent"
    evals = ctx.gather(run.state["agent_evals"])
    assert evals[0] == evals[1] and set(evals[0]) == {"expert-agent", "merged-agent", "merged-full-context"}
    checkpoints = out / "checkpoints"
    full = model_weights(phase_checkpoint)
    expert = model_weights(checkpoints / "rl-memory-agent-step000001")
    merged = model_weights(checkpoints / "memory-agent-merged")
    live = run.backend.state_dict()
    for name, tensor in merged.items():
        assert torch.equal(tensor, sce_merge_tensor(base[name], [full[name], expert[name]], 0.1)), name
        assert torch.equal(live[name], tensor), name
    assert any(not torch.equal(expert[n], full[n]) for n in merged)  # the expert trained
    assert any(not torch.equal(merged[n], full[n]) and not torch.equal(merged[n], expert[n]) for n in merged)

    run.backend.start(lr=0.0, weight_decay=0.0, total_steps=1, warmup_steps=0, schedule="constant", grad_clip=1.0)
    ids = torch.randint(0, 50, (12,), generator=torch.Generator().manual_seed(ctx.dp_rank)).tolist()
    hidden, _ = policy_hidden(run.model, pack_sequences([ids], [4]), ctx.sp_group)  # an SP rank: its token shard
    run.backend.backward(hidden.float().square().mean())
    run.backend.step()
    assert all(torch.equal(t, merged[n]) for n, t in run.backend.state_dict().items())
    if ctx.is_main:
        rows = (out / "eval" / "memory-agent-merged-agent" / "predictions.jsonl").read_text().splitlines()
        assert len(rows) == 3 and all(json.loads(r)["input_tokens"] > 350 for r in rows)


def _distributed_checks(tmp: str):
    from pathlib import Path

    shared = Path(tmp)
    _check_zero3_merge_matches_one_process(shared / "merge")
    for stage, sp_size in ((3, 1), (3, 2), (0, 1)):
        _check_stage(shared, stage, sp_size)


@pytest.mark.distributed
@pytest.mark.slow
def test_memory_agent_stage_under_zero3_and_sequence_parallel(tmp_path, free_port):
    import functools

    spawn(functools.partial(_distributed_checks, str(tmp_path)), 2, free_port, timeout_s=120, torchrun_env=True,
          preload=["transformers", "qwenlong.trainers", __name__])
