"""The run report: markdown with the evaluation table, the phases, what retrospective
sampling carried, and PNG plots of reward, accuracy and response length per step."""

from __future__ import annotations

from pathlib import Path


def _plot(run, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in run.logger.records() if r["stage"].startswith("rl/")]
    if not rows:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for ax, key, title in zip(axes, ("reward_mean", "accuracy", "response_tokens_mean"),
                              ("reward (mean)", "accuracy of rollouts", "response tokens (mean)"), strict=True):
        offset = 0
        for phase in run.cfg.rl.phases:
            phase_rows = [r for r in rows if r["stage"] == f"rl/{phase.name}" and key in r]
            ax.plot([offset + r["step"] for r in phase_rows], [r[key] for r in phase_rows], label=phase.name)
            offset += len(phase_rows)
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.legend()
    sft = [r for r in run.logger.records("sft")]
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    if sft:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot([r["step"] for r in sft], [r["loss"] for r in sft])
        ax.set_title("SFT loss")
        ax.set_xlabel("step")
        fig.tight_layout()
        fig.savefig(path.with_name("sft_loss.png"), dpi=100)
        plt.close(fig)
    return True


def write_report(run) -> Path:
    """``report.md`` (+ ``curves.png``, ``sft_loss.png``) in the run folder."""
    state, cfg = run.state, run.cfg
    lines = [f"# qwenlong run: {run.dir}", "", f"Wall time: {state.get('wall_time_s', 0.0) / 60:.1f} min", "",
             "## Held-out accuracy", "", "| stage | accuracy (%) |", "|---|---|"]
    lines += [f"| {label} | {result['average']:.1f} |" for label, result in state["evals"].items()]
    lines += ["", "## RL phases", "", "| phase | max input | max output | steps | carried in |",
              "|---|---|---|---|---|"]
    for phase in cfg.rl.phases:
        carried = len(state["carried"].get(phase.name, {}).get("carried", []))
        lines.append(f"| {phase.name} | {phase.max_input_tokens} | {phase.max_output_tokens} | {phase.steps} | "
                     f"{carried} |")
    for phase_name, selection in state["carried"].items():
        counts: dict[str, int] = {}
        for decision in selection["decisions"]:
            key = "carried" if decision["carried"] else decision["reason"].split(":")[0]
            counts[key] = counts.get(key, 0) + 1
        lines += ["", f"Retrospective sampling into {phase_name}: " +
                  ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))]
    if _plot(run, run.dir / "curves.png"):
        lines += ["", "![RL curves](curves.png)", "", "![SFT loss](sft_loss.png)"]
    path = run.dir / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
