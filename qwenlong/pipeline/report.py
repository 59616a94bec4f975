"""The run report: markdown with the evaluation table, accuracy by input length, the paired gains
between stages, the phases, what retrospective sampling carried, and PNG plots of reward,
accuracy and response length per step."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from qwenlong.eval.stats import PairedGain, paired_gain
from qwenlong.state.checkpoint import write_json, write_text

CURVES = ("curves.png", "RL curves")
SFT_LOSS = ("sft_loss.png", "SFT loss")


def phase_curves(rows: list[dict], phase_names: list[str], key: str) -> list[tuple[str, list[int], list[float]]]:
    """(phase, x, y) of ``key`` over the RL phases in order, x counting RL steps across them: a phase's steps
    follow the last step of the phase before (rows are logged every ``output.log_every_steps`` steps, each
    at its own step number, so the rows' count is not the steps')."""
    curves, offset = [], 0
    for name in phase_names:
        phase_rows = [r for r in rows if r["stage"] == f"rl/{name}"]
        with_key = [r for r in phase_rows if key in r]
        curves.append((name, [offset + r["step"] for r in with_key], [r[key] for r in with_key]))
        offset += max((r["step"] for r in phase_rows), default=0)
    return curves


def _plot(run, directory: Path) -> list[tuple[str, str]]:
    """The RL curves and the SFT loss as PNGs in ``directory``, each drawn when it has rows to show (none
    without matplotlib); returns (file, title) of those written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    rows = [r for r in run.logger.records() if r["stage"].startswith("rl/")]
    if rows:
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
        for ax, key, title in zip(axes, ("reward_mean", "accuracy", "response_tokens_mean"),
                                  ("reward (mean)", "accuracy of rollouts", "response tokens (mean)"), strict=True):
            for name, x, y in phase_curves(rows, [phase.name for phase in run.cfg.rl.phases], key):
                ax.plot(x, y, label=name)
            ax.set_title(title)
            ax.set_xlabel("RL step")
            ax.legend()
        fig.tight_layout()
        fig.savefig(directory / CURVES[0], dpi=100)
        plt.close(fig)
        written.append(CURVES)
    sft = [r for r in run.logger.records("sft") if "loss" in r]
    if sft:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot([r["step"] for r in sft], [r["loss"] for r in sft])
        ax.set_title("SFT loss")
        ax.set_xlabel("step")
        fig.tight_layout()
        fig.savefig(directory / SFT_LOSS[0], dpi=100)
        plt.close(fig)
        written.append(SFT_LOSS)
    return written


def compared_stages(labels: list[str]) -> list[tuple[str, str]]:
    """Each evaluation against the one before it, and after-SFT against the last (the whole of RL)."""
    pairs = list(zip(labels[:-1], labels[1:], strict=True))
    if "after-sft" in labels and labels[-1] != "after-sft" and ("after-sft", labels[-1]) not in pairs:
        pairs.append(("after-sft", labels[-1]))
    return pairs


def _predictions(run_dir: Path, label: str) -> list[dict]:
    # rows end at "\n" only: a response may hold characters that str.splitlines() also breaks at (U+2028, NEL)
    text = (run_dir / "eval" / label / "predictions.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.split("\n") if line]


def _item_scores(run_dir: Path, label: str) -> dict[tuple[str, str], float]:
    """Each item's fraction of accurate answers (its correctness when it has one answer). Accurate is reward 1.0:
    an MRCR answer counts only when it matches whole (the paired tests need outcomes; the benchmark's own score,
    the mean similarity, is in the evaluation's table)."""
    answers: dict[tuple[str, str], list[bool]] = {}
    for row in _predictions(run_dir, label):
        answers.setdefault((row["benchmark"], row["id"]), []).append(row["accurate"])
    return {item: sum(outcomes) / len(outcomes) for item, outcomes in answers.items()}


def length_table(run_dir: Path, labels: list[str], bins: int = 3) -> list[str]:
    """Markdown rows: each stage's accuracy (percent) on the held-out items split into ``bins``
    equal-count groups by input length, shortest first (where along the curriculum a stage helps)."""
    lengths = {(row["benchmark"], row["id"]): row["input_tokens"] for row in _predictions(run_dir, labels[0])}
    ordered = sorted(lengths, key=lambda item: (lengths[item], item))
    groups = [ordered[len(ordered) * b // bins: len(ordered) * (b + 1) // bins] for b in range(bins)]
    groups = [g for g in groups if g]
    titles = [f"{lengths[g[0]]}-{lengths[g[-1]]} tokens ({len(g)} items)" for g in groups]
    lines = ["| stage | " + " | ".join(titles) + " |", "|---|" + "---|" * len(groups)]
    for label in labels:
        scores = _item_scores(run_dir, label)
        cells = [f"{100.0 * sum(scores[i] for i in g) / len(g):.1f}" for g in groups]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def stage_gains(run_dir: Path, labels: list[str]) -> dict[tuple[str, str], PairedGain]:
    """Paired gain of each compared pair of evaluations, on the items both answered."""
    outcomes = {label: _item_scores(run_dir, label) for label in labels}
    gains = {}
    for before, after in compared_stages(labels):
        items = sorted(outcomes[before].keys() & outcomes[after].keys())
        gains[before, after] = paired_gain([outcomes[before][i] for i in items], [outcomes[after][i] for i in items])
    return gains


def _gain_lines(gains: dict[tuple[str, str], PairedGain], eval_cfg) -> list[str]:
    decoding = "greedy" if eval_cfg.temperature == 0 else \
        f"sampled at temperature {eval_cfg.temperature}, top-p {eval_cfg.top_p}"
    k = eval_cfg.samples_per_prompt
    if k == 1:
        method = ("The interval is exact (Clopper-Pearson on the items whose outcome changed), the p-value the "
                  "exact two-sided McNemar test")
    else:
        decoding += f", {k} answers per item (an item scores its fraction of accurate answers)"
        method = ("The interval is the normal one on the mean paired difference, the p-value the exact "
                  "two-sided sign test on the items whose score changed")
    covered = "the choice of held-out items" + (" and the sampling" if eval_cfg.temperature > 0 else "")
    lines = ["", "## Gains between stages (paired, same held-out items)", "",
             f"Decoding: {decoding}. {method}; both cover {covered}, "
             "not the training seed (see the seed study in the README).", "",
             "| from | to | items | accuracy before | after | gain (points) | 95% interval | improved / regressed "
             "| p |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {before} | {after} | {g.num_items} | {g.before:.1f} | {g.after:.1f} | {g.gain:+.1f} | "
              f"[{g.ci_low:+.1f}, {g.ci_high:+.1f}] | {g.improved} / {g.regressed} | {g.p_value:.2g} |"
              for (before, after), g in gains.items()]
    return lines


def own_prompts_cell(data: dict | None, phase) -> str:
    """A phase's own data in the RL phases table: how many prompts, of how many input tokens (a run from
    before ``phase_data`` was recorded: the budget alone)."""
    if data is None:
        return f"up to {phase.max_input_tokens}"
    return f"{data['own']} ({data['min_input_tokens']}-{phase.max_input_tokens})"


TIME_SPLIT = ("time_generate", "time_score", "time_score_wait", "time_train")


def phase_seconds(rows: list[dict], keys: tuple[str, ...]) -> dict[str, float | None]:
    """Each key summed over a phase's logged steps, a step logged again after a resume counted once (its
    last record); None where no step logged the key (a run from before it existed)."""
    steps = {row["step"]: row for row in rows}
    return {key: sum(row[key] for row in steps.values()) if steps and all(key in row for row in steps.values())
            else None for key in keys}


def scoring_counts(rows: list[dict]) -> dict[str, int]:
    """The reward's counters (``judge/...``, ``score/...``) summed over a phase's steps, a step logged again
    after a resume counted once."""
    steps = {row["step"]: row for row in rows}
    counts: dict[str, int] = {}
    for row in steps.values():
        for key, value in row.items():
            if key.startswith(("judge/", "score/")):
                counts[key] = counts.get(key, 0) + int(value)
    return counts


_SCORING_ROWS = (("judge calls", "judge/calls"), ("judge failures", "judge/failures"),
                 ("judge failures by reason", "judge/failures/"), ("fallbacks to the rule score", "judge/fallbacks"),
                 ("responses whose scoring failed", "score/failures"), ("... by reason", "score/failures/"),
                 ("answers the rules refused", "score/rejected"))


def _scoring_lines(run) -> list[str]:
    """The "Judge failures" section: per RL phase, judge calls, failures by reason, fallbacks to the rule
    score, and responses whose scoring failed or that the rules refused."""
    phases = [phase.name for phase in run.cfg.rl.phases]
    counts = {name: scoring_counts(run.logger.records(f"rl/{name}")) for name in phases}

    def cell(name: str, key: str) -> str:
        if not key.endswith("/"):
            return str(counts[name].get(key, 0))
        return ", ".join(f"{k.removeprefix(key)}: {v}" for k, v in sorted(counts[name].items())
                         if k.startswith(key) and v) or "–"

    lines = ["", "## Judge failures", "", "Summed over each RL phase's steps (rank 0): a failed judge call leaves the "
             "rule score (a fallback); a response whose scoring failed scores 0.", "",
             "| | " + " | ".join(phases) + " |", "|---|" + "---|" * len(phases)]
    lines += [f"| {label} | " + " | ".join(cell(name, key) for name in phases) + " |" for label, key in _SCORING_ROWS]
    return lines


def _l15_plot(run, rows: list[dict], path: Path) -> bool:
    """Rollout reward per task, the batch entropy against AEPO's bounds (positive-only steps marked) and
    the share of responses and tokens kept, over every RL step in log order (memory-agent stage included)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ec = run.cfg.rl.entropy_control
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    # each row at its last step: a row holds `steps_in_row` steps (output.log_every_steps)
    at = list(itertools.accumulate(r.get("steps_in_row", 1) for r in rows))
    for key in sorted({k for r in rows for k in r if k.startswith("task_reward/")}):
        axes[0].plot([at[i] for i, r in enumerate(rows) if key in r], [r[key] for r in rows if key in r],
                     label=key.split("/", 1)[1])
    control = [(at[i], r) for i, r in enumerate(rows) if "entropy_control/batch_entropy" in r]
    axes[1].plot([i for i, _ in control], [r["entropy_control/batch_entropy"] for _, r in control], label="batch")
    if ec.aepo:
        for bound in (ec.entropy_low, ec.entropy_high):
            axes[1].axhline(bound, color="gray", linestyle="--")
        positive = [(i, r["entropy_control/batch_entropy"]) for i, r in control
                    if r["entropy_control/positive_only"]]
        axes[1].scatter([i for i, _ in positive], [h for _, h in positive], color="red", s=12,
                        label="positive-only")
    for kept, total, label in (("responses_kept", "responses", "responses"), ("tokens_kept", "tokens", "tokens")):
        axes[2].plot([i for i, _ in control], [r[f"entropy_control/{kept}"] / max(1.0, r[f"entropy_control/{total}"])
                                               for _, r in control], label=label)
    for ax, title in zip(axes, ("rollout reward per task", "batch entropy (AEPO bounds dashed)", "kept in the loss"),
                         strict=True):
        ax.set_title(title)
        ax.set_xlabel("RL step (all phases)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def l15_lines(run) -> list[str]:
    """The QwenLong-L1.5 section: AEPO's modes and kept samples, the memory agent on long documents."""
    rows = [r for r in run.logger.records() if r["stage"].startswith("rl/")]
    control = [r for r in rows if "entropy_control/batch_entropy" in r]
    agent_steps = [r["agent_steps_per_trajectory"] for r in rows if "agent_steps_per_trajectory" in r]
    evals = run.state.get("agent_evals", {})
    if not control and not agent_steps and not evals:
        return []
    lines = ["", "## QwenLong-L1.5: entropy control and the memory agent", ""]
    if control:
        # a row holds the means of several steps (output.log_every_steps): weighted back into sums by the steps
        # that updated (entropy_control/steps; a step without groups logs no means), else by the row's steps
        def weight(row: dict) -> float:
            return row.get("entropy_control/steps", row.get("steps_in_row", 1))

        def total(key: str) -> float:
            return sum(r[key] * weight(r) for r in control)

        steps = round(sum(weight(r) for r in control))
        if all("entropy_control/mode_switched" in r for r in control):
            switches = round(total("entropy_control/mode_switched"))
        else:  # a run logged before the trainer counted switches: one row per step
            switches = sum(a["entropy_control/positive_only"] != b["entropy_control/positive_only"]
                           for a, b in zip(control, control[1:], strict=False))
        lines.append(f"AEPO positive-only in {total('entropy_control/positive_only'):.0f} of {steps} steps "
                     f"({switches} mode switches); responses kept {total('entropy_control/responses_kept'):.0f} of "
                     f"{total('entropy_control/responses'):.0f}; batch entropy "
                     f"{control[0]['entropy_control/batch_entropy']:.2f} at the first step, "
                     f"{control[-1]['entropy_control/batch_entropy']:.2f} at the last.")
    if agent_steps:
        lines.append(f"Memory agent: {sum(agent_steps) / len(agent_steps):.1f} policy calls per trajectory.")
    if evals:
        lines += ["", "Accuracy (%) on documents past the full-context window (memory-agent stage):", "",
                  "| model | accuracy (%) |", "|---|---|", *[f"| {k} | {v:.1f} |" for k, v in evals.items()]]
    if _l15_plot(run, rows, run.dir / "l15_curves.png"):
        lines += ["", "![L1.5 curves](l15_curves.png)"]
    return lines


def write_report(run) -> Path:
    """``report.md`` (+ ``gains.json``, ``curves.png``, ``sft_loss.png``) in the run folder."""
    state, cfg = run.state, run.cfg
    lines = [f"# qwenlong run: {run.dir}", "", f"Wall time: {state.get('wall_time_s', 0.0) / 60:.1f} min", "",
             "## Held-out accuracy", "", "| stage | accuracy (%) |", "|---|---|"]
    lines += [f"| {label} | {result['average']:.1f} |" for label, result in state["evals"].items()]
    if state["evals"]:
        lines += ["", "## Accuracy by input length (held-out items in equal thirds)", "",
                  *length_table(run.dir, list(state["evals"]))]
    gains = stage_gains(run.dir, list(state["evals"]))
    if gains:
        lines += _gain_lines(gains, cfg.eval)
        write_json(run.dir / "gains.json",
                   [{"from": before, "to": after, **g.to_json()} for (before, after), g in gains.items()])
    lines += ["", "## RL phases", "", "Seconds summed over each phase's steps (rank 0); scoring overlaps generation, "
              "and score wait is the part it did not hide.", "",
              "| phase | own prompts (input tokens) | max output | steps | carried in | generate (s) | score (s) "
              "| score wait (s) | train (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for phase in cfg.rl.phases:
        carried = len(state["carried"].get(phase.name, {}).get("carried", []))
        seconds = phase_seconds(run.logger.records(f"rl/{phase.name}"), TIME_SPLIT)
        cells = " | ".join("–" if seconds[key] is None else f"{seconds[key]:.1f}" for key in TIME_SPLIT)
        steps = state.get("phase_steps", {}).get(phase.name, phase.steps)  # a phase given by epochs: as computed
        lines.append(f"| {phase.name} | {own_prompts_cell(state.get('phase_data', {}).get(phase.name), phase)} | "
                     f"{phase.max_output_tokens} | {'–' if steps is None else steps} | {carried} | {cells} |")
    lines += _scoring_lines(run)
    for phase_name, selection in state["carried"].items():
        counts: dict[str, int] = {}
        for decision in selection["decisions"]:
            key = "carried" if decision["carried"] else decision["reason"].split(":")[0]
            counts[key] = counts.get(key, 0) + 1
        lines += ["", f"Retrospective sampling into {phase_name}: " +
                  (", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or
                   "no candidates (the phase's own data holds every earlier example)")]
    for file, title in _plot(run, run.dir):  # only the images written: a run without SFT has no SFT loss
        lines += ["", f"![{title}]({file})"]
    lines += l15_lines(run)
    path = run.dir / "report.md"
    write_text(path, "\n".join(lines) + "\n")
    return path
