"""Phased curriculum and difficulty-aware retrospective sampling on scripted reward histories."""

from __future__ import annotations

import json
import random

import pytest

from qwenlong.curriculum import (
    Phase,
    PromptSampler,
    RetrospectiveSampling,
    RetrospectiveSelection,
    RewardHistory,
    examples_for_phase,
    input_floors,
    max_carried_examples,
    select_retrospective,
)

PHASE_20K = Phase("20k", max_input_tokens=20_000, max_output_tokens=10_000, steps=100)
PHASE_60K = Phase("60k", max_input_tokens=60_000, max_output_tokens=10_000, steps=100)


def test_phase_validation_names_the_field():
    with pytest.raises(ValueError, match="steps"):
        Phase("p", 10, 10)
    with pytest.raises(ValueError, match="steps"):
        Phase("p", 10, 10, steps=5, epochs=1)
    with pytest.raises(ValueError, match="max_input_tokens"):
        Phase("p", 0, 10, steps=1)
    with pytest.raises(ValueError, match="epochs"):
        Phase("p", 10, 10, epochs=0)
    with pytest.raises(ValueError, match="name"):
        Phase("", 10, 10, steps=1)


def test_examples_for_phase_keeps_fitting_prompts_in_order():
    examples = [{"id": i, "tokens": n} for i, n in enumerate([100, 25_000, 20_000, 20_001, 5])]
    kept = examples_for_phase(examples, PHASE_20K, lambda e: e["tokens"])
    assert [e["id"] for e in kept] == [0, 2, 4]
    assert len(examples_for_phase(examples, PHASE_60K, lambda e: e["tokens"])) == 5


def test_input_floors_default_past_the_previous_budget_and_min_input_tokens_moves_them():
    rereading = Phase("120k-merged", max_input_tokens=60_000, max_output_tokens=10_000, steps=1, min_input_tokens=0)
    middle = Phase("mid", max_input_tokens=60_000, max_output_tokens=10_000, steps=1, min_input_tokens=5_000)
    assert input_floors([PHASE_20K, PHASE_60K, rereading]) == [0, 20_001, 0]
    assert input_floors([PHASE_20K, middle]) == [0, 5_000]
    # the floor decides which prompts are a phase's own: each length checked against the range by hand
    rng = random.Random(7)
    lengths = [rng.randrange(0, 70_000) for _ in range(300)] + [0, 20_000, 20_001, 60_000, 60_001]
    examples = [{"id": i, "tokens": n} for i, n in enumerate(lengths)]
    for phases in ([PHASE_20K, PHASE_60K], [PHASE_20K, PHASE_60K, rereading], [PHASE_20K, middle]):
        for phase, floor in zip(phases, input_floors(phases), strict=True):
            kept = examples_for_phase(examples, phase, lambda e: e["tokens"], floor)
            assert [e["id"] for e in kept] == [i for i, n in enumerate(lengths) if floor <= n <= phase.max_input_tokens]
    second = examples_for_phase(examples, PHASE_60K, lambda e: e["tokens"], input_floors([PHASE_20K, PHASE_60K])[1])
    third = examples_for_phase(examples, rereading, lambda e: e["tokens"], 0)
    assert {e["id"] for e in second} < {e["id"] for e in third}  # re-reading adds the first phase's prompts
    with pytest.raises(ValueError, match="min_input_tokens: expected 0 <= min_input_tokens <= max_input_tokens=10"):
        Phase("p", 10, 10, steps=1, min_input_tokens=11)


def test_reward_history_accumulates_and_round_trips_json():
    history = RewardHistory()
    history.record("a", [1.0, 0.0, 0.5, 1.0], response_tokens=[30, 0, 12, 7], phase="20k")
    history.record("a", [0.0, 1.0], response_tokens=[40, 50], phase="60k")
    history.record("b", [1.0, 1.0])
    a = history["a"]
    assert (a.rollouts, a.accurate, a.min_response_tokens, a.last_phase) == (6, 3, 0, "60k")
    assert a.mean_reward == pytest.approx(3.5 / 6) and a.difficulty == pytest.approx(1 - 3.5 / 6)
    assert history["b"].all_solved and not a.all_solved and history["b"].min_response_tokens is None
    restored = RewardHistory.from_json(json.loads(json.dumps(history.to_json())))
    assert list(restored) == ["a", "b"] and restored["a"] == a and restored["b"] == history["b"]
    with pytest.raises(ValueError, match="example_id"):
        history.record(3, [1.0])
    with pytest.raises(ValueError, match="response_tokens"):
        history.record("c", [1.0, 0.0], response_tokens=[4])
    with pytest.raises(ValueError, match="version"):
        RewardHistory.from_json({"version": 99, "examples": {}})


def scripted_history() -> tuple[RewardHistory, dict[str, int]]:
    history = RewardHistory()
    history.record("solved", [1.0] * 8, [100] * 8)
    history.record("easy", [1.0] * 5 + [0.0] * 3, [100] * 8)  # mean 0.625
    history.record("borderline", [1.0] * 4 + [0.0] * 4, [100] * 8)  # mean 0.5: not below 0.5
    history.record("hard", [1.0] + [0.0] * 7, [100] * 8)
    history.record("unsolved", [0.0] * 8, [9_000] * 8)
    history.record("long-prompt", [0.0] * 8, [100] * 8)
    history.record("long-output", [0.0] * 8, [12_000] * 8)
    history.record("in-next", [0.0] * 8, [100] * 8)
    candidates = {name: 15_000 for name in history}
    candidates["long-prompt"] = 70_000
    candidates["never-rolled"] = 1_000
    return history, candidates


def test_select_retrospective_reasons_on_scripted_history():
    history, candidates = scripted_history()
    selection = select_retrospective(history, candidates, PHASE_60K, next_phase_size=100, exclude={"in-next"})
    reasons = {d.example_id: d.reason.split(":")[0] for d in selection.decisions}
    assert reasons == {
        "solved": "all solved",
        "easy": "easy",
        "borderline": "easy",
        "hard": "carried",
        "unsolved": "carried",
        "long-prompt": "input too long",
        "long-output": "output too long",
        "in-next": "already in next phase",
        "never-rolled": "no rollouts",
    }
    assert sorted(selection.carried) == ["hard", "unsolved"]
    assert {d.example_id for d in selection.decisions if d.carried} == {"hard", "unsolved"}
    hard = next(d for d in selection.decisions if d.example_id == "hard")
    assert hard.mean_reward == pytest.approx(1 / 8) and hard.difficulty == pytest.approx(7 / 8) and hard.rollouts == 8
    assert selection.reason_counts()["easy"] == 2
    restored = RetrospectiveSelection.from_json(json.loads(json.dumps(selection.to_json())))
    assert restored == selection


def test_select_retrospective_threshold_and_disabled():
    history, candidates = scripted_history()
    lenient = RetrospectiveSampling(max_mean_reward=0.7)
    selection = select_retrospective(history, candidates, PHASE_60K, 100, lenient, exclude={"in-next"})
    assert sorted(selection.carried) == ["borderline", "easy", "hard", "unsolved"]
    off = select_retrospective(history, candidates, PHASE_60K, 100, RetrospectiveSampling(enabled=False))
    assert off.carried == [] and off.max_carried == 0
    assert all(not d.carried and d.reason.startswith("disabled") for d in off.decisions)
    with pytest.raises(ValueError, match="max_fraction"):
        RetrospectiveSampling(max_fraction=1.0)


def test_max_carried_is_a_share_of_the_next_phase_data():
    for size in range(0, 200):
        for fraction in (0.0, 0.1, 0.3, 0.5, 0.9):
            n = max_carried_examples(size, fraction)
            assert n / max(size + n, 1) <= fraction + 1e-12
            assert (n + 1) / (size + n + 1) > fraction
    assert max_carried_examples(70, 0.3) == 30


def test_select_retrospective_respects_rules_on_random_histories():
    rng = random.Random(0)
    settings = RetrospectiveSampling(max_mean_reward=0.5, max_fraction=0.3, seed=7)
    for trial in range(20):
        history, candidates = RewardHistory(), {}
        for i in range(40):
            example_id = f"ex{i}"
            rewards = [float(rng.random() < rng.random()) for _ in range(rng.choice([1, 4, 8]))]
            history.record(example_id, rewards, [rng.randint(1, 20_000) for _ in rewards])
            candidates[example_id] = rng.randint(1, 80_000)
        size = rng.randint(0, 60)
        selection = select_retrospective(history, candidates, PHASE_60K, size, settings)
        eligible = set()
        for example_id, prompt_tokens in candidates.items():
            record = history[example_id]
            mean = record.reward_sum / record.rollouts
            if (
                record.accurate < record.rollouts
                and mean < 0.5
                and prompt_tokens <= 60_000
                and record.min_response_tokens <= 10_000
            ):
                eligible.add(example_id)
        cap = max_carried_examples(size, 0.3)
        assert set(selection.carried) <= eligible, trial
        assert len(selection.carried) == min(cap, len(eligible)) == len(set(selection.carried))
        assert {d.example_id for d in selection.decisions} == set(candidates)
        # same seed, same draw; the draw does not depend on the order candidates are given in
        shuffled = dict(sorted(candidates.items(), key=lambda _: rng.random()))
        assert select_retrospective(history, shuffled, PHASE_60K, size, settings).carried == selection.carried


def test_select_retrospective_draws_proportionally_to_difficulty():
    """With room for one example, each is picked with probability difficulty / total difficulty."""
    history = RewardHistory()
    history.record("d0.6", [1.0, 1.0, 0.0, 0.0, 0.0])  # mean 0.4
    history.record("d0.8", [1.0, 0.0, 0.0, 0.0, 0.0])  # mean 0.2
    history.record("d1.0", [0.0, 0.0, 0.0, 0.0, 0.0])  # mean 0.0
    candidates = {name: 10 for name in history}
    trials = 3000
    counts = dict.fromkeys(candidates, 0)
    for seed in range(trials):
        selection = select_retrospective(history, candidates, PHASE_20K, 3, RetrospectiveSampling(seed=seed))
        assert len(selection.carried) == 1
        counts[selection.carried[0]] += 1
    for name, difficulty in (("d0.6", 0.6), ("d0.8", 0.8), ("d1.0", 1.0)):
        assert counts[name] / trials == pytest.approx(difficulty / 2.4, abs=0.03)


def test_prompt_sampler_visits_every_prompt_once_per_epoch_when_a_draw_crosses_an_epoch():
    """A draw that ends one epoch and starts the next must not lose, for the new epoch, the prompts it took
    from the old one (one draw never holds a prompt twice): they come in a later draw instead, so after any
    draw the prompts of a walk have been drawn equally often, give or take one."""
    rng = random.Random(11)
    for trial in range(60):
        size = rng.randint(3, 30)
        tasks = [rng.choice("ab") for _ in range(size)]
        balanced = rng.random() < 0.5
        sampler = PromptSampler(tasks, key=f"trial{trial}", balanced=balanced)
        walks = ({t: [i for i, x in enumerate(tasks) if x == t] for t in set(tasks)} if balanced
                 else {"all": range(size)})
        count = 2 * len(walks) if balanced else rng.randint(1, size)
        times = [0] * size
        for draw in range(8):
            picks = sampler.draw(count)
            assert len(picks) == len(set(picks)) == min(count, size)
            for i in picks:
                times[i] += 1
            for name, members in walks.items():
                seen = [times[i] for i in members]
                assert max(seen) - min(seen) <= 1, (trial, draw, name, seen)


def test_prompt_sampler_resumed_mid_run_draws_what_the_uninterrupted_run_draws():
    """Steps of one or two rounds (the second excludes the first's prompts, as dynamic sampling does); the
    state after step 6, through JSON, gives a sampler that draws what the uninterrupted one goes on to draw."""
    rng = random.Random(5)
    for trial in range(20):
        tasks = [rng.choice("abc") for _ in range(rng.randint(4, 25))]
        balanced = rng.random() < 0.5
        plan = [(rng.randint(1, len(tasks)), rng.random() < 0.4) for _ in range(12)]

        def step(sampler, count, second_round):
            first = sampler.draw(count)
            return first + (sampler.draw(count, exclude=set(first)) if second_round else [])

        straight = PromptSampler(tasks, key=f"r{trial}", balanced=balanced)
        for count, second_round in plan[:6]:
            step(straight, count, second_round)
        resumed = PromptSampler(tasks, key=f"r{trial}", balanced=balanced)
        resumed.load_state_dict(json.loads(json.dumps(straight.state_dict())))
        for count, second_round in plan[6:]:
            assert step(resumed, count, second_round) == step(straight, count, second_round), trial
