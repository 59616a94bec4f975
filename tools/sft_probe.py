"""How fast does warm-up SFT teach the tiny model to copy? SFT alone, with teacher-forced probes.

Every ``--every`` steps, on held-out synthetic items with the reference trace as input, the probe
reads the model's greedy next token where the trace writes the answer word: first where the trace
quotes the evidence (copying from the document), then in the final answer (copying from the
quote). No generation, so a probe costs a second, and the two skills show apart: the answer copy
forms first, the document copy later (or not within a budget).

    python tools/sft_probe.py --out /tmp/probe seed=4 data.synthetic.seed=4 sft.steps=1500

Prints one JSON line per probe (also ``<out>/probe.jsonl``). ``key=value`` overrides go to the config.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from qwenlong.config import load_config
from qwenlong.data import reference_response
from qwenlong.pipeline import build
from qwenlong.pipeline.run import Run
from qwenlong.trainers.sft import SFTTrainer


def answer_positions(tokenizer, records) -> list[tuple[list[int], list[int], int]]:
    """(prompt + reference trace ids, positions of the answer word in them, its id) per record."""
    out = []
    for record in records:
        prompt = build.prompt_ids(tokenizer, record)
        trace = tokenizer(reference_response(record), add_special_tokens=False)["input_ids"]
        answer = tokenizer(" " + record.answer, add_special_tokens=False)["input_ids"][0]
        out.append((prompt + trace, [len(prompt) + i for i, t in enumerate(trace) if t == answer], answer))
    return out


@torch.no_grad()
def copy_accuracy(model, items) -> tuple[float, float]:
    """Fractions of items whose greedy next token is the answer at its first (quote) and second (final
    answer) place in the trace."""
    model.eval()
    hits = [0, 0]
    for ids, positions, answer in items:
        logits = model(torch.tensor([ids])).logits[0]
        for k, position in enumerate(positions[:2]):
            hits[k] += int(logits[position - 1].argmax().item() == answer)
    model.train()
    return hits[0] / len(items), hits[1] / len(items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--out", type=Path, required=True, help="run folder (must not hold a run)")
    parser.add_argument("--every", type=int, default=50, help="SFT steps between probes")
    parser.add_argument("--items", type=int, default=128, help="held-out items per probe")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args()
    cfg = load_config(args.config, [*args.overrides, f"output.dir={args.out}", "eval.enabled=false"])
    run = Run(cfg)
    trainer = SFTTrainer(run.model, build.sft_training_examples(cfg, run.tokenizer), cfg.sft, output_dir=run.dir,
                         seed=cfg.seed, logger=run.logger)
    items = answer_positions(run.tokenizer, build.load_split(cfg, "eval", run.tokenizer)[: args.items])
    start = time.time()
    with open(args.out / "probe.jsonl", "w") as log:
        for step in range(1, trainer.total_steps + 1):
            loss = trainer.train_step()["loss"]
            if step % args.every == 0 or step == trainer.total_steps:
                quote, answer = copy_accuracy(run.model, items)
                line = json.dumps({"step": step, "loss": round(loss, 4), "quote": quote, "answer": answer,
                                   "seconds": round(time.time() - start)})
                print(line, flush=True)
                log.write(line + "\n")


if __name__ == "__main__":
    main()
