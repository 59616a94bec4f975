"""The memory agent of QwenLong-L1.5 (l15.md section 5): documents longer than the context window.

The query is split into its core question ``q_core`` and its format instruction ``q_inst``; the
document is cut into chunks ``x_1..x_K`` of ``chunk_tokens`` tokens. At step t the policy reads
``(m_{t-1}, p_{t-1}, x_t, q_core)`` and writes a memory update ``m_t`` and a plan ``p_t`` (at most
``memory_tokens`` tokens); after the last chunk it answers from ``(m_K, q_core, q_inst)``. The
context the policy sees never exceeds about ``chunk_tokens + memory_tokens`` plus the prompt, whatever
the document's length.

RL (:func:`trajectory_sequences`): the G trajectories of a question form a group; each gets one
reward from its final answer, the group advantage is computed as for plain GRPO, and every
generated token of every step of a trajectory carries that trajectory's advantage. Each step is
one (prompt, response) sequence, so the packed fused GRPO loss runs over all steps' tokens.

Rollouts go through any :class:`~qwenlong.rollout.RolloutEngine` (HF ``generate`` or vLLM); every
step's prompt ids, response ids and per-token log-probs are recorded.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from qwenlong.data import FORMAT_INSTRUCTION, DocQARecord, apply_chat_template, split_prompt
from qwenlong.data.prompt import question_text
from qwenlong.rewards import HybridReward, RewardItem
from qwenlong.rollout import RolloutEngine, SamplingParams

# phrases that open a format instruction at the end of a query (the method's own line first)
FORMAT_MARKERS = ("Format your response as follows:", "Your response should", "Respond with", "Answer with",
                  "Answer in the format", "Please answer in", "Output format:")

INITIAL_MEMORY = "(nothing yet)"
INITIAL_PLAN = "Read the first part and note everything that may help answer the question."

MEMORY_STEP_TEMPLATE = """You are answering a question about a document that is too long to read at once. \
You read it one part at a time, keeping a memory of what you have found and a plan for what to look for next.

Question: {question}

Your memory so far:
<memory>
{memory}
</memory>

Your plan:
<plan>
{plan}
</plan>

Part {index} of {total} of the document:
<text>
{chunk}
</text>

Update the memory: keep what still matters and add what this part says that helps answer the question. \
Then plan what to look for in the remaining parts. Reply with <memory>...</memory> followed by <plan>...</plan>."""

ANSWER_TEMPLATE = """You have read a long document part by part and kept this memory of it:
<memory>
{memory}
</memory>

Answer the question using the memory.

{question}

{instruction}"""


@dataclass(frozen=True)
class MemoryAgentConfig:
    """Budgets of the memory agent (defaults: the L1.5 expert's 32K chunks and 15K memory)."""

    chunk_tokens: int = 32_768  # document tokens per step
    memory_tokens: int = 15_000  # most tokens a memory step may generate (memory + plan)
    answer_tokens: int = 10_000  # most tokens of the final answer
    temperature: float = 0.7
    top_p: float = 0.95

    def __post_init__(self) -> None:
        for name in ("chunk_tokens", "memory_tokens", "answer_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class AgentQuery:
    """One question about one document, split as the agent reads it."""

    id: str
    document: str
    question: str  # q_core
    instruction: str  # q_inst
    data_source: str = ""
    ground_truth: Any = None


@dataclass
class AgentStep:
    """One call of the policy: what it read (``prompt_ids``) and what it wrote, with log-probs."""

    kind: Literal["memory", "answer"]
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str


@dataclass
class Trajectory:
    """A full read of one document: the memory steps, then the answer step."""

    query: AgentQuery
    num_chunks: int
    steps: list[AgentStep] = field(default_factory=list)
    memory: str = INITIAL_MEMORY
    plan: str = INITIAL_PLAN
    answer: str | None = None  # the final answer's text once the answer step ran
    reward: float | None = None

    @property
    def chunks_read(self) -> int:
        return sum(step.kind == "memory" for step in self.steps)

    @property
    def generated_tokens(self) -> int:
        return sum(len(step.response_ids) for step in self.steps)


def split_query(query: str) -> tuple[str, str]:
    """``(q_core, q_inst)``: the question and its trailing format instruction.

    The instruction is the run of sentences at the end of the query that each open with one of
    ``FORMAT_MARKERS`` (case-insensitive, at the start of a sentence or a line). A marker sentence with
    anything but more marker sentences after it stays in the question: a multiple-choice question that says
    "Answer with the letter." before its options keeps the options (the memory steps read ``q_core`` only).
    A query without a marker sentence at its end has an empty instruction; the question is never left empty.
    """
    lowered = query.lower()
    starts = set()
    for marker in FORMAT_MARKERS:
        for match in re.finditer(re.escape(marker.lower()), lowered):
            before = query[:match.start()].rstrip(" ")
            if not before or before[-1] in ".?!:\n":
                starts.add(match.start())
    cut = len(query)
    for start in sorted(starts, reverse=True):
        if _SENTENCE_BREAK.search(query[start:cut].strip()) or not query[:start].strip():
            break  # this marker's sentence has other text after it, or it is all the question there is
        cut = start
    return query[:cut].strip(), query[cut:].strip()


# where one sentence ends and more text follows: a full stop, question or exclamation mark (and closing quotes or
# brackets) before a space, or a line break
_SENTENCE_BREAK = re.compile(r"[.?!][\"')\]]*\s+\S|\n\s*\S")


def query_from_record(record: DocQARecord) -> AgentQuery:
    """The agent's query for a DocQA record (a pre-rendered prompt in the method's template is split back)."""
    document, question = record.document, question_text(record) + "\n\n" + FORMAT_INSTRUCTION
    if record.prompt is not None:
        parts = split_prompt(record.prompt)
        if parts is None:
            raise ValueError(f"record {record.id!r}: its prompt does not follow the method's template, so the "
                             "document cannot be told from the question")
        document, question = parts[0], parts[1] + "\n\n" + FORMAT_INSTRUCTION
    core, instruction = split_query(question)
    return AgentQuery(record.id, document, core, instruction, record.data_source, list(record.answers))


def query_from_prompt(prompt: str, id: str = "") -> AgentQuery:
    """The agent's query for a prompt rendered by :func:`qwenlong.data.build_prompt` (what evaluation passes)."""
    parts = split_prompt(prompt)
    if parts is None:
        raise ValueError("prompt: the memory agent needs prompts in the method's template (document between "
                         "<text> tags, then the question and the format line)")
    core, instruction = split_query(parts[1] + "\n\n" + FORMAT_INSTRUCTION)
    return AgentQuery(id, parts[0], core, instruction)


def chunk_ids(ids: Sequence[int], chunk_tokens: int) -> list[list[int]]:
    """``ids`` cut into consecutive chunks of ``chunk_tokens`` (the last may be shorter; at least one chunk)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens: expected >= 1, got {chunk_tokens}")
    ids = list(ids)
    return [ids[i:i + chunk_tokens] for i in range(0, len(ids), chunk_tokens)] or [[]]


def chunk_document(tokenizer: Any, document: str, chunk_tokens: int) -> list[str]:
    """The document as text chunks of ``chunk_tokens`` tokens of ``tokenizer``."""
    ids = tokenizer(document, add_special_tokens=False)["input_ids"]
    return [tokenizer.decode(chunk) for chunk in chunk_ids(ids, chunk_tokens)]


def _tag(text: str, name: str) -> str | None:
    """The last ``<name>...</name>`` of ``text`` (an unclosed last tag runs to the end), or None."""
    opened = text.rfind(f"<{name}>")
    if opened < 0:
        return None
    body = text[opened + len(name) + 2:]
    closed = body.find(f"</{name}>")
    return (body if closed < 0 else body[:closed]).strip()


def parse_memory_step(text: str) -> tuple[str, str]:
    """``(memory, plan)`` from a memory step's output, after any ``</think>``.

    Without a ``<memory>`` tag the whole visible output is the memory; without ``<plan>``, the plan is empty.
    """
    visible = text.rsplit("</think>", 1)[-1]
    plan = _tag(visible, "plan")
    memory = _tag(visible, "memory")
    if memory is None:
        memory = visible.split("<plan>", 1)[0].strip()
    return memory, plan or ""


def memory_step_prompt(query: AgentQuery, memory: str, plan: str, chunk: str, index: int, total: int) -> str:
    """The prompt of memory step ``index`` (1-based) of ``total``."""
    return MEMORY_STEP_TEMPLATE.format(question=query.question, memory=memory or INITIAL_MEMORY,
                                       plan=plan or INITIAL_PLAN, chunk=chunk, index=index, total=total)


def answer_prompt(query: AgentQuery, memory: str) -> str:
    """The prompt of the final answer step."""
    return ANSWER_TEMPLATE.format(memory=memory or INITIAL_MEMORY, question=query.question,
                                  instruction=query.instruction).rstrip()


class MemoryAgent:
    """Runs the memory agent's policy through a rollout engine, many trajectories in lockstep.

    Each round, every unfinished trajectory makes one call: its next memory step, or its answer
    once all chunks are read; the round's memory steps go to the engine in one ``generate`` call
    and its answers in another (they have different token budgets).

    A ``synced`` engine (every rank of the process group calls ``generate`` together: HF generate on a
    ZeRO-3 partitioned policy, vLLM engines placed over the ranks) needs ``gather``
    (``DistributedContext.gather``): every rank runs ``rollout`` together, each with its own queries (possibly
    none), and each round the ranks agree on the calls to make, so a rank whose documents have fewer chunks
    (or that has no queries) still joins the others' memory and answer calls with no prompts.
    """

    def __init__(self, engine: RolloutEngine, tokenizer: Any, config: MemoryAgentConfig = MemoryAgentConfig(),
                 gather: Callable[[Any], list[Any]] | None = None):
        if engine.synced and gather is None:
            raise ValueError("gather: a synced engine (every rank generates together) needs the ranks' gather, "
                             "so that all of them make the same calls")
        self.engine, self.tokenizer, self.config, self.gather = engine, tokenizer, config, gather

    def _calls_this_round(self, memory: bool, answer: bool) -> tuple[bool, bool]:
        """Whether this round makes a memory call and an answer call: on a synced engine, whether any rank does."""
        if not self.engine.synced:
            return memory, answer
        shares = self.gather((memory, answer))
        return any(m for m, _ in shares), any(a for _, a in shares)

    def _encode(self, prompt: str) -> list[int]:
        return list(apply_chat_template(self.tokenizer, prompt, tokenize=True))

    def rollout(self, queries: Sequence[AgentQuery], group_size: int = 1, seed: int | None = None
                ) -> list[list[Trajectory]]:
        """``group_size`` trajectories per query (each reads the whole document and answers)."""
        if group_size < 1:
            raise ValueError(f"group_size: expected >= 1, got {group_size}")
        rng = random.Random(seed)
        chunks = [chunk_document(self.tokenizer, q.document, self.config.chunk_tokens) for q in queries]
        groups = [[Trajectory(q, len(c)) for _ in range(group_size)] for q, c in zip(queries, chunks, strict=True)]
        flat = [(t, c) for group, c in zip(groups, chunks, strict=True) for t in group]
        while True:
            readers = [(t, c) for t, c in flat if t.chunks_read < t.num_chunks]
            answerers = [t for t, _ in flat if t.chunks_read == t.num_chunks and t.answer is None]
            memory_call, answer_call = self._calls_this_round(bool(readers), bool(answerers))
            if not memory_call and not answer_call:
                return groups
            if memory_call:
                prompts = [memory_step_prompt(t.query, t.memory, t.plan, c[t.chunks_read], t.chunks_read + 1,
                                              t.num_chunks) for t, c in readers]
                for (t, _), step in zip(readers, self._generate(prompts, "memory", rng), strict=True):
                    t.steps.append(step)
                    t.memory, t.plan = parse_memory_step(step.text)
            if answer_call:
                prompts = [answer_prompt(t.query, t.memory) for t in answerers]
                for t, step in zip(answerers, self._generate(prompts, "answer", rng), strict=True):
                    t.steps.append(step)
                    t.answer = step.text

    def _generate(self, prompts: list[str], kind: str, rng: random.Random) -> list[AgentStep]:
        budget = self.config.memory_tokens if kind == "memory" else self.config.answer_tokens
        params = SamplingParams(max_new_tokens=budget, temperature=self.config.temperature, top_p=self.config.top_p,
                                seed=rng.randrange(2**31))
        ids = [self._encode(p) for p in prompts]
        steps = []
        for prompt_ids, group in zip(ids, self.engine.generate(ids, params), strict=True):
            c = group[0]
            text = self.tokenizer.decode(c.token_ids, skip_special_tokens=True)
            steps.append(AgentStep(kind, prompt_ids, list(c.token_ids), list(c.logprobs), text, c.finish_reason))
        return steps

    def answer(self, queries: Sequence[AgentQuery], seed: int | None = None) -> list[str]:
        """One trajectory per query; the final answers' texts."""
        return [group[0].answer or "" for group in self.rollout(queries, 1, seed)]


def score_trajectories(groups: Sequence[Sequence[Trajectory]], reward: HybridReward) -> torch.Tensor:
    """Trajectory-level rewards from the final answers (``[num_queries, group_size]``; also set on each)."""
    trajectories = [t for group in groups for t in group]
    results = reward.score([RewardItem(t.query.data_source, t.answer or "", t.query.ground_truth, t.query.question)
                            for t in trajectories])
    for t, result in zip(trajectories, results, strict=True):
        t.reward = result.score
    return torch.tensor([[t.reward for t in group] for group in groups], dtype=torch.float32)


def trajectory_sequences(groups: Sequence[Sequence[Trajectory]], advantages: torch.Tensor
                         ) -> tuple[list[list[int]], list[int], dict[str, list], dict[str, list]]:
    """Every step of every trajectory as one training sequence, with its trajectory's advantage.

    ``advantages``: ``[num_queries, group_size]``, one per trajectory (e.g. ``group_advantages`` of the
    rewards). Returns ``(sequences, prompt_lengths, response_values, sequence_values)`` as
    ``qwenlong.trainers.packed.pack_sequences`` takes them: sequences are ``prompt_ids + response_ids``,
    ``response_values["engine_logprobs"]`` the engine's per-token log-probs, ``sequence_values`` the
    ``advantages`` (the trajectory's, broadcast to every generated token of every step),
    ``response_tokens`` and ``trajectory`` (index of the trajectory, in group-major order).
    """
    shape = (len(groups), len(groups[0]) if groups else 0)
    if tuple(advantages.shape) != shape or any(len(g) != shape[1] for g in groups):
        raise ValueError(f"advantages: expected shape {shape} (queries x trajectories), got {tuple(advantages.shape)}")
    sequences, prompt_lengths, logprobs = [], [], []
    values: dict[str, list] = {"advantages": [], "response_tokens": [], "trajectory": []}
    for index, (trajectory, advantage) in enumerate(zip([t for g in groups for t in g],
                                                        advantages.flatten().tolist(), strict=True)):
        for step in trajectory.steps:
            sequences.append(step.prompt_ids + step.response_ids)
            prompt_lengths.append(len(step.prompt_ids))
            logprobs.append(step.logprobs)
            values["advantages"].append(advantage)
            values["response_tokens"].append(len(step.response_ids))
            values["trajectory"].append(index)
    return sequences, prompt_lengths, {"engine_logprobs": logprobs}, values


def memory_agent_generate_fn(agent: MemoryAgent, seed: int | None = 0):
    """An evaluation ``GenerateFn``: prompts in the method's template in, the agent's final answers out."""
    calls = 0

    def generate(prompts: Sequence[str]) -> list[str]:
        nonlocal calls
        calls += 1
        return agent.answer([query_from_prompt(p) for p in prompts], seed=None if seed is None else seed + calls)

    return generate
