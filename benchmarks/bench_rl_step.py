"""One GRPO step of the real trainer, split into generate / score / old log-probs / update, at
long prompt lengths on a small model: where the time of an RL step goes.

The step is ``qwenlong.trainers.GRPOTrainer``'s own: ``collect`` (the rollout engine
``HFGenerateEngine`` samples ``--group-size`` responses per prompt, ``HybridReward`` scores them
with the rule reward) then ``update`` (old log-probs recomputed with the fused kernel, then one
optimizer update with the fused GRPO loss on packed micro-batches). The model is a random-weight
Qwen2 of ``--shape`` (GPU default: the Qwen2.5-0.5B shape, bf16; ``--quick``: a tiny one on CPU)
and the prompts are random tokens of ``--prompt-lengths`` tokens, so rewards are 0 and the
numbers are about time only.

How each part is timed: generate and score come from the trainer's own step metrics
(``time_generate``; scoring runs in a background thread while the engine generates, so the step
pays only ``time_score_wait``, the scoring left once generation ended; ``score (overlapped)`` is
all the scoring time, not added to the step); old log-probs are the time the policy spends
switched to eval mode inside ``update`` (the trainer computes them in eval mode and switches back
to train mode after), timed through the module's ``train(mode)``; update is the rest of
``update``. ``other`` is what ``collect`` does besides (groups, advantages). On a GPU the step's
boundaries synchronize first; the trainer's own timers do not. One untimed warm-up
step runs at the first length; each length then reports the median of ``--repeats`` steps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from benchmarks.common import RESULTS_DIR, default_device, environment, write_results

SHAPES = {  # hidden, layers, heads, kv heads, intermediate, vocab
    "0.5b": (896, 24, 14, 2, 4864, 151_936),
    "tiny": (64, 2, 4, 2, 128, 2048),
}
PARTS = ("generate", "score wait", "other", "old log-probs", "update")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Stopwatch:
    """Wall-clock time, synchronized with the device."""

    def __init__(self, device: str):
        self.device = device

    def now(self) -> float:
        _sync(self.device)
        return time.perf_counter()


def time_eval_spans(model: torch.nn.Module, watch: Stopwatch) -> dict:
    """Make ``model.train(mode)`` record how long the model stays in eval mode; returns the counter."""
    spans = {"seconds": 0.0, "start": None}
    original = model.train

    def train(mode: bool = True):
        now = watch.now()
        if not mode and spans["start"] is None:
            spans["start"] = now
        elif mode and spans["start"] is not None:
            spans["seconds"] += now - spans["start"]
            spans["start"] = None
        return original(mode)

    model.train = train  # instance attribute: eval() calls self.train(False), so both are seen
    return spans


def build(args, device: str):
    from transformers import AutoModelForCausalLM, Qwen2Config

    from qwenlong.config import RLConfig
    from qwenlong.integrations.hf_attention import register
    from qwenlong.rewards import HybridReward
    from qwenlong.rollout import HFGenerateEngine
    from qwenlong.trainers import GRPOTrainer

    register()
    hidden, layers, heads, kv_heads, intermediate, vocab = SHAPES[args.shape]
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max(args.prompt_lengths) + args.response_tokens + 16)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_config(config, attn_implementation="qwenlong", dtype=dtype).to(device).train()
    watch = Stopwatch(device)
    eos = vocab - 1  # random weights rarely sample it: responses run to --response-tokens
    engine = HFGenerateEngine(model, eos_token_id=eos, generation_attention="sdpa")
    budget = max(args.prompt_lengths) + args.response_tokens
    cfg = RLConfig(group_size=args.group_size, gen_prompts_per_step=args.prompts, train_prompts_per_step=args.prompts,
                   mini_batch_size=args.prompts, temperature=1.0, top_p=1.0, lr=1e-6,
                   micro_batch_token_budget=max(budget, args.micro_batch_tokens))
    cfg.dynamic_sampling.enabled = False  # random prompts never give informative groups
    trainer = GRPOTrainer(model, engine, HybridReward(), cfg,
                          decode=lambda ids: " ".join(map(str, ids)), output_dir=args.workdir)
    return trainer, model, watch, vocab


def one_step(trainer, watch: Stopwatch, spans: dict, phase, examples, sampler, step: int) -> tuple[dict, dict]:
    """Seconds per part of one step, and the step's collection metrics."""
    start = watch.now()
    groups, metrics = trainer.collect(phase, examples, step, sampler)
    collected = watch.now()
    spans["seconds"] = 0.0
    trainer.update(groups)
    done = watch.now()
    parts = {"generate": metrics["time_generate"], "score wait": metrics["time_score_wait"]}
    parts["other"] = (collected - start) - parts["generate"] - parts["score wait"]
    parts["old log-probs"] = spans["seconds"]
    parts["update"] = (done - collected) - spans["seconds"]
    return parts, metrics


def run(args) -> list[dict]:
    from qwenlong.curriculum import Phase, PromptSampler
    from qwenlong.trainers.grpo import PromptExample

    device = default_device()
    trainer, model, watch, vocab = build(args, device)
    spans = time_eval_spans(model, watch)
    cfg = trainer.cfg
    steps = 1 + len(args.prompt_lengths) * args.repeats
    trainer.backend.start(lr=cfg.lr, weight_decay=cfg.weight_decay, total_steps=steps, warmup_steps=0,
                          schedule="constant", grad_clip=cfg.grad_clip)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for index, length in enumerate([args.prompt_lengths[0], *args.prompt_lengths]):
        phase = Phase(f"prompt{length}", length, args.response_tokens, steps=1)
        examples = [PromptExample(f"p{i}", torch.randint(0, vocab - 1, (length,), generator=gen).tolist(),
                                  "synthetic_copy", "42") for i in range(args.prompts)]
        repeats = 1 if index == 0 else args.repeats  # index 0: the warm-up step
        sampler = PromptSampler([e.data_source for e in examples], key=f"bench:{length}")
        steps = [one_step(trainer, watch, spans, phase, examples, sampler, s) for s in range(repeats)]
        if index == 0:
            continue
        parts = {part: statistics.median(s[part] for s, _ in steps) for part in PARTS}
        total = sum(parts.values())
        row = {"prompt tokens": length, "sequences": args.prompts * args.group_size,
               "response tokens (mean)": round(statistics.mean(m["response_tokens_mean"] for _, m in steps), 1),
               "step s": round(total, 3)}
        row |= {f"{part} s": round(seconds, 3) for part, seconds in parts.items()}
        row["score (overlapped) s"] = round(statistics.median(m["time_score"] for _, m in steps), 3)
        row |= {f"{part} %": round(100 * seconds / total, 1) for part, seconds in parts.items()}
        if parts["old log-probs"] == 0.0:
            row["note"] = "old log-probs not separable (the trainer no longer switches to eval mode): inside update"
        rows.append(row)
        print(row, flush=True)
    return rows


def main(argv=None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU smoke: tiny model, prompts of 128 tokens")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="0.5b")
    parser.add_argument("--prompt-lengths", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--response-tokens", type=int, default=512)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--group-size", type=int, default=8, help="responses per prompt")
    parser.add_argument("--micro-batch-tokens", type=int, default=65536, help="packed tokens per micro-batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per length (median)")
    parser.add_argument("--out", default=str(RESULTS_DIR), help="results directory")
    args = parser.parse_args(argv)
    if args.quick:
        args.shape, args.prompt_lengths, args.response_tokens = "tiny", [128], 8
        args.prompts, args.group_size, args.micro_batch_tokens, args.repeats = 2, 2, 2048, 1
    device = default_device()
    with tempfile.TemporaryDirectory() as workdir:  # the trainer's logs and checkpoints: not results
        args.workdir = workdir
        rows = run(args)
    hidden, layers, heads, kv_heads, intermediate, vocab = SHAPES[args.shape]
    setup = {"model": f"random Qwen2, {args.shape}: hidden {hidden}, {layers} layers, heads {heads}/{kv_heads}, "
                      f"intermediate {intermediate}, vocab {vocab}, {'bf16' if device == 'cuda' else 'fp32'}",
             "step": f"{args.prompts} prompts x {args.group_size} responses of up to {args.response_tokens} tokens, "
                     f"one update, micro-batches of {max(args.micro_batch_tokens, 0)} tokens",
             "engine": "HFGenerateEngine (sdpa while generating); reward: HybridReward, rules only",
             "timing": f"median of {args.repeats} steps per length after one warm-up step"}
    notes = ["generate: the trainer's time_generate; score wait: its time_score_wait, the scoring left once "
             "generation ended (each group is scored in a background thread as soon as it is generated); "
             "score (overlapped): all scoring time, not added to the step",
             "old log-probs: time the policy spends in eval mode inside GRPOTrainer.update",
             "update: the rest of update (packing, GRPO loss forward+backward, optimizer step)",
             "other: the rest of collect (grouping, overlong penalty, advantages)"]
    write_results("rl-step", f"GRPO step time split, {args.shape} model", rows, setup=setup, out_dir=args.out,
                  env=environment(), notes=notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
