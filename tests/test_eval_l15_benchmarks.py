"""QwenLong-L1.5's added benchmarks (l15.md section 6): LongBench v2 and MRCR files in their releases'
formats, their scores, conversations fitted to the budget, and a `qwenlong eval` run over a mix."""

from __future__ import annotations

import json
from difflib import SequenceMatcher
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qwenlong.data import (
    DataError,
    DocQARecord,
    SyntheticConfig,
    fit_prompt_report,
    generate_records,
    load_records,
    reference_response,
    write_jsonl,
    write_parquet,
)
from qwenlong.data.tokens import encode
from qwenlong.eval import BENCHMARKS, find_benchmark_files, load_benchmark
from qwenlong.eval.chat import CHAT_HISTORY, FittedInput, fit_chat, fit_input
from qwenlong.eval.scoring import final_answer, mrcr_ratio, score_responses
from qwenlong.rewards import HybridReward

THINK = "<think>\nreading\n</think>\n\n"


def lbv2_row(n: int, answer: str = "B", **changes) -> dict:
    """A row of LongBench v2's data.json (its published fields)."""
    row = {"_id": f"66f3{n:04d}", "domain": "Single-Document QA", "sub_domain": "Financial",
           "difficulty": "hard" if n % 2 else "easy", "length": "short",
           "question": f"In which year did plant {n} open?", "choice_A": f"{1990 + n}", "choice_B": f"{2000 + n}",
           "choice_C": f"{2010 + n}", "choice_D": " None of the above ", "answer": answer,
           "context": f"Annual report {n}. " + f"Plant {n} opened in {2000 + n}, after years of planning. " * 30}
    row.update(changes)
    return row


def write_lbv2(path, rows) -> None:
    """data.json is one JSON array; the Hub's Parquet copy has the same columns."""
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text(json.dumps(rows), encoding="utf-8")


def mrcr_chat(n: int, turns: int = 4) -> list[dict]:
    """An MRCR conversation: asks for pieces of writing, the answers, then the request for one of them."""
    messages = []
    for t in range(turns):
        subject = "tapirs" if t % 2 == 0 else "rocks"
        messages += [{"role": "user", "content": f"write a poem about {subject}"},
                     {"role": "assistant", "content": f"Poem {n}.{t} about {subject}: " + f"line {t} of verse. " * 20}]
    messages.append({"role": "user", "content": f"Prepend Hx{n}Q7zB to the 2nd (1 indexed) poem about tapirs. "
                                                "Do not include any other text in your response."})
    return messages


def mrcr_row(n: int, **changes) -> dict:
    """A row of OpenAI MRCR's parquet files: the chat as JSON text, the prefixed answer, the counts."""
    chat = mrcr_chat(n)
    row = {"prompt": json.dumps(chat), "answer": f"Hx{n}Q7zB" + chat[5]["content"],
           "random_string_to_prepend": f"Hx{n}Q7zB", "n_needles": 2, "desired_msg_index": 5,
           "total_messages": len(chat), "n_chars": sum(len(m["content"]) for m in chat), "date_added": "04-12-2025"}
    row.update(changes)
    return row


def write_mrcr(path, rows) -> None:
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.mark.parametrize("suffix", [".json", ".parquet"])
def test_longbench_v2_release_rows_load_with_lettered_choices(tmp_path, qwen, suffix):
    path = tmp_path / f"data{suffix}"
    write_lbv2(path, [lbv2_row(1, "B"), lbv2_row(2, "D")])
    records = load_benchmark("lbv2", path)
    assert [(r.id, r.answers, r.data_source) for r in records] == [("66f30001", ("B",), "longbench_v2"),
                                                                    ("66f30002", ("D",), "longbench_v2")]
    first = records[0]
    assert first.choices == ("1991", "2001", "2011", "None of the above")
    assert first.question == "In which year did plant 1 open?" and first.document.startswith("Annual report 1.")
    assert dict(first.metadata) == {"domain": "Single-Document QA", "sub_domain": "Financial", "difficulty": "hard",
                                    "length": "short"}
    prompt = fit_input(qwen, first, 100_000).prompt
    assert "In which year did plant 1 open?\n(A) 1991\n(B) 2001\n(C) 2011\n(D) None of the above\n" in prompt
    assert prompt.startswith("Please read the following text") and "<text>\nAnnual report 1." in prompt
    # saved as our rows (an eval_files file), they load back the same, through either loader
    write_jsonl(records, tmp_path / "lbv2.jsonl")
    assert load_benchmark("lbv2", tmp_path / "lbv2.jsonl") == records
    assert load_records(tmp_path / "lbv2.jsonl").records == records


def test_longbench_v2_bad_rows_name_the_file_the_item_and_the_field(tmp_path):
    path = tmp_path / "data.json"
    no_choice = lbv2_row(2)
    del no_choice["choice_C"]
    rows = [lbv2_row(1), no_choice, lbv2_row(3, "E"), lbv2_row(4, "b"), lbv2_row(6, "AB"), lbv2_row(7, "BCD")]
    write_lbv2(path, rows)
    with pytest.raises(DataError, match=r"data\.json: record '66f30002': choice_C: missing"):
        load_benchmark("lbv2", path)
    # E is no option; "b" is a letter, not "B"; "AB" and "BCD" are not one letter (substrings of "ABCD")
    loaded = load_benchmark("lbv2", path, skip_malformed=True)
    assert [r.id for r in loaded] == ["66f30001"]
    write_lbv2(path, [lbv2_row(3, "E")])
    with pytest.raises(DataError, match=r"record '66f30003': answer: expected one letter of ABCD, got \('E',\)"):
        load_benchmark("lbv2", path)
    no_answer = lbv2_row(5)
    del no_answer["answer"]
    write_lbv2(path, [no_answer])
    with pytest.raises(DataError, match=r"data\.json: item 0: answer: missing"):
        load_benchmark("lbv2", path)


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_mrcr_release_rows_load_as_conversations(tmp_path, qwen, suffix):
    path = tmp_path / f"2needle{suffix}"
    write_mrcr(path, [mrcr_row(0), mrcr_row(1), mrcr_row(2)])
    records = load_benchmark("mrcr", path)
    where = "0" if suffix == ".parquet" else "1"  # 0-based rows, 1-based lines
    assert [r.id for r in records][0] == f"2needle-{where}" and len({r.id for r in records}) == 3
    record, chat = records[1], mrcr_chat(1)
    assert record.data_source == "mrcr" and record.document == ""
    assert record.question == chat[-1]["content"] and record.metadata[CHAT_HISTORY] == chat[:-1]
    assert record.answers == (mrcr_row(1)["answer"],)
    assert {k: record.metadata[k] for k in ("random_string_to_prepend", "n_needles", "desired_msg_index",
                                            "total_messages", "date_added")} == {
        "random_string_to_prepend": "Hx1Q7zB", "n_needles": 2, "desired_msg_index": 5, "total_messages": 9,
        "date_added": "04-12-2025"}
    assert len(load_benchmark("mrcr", path, limit=2)) == 2
    write_mrcr(path, [mrcr_row(3, prompt=json.dumps(mrcr_chat(3)[-1:]))])  # the request alone: no earlier turns
    (alone,) = load_benchmark("mrcr", path)
    assert alone.metadata[CHAT_HISTORY] == [] and fit_input(qwen, alone, 10**6).prompt == mrcr_chat(3)[-1:]
    # a subset saved as our rows loads back as the same conversations
    write_jsonl(records, tmp_path / "subset.jsonl")
    write_parquet(records, tmp_path / "subset.parquet")
    assert load_benchmark("mrcr", tmp_path / "subset.jsonl") == records
    assert load_benchmark("mrcr", tmp_path / "subset.parquet") == records


def test_mrcr_bad_rows_name_the_file_the_row_and_the_field(tmp_path):
    path = tmp_path / "mrcr.parquet"
    last_is_assistant = json.dumps(mrcr_chat(3)[:-1])
    cases = [(mrcr_row(1, prompt="[{'role': 'user'"), r"row 0: prompt: expected chat messages or JSON text of "
                                                       r"them, got invalid JSON"),
             (mrcr_row(2, prompt=last_is_assistant), r"row 0: prompt: the last message must be the user's request, "
                                                     r"got a assistant turn"),
             (mrcr_row(3, prompt=json.dumps([{"role": "user"}])), r"row 0: prompt: message 0 \(user\) has no text"),
             (mrcr_row(4, prompt=json.dumps([{"role": "human", "content": "hi"}])),
              r"row 0: prompt: message 0 needs a role in"),
             (mrcr_row(5, random_string_to_prepend=""), r"row 0: random_string_to_prepend: expected the string"),
             (mrcr_row(6, answer=None), r"row 0: answer: expected the reference text")]
    for row, message in cases:
        write_mrcr(path, [row])
        with pytest.raises(DataError, match=rf"mrcr\.parquet: {message}"):
            load_benchmark("mrcr", path)
    jsonl = tmp_path / "mrcr.jsonl"
    jsonl.write_text(json.dumps(mrcr_row(1)) + "\n{not json\n" + json.dumps(mrcr_row(2)) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"mrcr\.jsonl: line 2: invalid JSON"):
        load_benchmark("mrcr", jsonl)
    assert [r.id for r in load_benchmark("mrcr", jsonl, skip_malformed=True)] == ["mrcr-1", "mrcr-3"]


def test_mrcr_grade_by_hand_and_against_difflib():
    # "abcd" vs "bcde": one matching block "bcd" of 3, ratio 2 * 3 / (4 + 4)
    assert mrcr_ratio("PFXabcd", "PFXbcde", "PFX") == 0.75
    assert mrcr_ratio("PFXabcd", "PFXabcd", "PFX") == 1.0
    assert mrcr_ratio("abcd", "PFXabcd", "PFX") == 0.0  # the answer must open with the random string
    assert mrcr_ratio(" PFXabcd", "PFXabcd", "PFX") == 0.0
    assert mrcr_ratio("pfxabcd", "PFXabcd", "PFX") == 0.0  # case counts
    assert mrcr_ratio("PFXabcd", "abcd", "PFX") == 1.0  # a reference without the prefix is compared as is
    assert mrcr_ratio("PFX", "PFXabcd", "PFX") == 0.0  # the prefix alone reproduces nothing
    reference = "Hx1Q7zBTapirs wade at dusk,\nsnouts low over the river."
    answer = "Hx1Q7zBTapirs wade at dawn,\nsnouts low over a river!"
    expected = SequenceMatcher(None, answer[7:], reference[7:]).ratio()
    assert 0.8 < expected < 1.0 and mrcr_ratio(answer, reference, "Hx1Q7zB") == expected


def test_mrcr_scores_the_answer_after_the_reasoning(tmp_path):
    path = tmp_path / "mrcr.parquet"
    write_mrcr(path, [mrcr_row(1)])
    (record,) = load_benchmark("mrcr", path)
    reference = record.answer
    assert final_answer("<think>Hx1Q7zB is the prefix</think>\n\nHx1Q7zBPoem") == "Hx1Q7zBPoem"
    assert final_answer("Hx1Q7zBPoem") == "Hx1Q7zBPoem"
    assert final_answer(" Hx1Q7zBPoem") == " Hx1Q7zBPoem"  # without reasoning, graded as it is
    responses = [THINK + reference,  # exact: 1
                 "<think>the 2nd poem about tapirs... Hx1Q7zB" + reference,  # cut off while thinking: 0
                 THINK + reference[:-40],  # partly reproduced
                 THINK + "Sure! " + reference]  # text before the random string: 0
    results = score_responses(HybridReward(), [record] * 4, responses)
    partly = SequenceMatcher(None, reference[7:-40], reference[7:]).ratio()
    assert [r.score for r in results] == [1.0, 0.0, pytest.approx(partly), 0.0]
    assert [r.rule_score for r in results] == [r.score for r in results]
    assert results[0].prediction == reference and all(r.judge_score is None for r in results)


@pytest.mark.parametrize("response, letter, score", [
    (THINK + "The correct answer is (B)", "B", 1.0),  # LongBench v2's own format line
    (THINK + "**The correct answer is B**", "B", 1.0),  # emphasis stripped
    (THINK + "Therefore, the answer is (b).", "B", 1.0),  # our format line, lower case in parentheses
    (THINK + "The answer is (A). On reflection, the correct answer is (B).", "B", 1.0),  # the last one counts
    (THINK + "Therefore, the answer is (C)", "C", 0.0),
    (THINK + "Therefore, the answer is a dog", None, 0.0),  # an article is no letter
    ("The correct answer is (B)", None, 0.0),  # no </think>: the reasoning never ended
])
def test_longbench_v2_letter_extraction(tmp_path, response, letter, score):
    path = tmp_path / "data.json"
    write_lbv2(path, [lbv2_row(1, "B")])
    (result,) = score_responses(HybridReward(), load_benchmark("lbv2", path), [response])
    assert (result.prediction, result.score) == (letter, score)


def test_one_batch_mixes_conversations_and_documents(tmp_path, qwen):
    write_lbv2(tmp_path / "data.json", [lbv2_row(1, "B")])
    write_mrcr(tmp_path / "mrcr.parquet", [mrcr_row(1)])
    (lbv2,) = load_benchmark("lbv2", tmp_path / "data.json")
    (mrcr,) = load_benchmark("mrcr", tmp_path / "mrcr.parquet")
    (numeric,) = generate_records(1, SyntheticConfig(task="arithmetic", document_tokens=100), seed=1, tokenizer=qwen)
    asked = []

    class Recording(HybridReward):
        def score(self, items):
            asked.append([item.data_source for item in items])
            return super().score(items)

    records = [mrcr, lbv2, numeric, mrcr]
    responses = [THINK + mrcr.answer, THINK + "The correct answer is (A)", reference_response(numeric), "no prefix"]
    results = score_responses(Recording(), records, responses)
    assert [r.score for r in results] == [1.0, 0.0, 1.0, 0.0]
    assert asked == [["longbench_v2", "synthetic_arithmetic"]]  # the DocQA items in one call, in order
    with pytest.raises(ValueError, match="responses: 1 for 2 records"):
        score_responses(HybridReward(), [lbv2, mrcr], ["x"])


def test_conversations_fit_by_losing_their_middle_turns(qwen):
    chat = mrcr_chat(1, turns=6)
    history, request = chat[:-1], chat[-1]["content"]
    sizes = [len(encode(qwen, m["content"])) for m in chat]
    whole = fit_chat(qwen, history, request, sum(sizes))
    assert (whole.prompt, whole.num_tokens, whole.truncated) == (chat, sum(sizes), False)
    for budget in (sum(sizes) - 1, 300, 120, sizes[-1] + 2):
        fitted = fit_chat(qwen, history, request, budget)
        messages = fitted.prompt
        assert fitted.truncated and fitted.num_tokens <= budget
        assert fitted.num_tokens == sum(len(encode(qwen, m["content"])) for m in messages)
        assert messages[-1] == chat[-1]  # the request whole, last
        assert all(a["role"] != b["role"] for a, b in zip(messages, messages[1:], strict=False))  # alternating
        assert messages[0]["content"][:5] == chat[0]["content"][:5] == "write"  # the opening kept
        assert len(messages) < len(chat) or budget == sum(sizes) - 1
    fitted = fit_chat(qwen, history, request, 300).prompt  # 150 tokens from each end of the history
    assert fitted[0] == chat[0] and fitted[-2]["content"].endswith(chat[-2]["content"][-100:])
    # one long turn is cut inside itself, like a document
    long_turn = [{"role": "assistant", "content": "word " * 500}]
    fitted = fit_chat(qwen, long_turn, "Repeat it.", 101)
    assert [m["role"] for m in fitted.prompt] == ["assistant", "user"] and fitted.num_tokens <= 101
    with pytest.raises(ValueError, match="max_input_tokens: 5 leaves no room for the conversation"):
        fit_chat(qwen, history, request, 5)


def test_chat_records_render_turn_by_turn(tmp_path, qwen):
    write_mrcr(tmp_path / "mrcr.parquet", [mrcr_row(1)])
    (record,) = load_benchmark("mrcr", tmp_path / "mrcr.parquet")
    fitted = fit_input(qwen, record, 200)
    text = qwen.apply_chat_template(fitted.prompt, tokenize=False, add_generation_prompt=True)
    assistant_turns = sum(m["role"] == "assistant" for m in fitted.prompt)
    assert assistant_turns >= 1 and text.count("<|im_start|>assistant\n") == assistant_turns + 1
    assert text.endswith(f"{record.question}<|im_end|>\n<|im_start|>assistant\n")
    # a document record's input is the method's prompt, as before
    (docqa,) = generate_records(1, SyntheticConfig(task="retrieval", document_tokens=600), seed=2, tokenizer=qwen)
    expected = fit_prompt_report(qwen, docqa, 300, chat=False)
    assert expected.truncated and fit_input(qwen, docqa, 300) == FittedInput(expected.text, expected.num_tokens, True)


def test_benchmark_files_are_found_by_key(tmp_path):
    write_lbv2(tmp_path / "lbv2.json", [lbv2_row(1)])
    write_mrcr(tmp_path / "mrcr.parquet", [mrcr_row(1)])
    files = find_benchmark_files(tmp_path)
    assert files == {"lbv2": tmp_path / "lbv2.json", "mrcr": tmp_path / "mrcr.parquet"}
    assert [BENCHMARKS[k].title for k in files] == ["LBV2", "MRCR"]
    assert list(BENCHMARKS)[:4] == ["docmath", "lbv2", "frames", "mrcr"]  # the L1.5 table's column order


def test_eval_command_reports_longbench_v2_in_the_average(tmp_path, monkeypatch, qwen):
    """`qwenlong eval --data lbv2=... --data docmath=...` end to end, a server answering from the files."""
    from qwenlong.cli import main
    from qwenlong.eval import generation
    from qwenlong.pipeline import eval_command

    write_lbv2(tmp_path / "data.json", [lbv2_row(n, "ABCD"[n % 4]) for n in range(4)])
    lbv2 = load_benchmark("lbv2", tmp_path / "data.json")
    docmath = list(generate_records(2, SyntheticConfig(task="arithmetic", document_tokens=200), seed=3,
                                    tokenizer=qwen))
    write_jsonl(docmath, tmp_path / "docmath.jsonl")

    def answer(prompt: str) -> str:
        for n, record in enumerate(lbv2):
            if record.document[:40] in prompt:  # right on all but the last item
                return THINK + f"The correct answer is ({record.answer if n < 3 else 'A'})"
        return reference_response(next(r for r in docmath if r.document[:100] in prompt))

    monkeypatch.setattr(eval_command, "_load_tokenizer", lambda path: qwen)
    monkeypatch.setattr(generation, "openai_generate_fn",
                        lambda *args, **kwargs: lambda prompts: [answer(p) for p in prompts])
    out = tmp_path / "out"
    assert main(["eval", "--api-url", "http://127.0.0.1:1/v1", "--api-model", "served", "--tokenizer", "qwen",
                 "--data", f"lbv2={tmp_path / 'data.json'}", "--data", f"docmath={tmp_path / 'docmath.jsonl'}",
                 "--no-judge", "--no-progress", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [(b["name"], b["num_items"], b["accuracy"]) for b in results["benchmarks"]] == [("DocMath", 2, 100.0),
                                                                                           ("LBV2", 4, 75.0)]
    assert results["average"] == 87.5
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert {r["id"]: r["prediction"] for r in rows if r["benchmark"] == "LBV2"} == {
        "66f30000": "A", "66f30001": "B", "66f30002": "C", "66f30003": "A"}
    assert "| DocMath | LBV2 | avg |" in (out / "results.md").read_text()


# --- once qwenlong/eval/harness.py, generation.py, data/prompt.py take conversations (see the report) ---

def test_eval_command_scores_mrcr_conversations_turn_by_turn(tmp_path, monkeypatch, qwen):
    """`qwenlong eval --data mrcr=... --data lbv2=...`: MRCR's chats reach the server as turns, cut to the
    budget in the middle; MRCR scores its mean similarity, and the average takes it in."""
    from qwenlong.cli import main
    from qwenlong.eval import generation
    from qwenlong.pipeline import eval_command

    write_mrcr(tmp_path / "2needle.parquet", [mrcr_row(0), mrcr_row(1)])
    mrcr = load_benchmark("mrcr", tmp_path / "2needle.parquet")
    write_lbv2(tmp_path / "data.json", [lbv2_row(1, "B"), lbv2_row(2, "C")])
    lbv2 = load_benchmark("lbv2", tmp_path / "data.json")
    chats = []

    def answer(prompt) -> str:
        if isinstance(prompt, list):
            chats.append(prompt)
            record = next(r for r in mrcr if r.question == prompt[-1]["content"])
            return THINK + (record.answer if record.id == "2needle-0" else record.answer[:60])
        return THINK + f"The correct answer is ({next(r for r in lbv2 if r.document[:40] in prompt).answer})"

    monkeypatch.setattr(eval_command, "_load_tokenizer", lambda path: qwen)
    monkeypatch.setattr(generation, "openai_generate_fn",
                        lambda *args, **kwargs: lambda prompts: [answer(p) for p in prompts])
    out = tmp_path / "out"
    assert main(["eval", "--api-url", "http://127.0.0.1:1/v1", "--api-model", "served", "--tokenizer", "qwen",
                 "--data", f"mrcr={tmp_path / '2needle.parquet'}", "--data", f"lbv2={tmp_path / 'data.json'}",
                 "--max-input-tokens", "200", "--no-judge", "--no-progress", "--out", str(out)]) == 0
    half = SequenceMatcher(None, mrcr[1].answer[7:60], mrcr[1].answer[7:]).ratio()
    results = json.loads((out / "results.json").read_text())
    assert [(b["name"], b["truncated"]) for b in results["benchmarks"]] == [("LBV2", 2), ("MRCR", 2)]
    assert [b["accuracy"] for b in results["benchmarks"]] == [100.0, pytest.approx(100 * (1 + half) / 2)]
    assert results["average"] == pytest.approx((100 + 100 * (1 + half) / 2) / 2)
    assert len(chats) == 2 and all(c[-1]["role"] == "user" and c[-2]["role"] == "assistant" for c in chats)
    assert all(sum(len(encode(qwen, m["content"])) for m in c) <= 200 for c in chats)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert {r["id"]: r["score"] for r in rows if r["benchmark"] == "MRCR"} == {"2needle-0": 1.0,
                                                                              "2needle-1": pytest.approx(half)}


def test_conversations_reach_the_model_as_turns(tmp_path, qwen):
    """Both generate functions send a conversation as its turns: an OpenAI server gets the messages, an
    in-process model their chat template."""
    from qwenlong.data import apply_chat_template
    from qwenlong.eval import openai_generate_fn
    from qwenlong.rewards.judge.server import ChatServer

    chat = mrcr_chat(1)
    text = apply_chat_template(qwen, chat)
    assert text.count("<|im_start|>assistant\n") == 5 and text.count("<|im_start|>user\n") == 5
    assert apply_chat_template(qwen, "plain text") == apply_chat_template(qwen, [{"role": "user",
                                                                                  "content": "plain text"}])
    received = []

    def reply(messages, params):
        received.append(messages)
        return "ok"

    with ChatServer(reply, model="policy") as server:
        generate = openai_generate_fn(server.url, "policy", max_concurrency=2)
        assert generate([chat, chat, "one turn"]) == ["ok"] * 3
    assert sorted(map(len, received)) == [1, len(chat), len(chat)]
    assert [{"role": m["role"], "content": m["content"]} for m in max(received, key=len)] == chat


def test_the_memory_agent_refuses_conversations(tmp_path, capsys):
    from qwenlong.cli import main

    write_mrcr(tmp_path / "mrcr.parquet", [mrcr_row(1)])
    assert main(["eval", "--model", str(tmp_path), "--agent", "memory", "--data",
                 f"mrcr={tmp_path / 'mrcr.parquet'}"]) == 2
    assert "--agent memory: reads documents chunk by chunk; MRCR's input is a conversation" in capsys.readouterr().err


def test_saved_benchmarks_evaluate_as_a_runs_held_out_split(tmp_path, qwen):
    """eval_files: LBV2 and MRCR saved as our rows load through load_records and evaluate per data source,
    as a run's held-out evaluation does (the chat template counted in the budget)."""
    from qwenlong.eval import evaluate
    from qwenlong.rewards import rule_score
    from qwenlong.rewards.rules import RuleKind

    write_lbv2(tmp_path / "data.json", [lbv2_row(1, "B"), lbv2_row(2, "C")])
    write_mrcr(tmp_path / "2needle.parquet", [mrcr_row(0), mrcr_row(1)])
    records = load_benchmark("lbv2", tmp_path / "data.json") + load_benchmark("mrcr", tmp_path / "2needle.parquet")
    write_parquet(records, tmp_path / "heldout.parquet")
    loaded = load_records(tmp_path / "heldout.parquet").records
    assert loaded == records
    splits: dict[str, list] = {}
    for record in loaded:
        splits.setdefault(record.data_source, []).append(record)

    def generate(prompts):
        return [THINK + (next(r for r in loaded if r.question == p[-1]["content"]).answer if isinstance(p, list)
                         else "The correct answer is (B)") for p in prompts]

    report = evaluate(splits, generate, qwen, max_input_tokens=300, chat_template_in_budget=True, progress=False)
    assert [(b.name, b.accuracy) for b in report.benchmarks] == [("longbench_v2", 50.0), ("mrcr", 100.0)]
    with pytest.raises(ValueError, match="MRCR items are scored against their record's random prefix"):
        rule_score(RuleKind.SIMILARITY, "x", "y")


def test_a_conversation_fits_the_budget_with_the_chat_template_counted(qwen):
    """With the chat template in the budget (the pipeline's held-out evaluation) every kept turn brings its role
    markers: the templated conversation the model receives fits the budget, and uses most of it."""
    from qwenlong.data import apply_chat_template
    from qwenlong.eval import evaluate

    chat = mrcr_chat(1, turns=40)  # 80 turns of history, then the request
    record = DocQARecord(id="m", data_source="mrcr", document="", question=chat[-1]["content"], answers=("x",),
                         metadata={CHAT_HISTORY: chat[:-1], "random_string_to_prepend": "Hx1Q7zB"})
    seen = []

    def generate(prompts):
        seen.extend(len(apply_chat_template(qwen, p, tokenize=True)) for p in prompts)
        return ["x"] * len(prompts)

    for budget in (1000, 3000):
        seen.clear()
        evaluate({"mrcr": [record]}, generate, qwen, max_input_tokens=budget, chat_template_in_budget=True,
                 progress=False)
        assert budget - 64 <= seen[0] <= budget, (budget, seen)


def test_the_memory_agent_stage_leaves_conversations_out_of_its_evaluations(tmp_path, qwen):
    """The L1.5 recipe's held-out files hold MRCR; the memory-agent stage evaluates its agent on them, and a
    conversation has no document to read chunk by chunk (its message list crashed the agent after the stage's
    training): it keeps the documents only."""
    from types import SimpleNamespace

    from qwenlong.config import load_config
    from qwenlong.pipeline.memory_agent_stage import _records

    write_lbv2(tmp_path / "data.json", [lbv2_row(1, "B"), lbv2_row(2, "C")])
    write_mrcr(tmp_path / "2needle.parquet", [mrcr_row(0)])
    records = load_benchmark("lbv2", tmp_path / "data.json") + load_benchmark("mrcr", tmp_path / "2needle.parquet")
    write_parquet(records, tmp_path / "heldout.parquet")
    config = Path(__file__).resolve().parents[1] / "configs" / "qwenlong-l1.5.yaml"
    cfg = load_config(config, [f"data.eval_files=[{tmp_path / 'heldout.parquet'}]"])
    run = SimpleNamespace(cfg=cfg, tokenizer=qwen)
    assert [r.id for r in _records(run, "eval")] == [r.id for r in records[:2]]


def test_a_source_only_evaluation_scores_is_refused_as_training_data(tmp_path):
    """MRCR has no reward rule (its grade needs the record's prefix): in training files it is refused when the
    data loads, not when the first step scores a batch it generated."""
    from qwenlong.config import load_config
    from qwenlong.pipeline import build

    write_mrcr(tmp_path / "2needle.parquet", [mrcr_row(0)])
    write_parquet(load_benchmark("mrcr", tmp_path / "2needle.parquet"), tmp_path / "mixed.parquet")
    config = Path(__file__).resolve().parents[1] / "configs" / "qwenlong-l1.5.yaml"
    cfg = load_config(config, [f"data.train_files=[{tmp_path / 'mixed.parquet'}]",
                               f"data.eval_files=[{tmp_path / 'mixed.parquet'}]"])
    with pytest.raises(DataError, match=r"data\.train_files: record '2needle-0' of data source 'mrcr' is scored by "
                                        r"evaluation only"):
        build.load_split(cfg, "train")
    assert [r.id for r in build.load_split(cfg, "eval")] == ["2needle-0"]  # evaluation reads it
