"""The LLM judge over real loopback HTTP (our OpenAI-compatible server), and the local-HF backend."""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import pytest

from qwenlong.data import build_prompt
from qwenlong.rewards import HybridReward, RewardItem, compute_score, set_default_reward
from qwenlong.rewards.judge import JudgeRequest, OpenAIJudge, make_judge, parse_verdict
from qwenlong.rewards.judge.local_hf import LocalHFJudge
from qwenlong.rewards.judge.server import ChatServer

ALIASES = {"new york city": {"nyc", "the big apple"}, "42": {"forty-two"}}


class FakeJudgeModel:
    """A deterministic judge: YES when Answer 1 is a known alias of Answer 2. Records what it saw,
    how many requests were in flight at once, and can fail, stall or talk nonsense on cue."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.requests: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.failures_left: dict[str, int] = {}  # prediction -> number of 500s to return first
        self._lock = threading.Lock()

    def __call__(self, messages, params):
        user = messages[-1]["content"]
        prediction = json.loads(re.search(r"Answer 1: (.*)", user).group(1))  # each field is a JSON string
        gold = json.loads(re.search(r"Answer 2: (.*)", user).group(1))
        with self._lock:
            self.requests.append({"messages": messages, "params": params})
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            fail = self.failures_left.get(prediction, 0)
            if fail:
                self.failures_left[prediction] = fail - 1
        try:
            time.sleep(self.delay)
            if fail or prediction == "always-500":
                raise RuntimeError("backend overloaded")
            if prediction == "slow":
                time.sleep(1.0)
            if prediction == "garbage":
                return "I would rather not say."
            if prediction == "echo":
                return messages[0]["content"]  # a judge that parrots its instructions
            same = prediction.lower() in ALIASES.get(gold.lower(), set())
            return f"Answer 1 and Answer 2 {'agree' if same else 'differ'}.\n[[{'YES' if same else 'NO'}]]"
        finally:
            with self._lock:
                self.in_flight -= 1


@pytest.fixture
def fake():
    return FakeJudgeModel()


@pytest.fixture
def server(fake):
    with ChatServer(fake, model="fake-judge") as s:
        assert s.url.startswith("http://127.0.0.1:")
        yield s


def said(answer: str) -> str:
    return f"<think>\nreading\n</think>\n\nTherefore, the answer is {answer}."


def test_parse_verdict_reads_only_the_final_verdict():
    assert parse_verdict("They match. [[YES]]") is True
    assert parse_verdict("[[YES]] at first, but no. [[NO]]") is False
    assert parse_verdict("[[ yes ]]") is True
    assert parse_verdict("YES, definitely") is None
    assert parse_verdict("final answer: [[YES]] or [[NO]]") is None  # echoed instruction is not a verdict


def test_judge_request_content_and_hybrid_scoring(server, fake):
    judge = OpenAIJudge(server.url, "fake-judge", api_key="k")
    reward = HybridReward(judge)
    question = "Which city hosts the headquarters?"
    prompt = build_prompt("Some long document.", question)
    from qwenlong.data import extract_question

    items = [
        RewardItem("hotpotqa", said("NYC"), "New York City", extract_question(prompt)),  # rule 0, judge YES
        RewardItem("hotpotqa", said("Boston"), "New York City", question),  # rule 0, judge NO
        RewardItem("hotpotqa", said("New York City"), "New York City", question),  # rule 1: judge not asked
        RewardItem("hotpotqa", "no think tag: the answer is NYC", "New York City", question),  # nothing to judge
        RewardItem("long_toc_choices", "<think>x</think>The correct answer is (A)", "B", question),  # letters exact
    ]
    results = reward.score(items)
    assert [r.score for r in results] == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert [r.judge_score for r in results] == [1.0, 0.0, None, None, None]
    assert len(fake.requests) == 2
    sent = next(r for r in fake.requests if 'Answer 1: "NYC"' in r["messages"][-1]["content"])
    assert sent["params"]["temperature"] == 0.0 and sent["params"]["model"] == "fake-judge"
    system, user = sent["messages"]
    assert system["role"] == "system" and "expert in verifying if two answers are the same" in system["content"]
    assert "exactly [[YES]] or [[NO]]" in system["content"]
    assert user["content"] == f'Problem: "{question}"\nAnswer 1: "NYC"\nAnswer 2: "New York City"'
    assert reward.metrics()["yes"] == 1 and reward.metrics()["no"] == 1


def test_async_and_sync_scoring_agree(server):
    import asyncio

    reward = HybridReward(OpenAIJudge(server.url, "fake-judge"))
    items = [RewardItem("narrativeqa", said(p), "New York City", "q") for p in ("NYC", "Boston", "New York")]
    assert asyncio.run(reward.ascore(items)) == reward.score(items)
    assert [r.score for r in reward.score(items)] == [1.0, 0.0, 1.0]


def test_cache_and_in_batch_deduplication(server, fake):
    judge = OpenAIJudge(server.url, "fake-judge")
    requests = [JudgeRequest("q", "42", "forty-two")] * 4 + [JudgeRequest("q", "42", "41")]
    assert judge.verdicts_sync(requests) == [True] * 4 + [False]
    assert len(fake.requests) == 2  # four identical requests asked once
    assert judge.verdicts_sync(requests) == [True] * 4 + [False]
    assert len(fake.requests) == 2  # all from the cache
    assert judge.stats["cache_hits"] == 5 and judge.stats["requests"] == 10
    assert judge.verdicts_sync([JudgeRequest("other question", "42", "forty-two")]) == [True]
    assert len(fake.requests) == 3  # the key includes the question


def test_retries_on_500_then_succeeds(server, fake):
    fake.failures_left["nyc"] = 2
    judge = OpenAIJudge(server.url, "fake-judge", max_retries=2, backoff=0.01)
    assert judge.verdicts_sync([JudgeRequest("q", "New York City", "nyc")]) == [True]
    assert len(fake.requests) == 3 and judge.stats["failures"] == 0


@pytest.mark.parametrize("prediction,reason", [("always-500", "http_500"), ("slow", "timeout"),
                                               ("garbage", "unparseable"), ("echo", "unparseable")])
def test_failures_fall_back_to_rule_score_and_are_counted(server, fake, prediction, reason):
    judge = OpenAIJudge(server.url, "fake-judge", timeout=0.3, max_retries=1, backoff=0.01)
    reward = HybridReward(judge)
    (result,) = reward.score([RewardItem("musique", said(prediction), "Paris", "q")])
    assert result.score == 0.0 and result.judge_score is None
    assert judge.stats["failures"] == 1 and judge.stats[f"failures/{reason}"] == 1
    retried = reason in ("http_500", "timeout")
    assert len(fake.requests) == (2 if retried else 1)


def test_client_errors_are_not_retried(server, fake):
    judge = OpenAIJudge(server.url + "/nowhere", "fake-judge", max_retries=3, backoff=0.01)
    assert judge.verdicts_sync([JudgeRequest("q", "a", "b")]) == [None]
    assert judge.stats["failures/http_404"] == 1 and not fake.requests


def test_connection_refused_is_a_counted_failure(free_port):
    judge = OpenAIJudge(f"http://127.0.0.1:{free_port}/v1", "m", max_retries=1, backoff=0.01)
    assert judge.verdicts_sync([JudgeRequest("q", "a", "b")]) == [None]
    assert judge.stats["failures/connection"] == 1


def test_concurrency_is_bounded(fake):
    fake.delay = 0.05
    with ChatServer(fake) as server:
        judge = OpenAIJudge(server.url, "judge", max_concurrency=3)
        verdicts = judge.verdicts_sync([JudgeRequest("q", "42", f"guess {i}") for i in range(12)])
    assert verdicts == [False] * 12
    assert len(fake.requests) == 12
    assert 1 < fake.max_in_flight <= 3


def test_verdicts_from_inside_a_running_event_loop(server):
    import asyncio

    judge = OpenAIJudge(server.url, "fake-judge")

    async def caller():
        return judge.verdicts_sync([JudgeRequest("q", "42", "forty-two")])

    assert asyncio.run(caller()) == [True]


def test_server_rejects_bad_requests(server):
    assert httpx.post(f"{server.url}/chat/completions", content=b"{not json").status_code == 400
    assert httpx.get(f"{server.url}/models").json()["data"][0]["id"] == "fake-judge"


def test_compute_score_uses_judge_from_environment(server, monkeypatch):
    monkeypatch.setenv("QWENLONG_JUDGE_URL", server.url)
    monkeypatch.setenv("QWENLONG_JUDGE_MODEL", "fake-judge")
    set_default_reward(None)
    try:
        prompt = build_prompt("doc", "Where?")
        assert compute_score("frames", said("the big apple"), "New York City", {"prompt": prompt}) == 1.0
        assert compute_score("frames", said("Boston"), "New York City", {"prompt": prompt}) == 0.0
    finally:
        set_default_reward(None)
    monkeypatch.delenv("QWENLONG_JUDGE_URL")
    assert compute_score("frames", said("the big apple"), "New York City") == 0.0  # rules alone
    set_default_reward(None)


def test_make_judge_config_errors():
    assert make_judge({"backend": "none"}) is None
    with pytest.raises(ValueError, match="backend"):
        make_judge({"backend": "carrier-pigeon"})
    with pytest.raises(ValueError, match="base_url"):
        make_judge({"backend": "openai", "model": "m"})
    with pytest.raises(ValueError, match="base_url"):
        OpenAIJudge("ftp://x", "m")


@pytest.fixture(scope="module")
def tiny_chat_model():
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qwenlong.data import train_demo_tokenizer
    from qwenlong.rewards.judge.prompt import SYSTEM_PROMPT

    tokenizer = train_demo_tokenizer([SYSTEM_PROMPT, "Problem: Answer 1: Answer 2: [[YES]] [[NO]]"], vocab_size=300)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024)
    return Qwen2ForCausalLM(config).eval(), tokenizer


@pytest.mark.slow  # imports transformers' Qwen2 model
def test_local_hf_judge_plumbing(tiny_chat_model, monkeypatch):
    model, tokenizer = tiny_chat_model
    judge = LocalHFJudge(model, tokenizer, max_new_tokens=4)
    text = judge.generate([{"role": "user", "content": "Problem: q"}])
    assert isinstance(text, str)  # a random model: real generation, unparseable words
    monkeypatch.setattr(judge, "generate", lambda messages, **kw: "Same value. [[YES]]")
    assert judge.verdicts_sync([JudgeRequest("q", "1", "one")]) == [True]
    monkeypatch.setattr(judge, "generate", lambda messages, **kw: "nonsense")
    assert judge.verdicts_sync([JudgeRequest("q", "1", "two")]) == [None]
    assert judge.stats["failures/unparseable"] == 1


def test_serve_judge_over_http_with_local_model(tiny_chat_model):
    model, tokenizer = tiny_chat_model
    local = LocalHFJudge(model, tokenizer, max_new_tokens=3)
    with ChatServer(lambda messages, params: local.generate(messages, params.get("max_tokens"))) as server:
        client = OpenAIJudge(server.url, "tiny", max_tokens=3)
        assert client.verdicts_sync([JudgeRequest("q", "a", "b")]) == [None]  # a random model gives no verdict
    assert client.stats["calls"] == 1 and client.stats["failures/unparseable"] == 1
