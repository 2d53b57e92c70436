"""`python -m engine.eval retrieval`: can the model still find one fact in a long prompt under a KV budget?

Tasks, each at chosen prompt lengths (tokens, chat template included) and depths (0 = the fact at the
start of the context, 1 = at its end), deterministic per seed:
- niah: a "special magic number" sentence hidden in Paul Graham's essays (RULER's needle; the
  original NIAH needle is judged by an LLM, a number can be checked exactly);
- passkey: a 5-digit pass key hidden in repeated filler sentences (the Landmark Attention test);
- squad / hotpotqa: a question whose supporting paragraph(s) are hidden among paragraphs of other
  questions (HotpotQA: its own distractors first).
A sample scores 1 when the normalised answer occurs in the greedy reply (`metrics.contains_answer`);
`answer_nll` is the mean NLL of the gold answer teacher-forced after the compressed prompt (graded, so
small models that rarely answer exactly still separate the policies). Accuracy and answer NLL per task,
policy and budget, and a depth x length accuracy heatmap per policy and budget.
"""
from __future__ import annotations

import argparse
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..cli import COUNT, FRACTION, SEED, CommaList
from ..decode import decode_step
from ..generate import prefill
from ..policies import PolicyError
from . import data, metrics, plots
from ..dist import rank
from .common import Results, add_grid_args, build_policy, grid, load_llm, plot_path, run_cells, task_table, workers

Messages = list[dict[str, str]]

KEYS = ("Aberdeen", "Bergen", "Cairo", "Dakar", "Edinburgh", "Florence", "Geneva", "Havana", "Istanbul", "Jakarta",
        "Kyoto", "Lisbon", "Madrid", "Nairobi", "Oslo", "Prague", "Quito", "Riga", "Santiago", "Tallinn", "Utrecht",
        "Valencia", "Warsaw", "Yokohama", "Zagreb", "Ankara", "Bogota", "Chicago", "Dublin", "Lyon")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QA_INSTRUCTION = ("Answer the question based on the given documents. Only give me the answer and do not output any "
                  "other words.")
MAX_NEW_TOKENS = {"niah": 16, "passkey": 12, "squad": 32, "hotpotqa": 32}
TASKS = tuple(MAX_NEW_TOKENS)


@dataclass(frozen=True)
class Sample:
    task: str
    length: int  # asked-for prompt length in tokens
    depth: float
    seed: int
    messages: Messages = field(repr=False)
    answers: tuple[str, ...]


class Builder:
    """Makes samples of one task: fits a context to `length` prompt tokens and puts the fact at `depth`."""

    def __init__(self, tokenizer: Any, haystack: str = "", qa: Sequence[data.QAItem] = ()):
        self.tok, self.haystack, self.qa = tokenizer, haystack, qa

    def n_tokens(self, messages: Messages) -> int:
        return len(self.tok.apply_chat(messages))

    def room(self, wrap: Callable[[str], Messages], length: int) -> int:
        """Context tokens left once the instruction, the question and the template are counted."""
        left = length - self.n_tokens(wrap("")) - 4  # re-encoding the joined text may merge or split a few tokens
        if left < 16:
            raise ValueError(f"prompt length {length} leaves no room for a context (instruction, question and "
                             f"template take {length - left - 4} tokens)")
        return left

    def prefix(self, text: str, n: int) -> str:
        """The longest prefix of `text` that encodes to at most n tokens, cut at a sentence end when one is near."""
        ids = self.tok.encode(text[: 8 * n + 64])[:n]
        cut = self.tok.decode(ids)
        end = max(cut.rfind(". "), cut.rfind("\n"))
        return cut[: end + 1] if end > len(cut) // 2 else cut

    def hide(self, filler: str, needle: str, depth: float) -> str:
        """`needle` inserted into `filler` at a sentence boundary at the fraction `depth` of its length."""
        at = round(depth * len(filler))
        if 0 < at < len(filler):
            end = max(filler.rfind(". ", 0, at), filler.rfind("\n", 0, at))
            at = end + 1 if end >= 0 else 0
        return f"{filler[:at].rstrip()} {needle} {filler[at:].lstrip()}".strip()

    def make(self, task: str, length: int, depth: float, seed: int) -> Sample:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
        rng = random.Random(f"{task}:{length}:{depth}:{seed}")
        make = {"niah": self._niah, "passkey": self._passkey, "squad": self._qa, "hotpotqa": self._qa}[task]
        messages, answers = make(rng, length, depth)
        return Sample(task, length, depth, seed, messages, answers)

    def _niah(self, rng: random.Random, length: int, depth: float) -> tuple[Messages, tuple[str, ...]]:
        if not self.haystack:
            raise ValueError("niah needs a haystack text (--haystack FILE or the cached pg-essays)")
        key, value = rng.choice(KEYS), str(rng.randint(1_000_000, 9_999_999))
        needle = f"The special magic number for {key} is: {value}."

        def wrap(context: str) -> Messages:
            return [{"role": "user", "content":
                     f"Some special magic numbers are hidden in the following text. Memorize them; I will ask about "
                     f"them.\n\n{context}\n\nWhat is the special magic number for {key} mentioned in the text above? "
                     f"Answer with the number only."}]

        n = self.room(wrap, length) - len(self.tok.encode(" " + needle + " "))
        start = self.haystack.find(". ", rng.randrange(max(1, len(self.haystack) - 8 * length)))
        start = start + 2 if start >= 0 else 0  # a sentence start; the text wraps around if too short
        reps = 1 + 8 * length // len(self.haystack)
        filler = self.prefix(self.haystack[start:] + ("\n" + self.haystack) * reps, n)
        return wrap(self.hide(filler, needle, depth)), (value,)

    def _passkey(self, rng: random.Random, length: int, depth: float) -> tuple[Messages, tuple[str, ...]]:
        value = str(rng.randint(10_000, 99_999))
        needle = f"The pass key is {value}. Remember it. {value} is the pass key."

        def wrap(context: str) -> Messages:
            return [{"role": "user", "content":
                     f"There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
                     f"memorize it. I will quiz you about it.\n\n{context}\n\nWhat is the pass key? Answer with the "
                     f"number only."}]

        n = self.room(wrap, length) - len(self.tok.encode(" " + needle + " "))
        per = len(self.tok.encode(PASSKEY_FILLER))
        filler = self.prefix(PASSKEY_FILLER * (n // per + 2), n)
        return wrap(self.hide(filler, needle, depth)), (value,)

    def _qa(self, rng: random.Random, length: int, depth: float) -> tuple[Messages, tuple[str, ...]]:
        if len(self.qa) < 2:
            raise ValueError("squad/hotpotqa need the cached QA data (`python -m engine.eval data fetch`)")
        item = self.qa[rng.randrange(len(self.qa))]

        def wrap(context: str) -> Messages:
            return [{"role": "user", "content": f"{QA_INSTRUCTION}\n\nThe following are given documents.\n\n{context}"
                                                f"\n\n{QA_INSTRUCTION}\n\nQuestion: {item.question}"}]

        room = self.room(wrap, length)
        cost = lambda p: len(self.tok.encode(p)) + 6  # noqa: E731  ("Document N:\n" and the blank line)
        used = sum(cost(p) for p in item.gold)
        if used > room:
            raise ValueError(f"prompt length {length} is too short for this question's supporting paragraphs "
                             f"({used} tokens); use a longer length")
        distractors: list[str] = []
        seen = set(item.gold)  # SQuAD asks several questions about one paragraph: never repeat one
        pool = list(item.others)
        misses = 0
        while misses < 50:
            if not pool:
                other = self.qa[rng.randrange(len(self.qa))]
                pool = list(other.gold + other.others)
            para = pool.pop(0)
            if para in seen or used + cost(para) > room:
                misses += 1
                continue
            seen.add(para)
            distractors.append(para)
            used += cost(para)
        at = round(depth * len(distractors))
        docs = distractors[:at] + list(item.gold) + distractors[at:]
        context = "\n\n".join(f"Document {i}:\n{p}" for i, p in enumerate(docs, 1))
        return wrap(context), item.answers


# ---- running ----------------------------------------------------------------------------------------

def add_args(p: argparse.ArgumentParser) -> None:
    add_grid_args(p)
    p.add_argument("--tasks", default="niah,passkey", help=f"comma-separated: {', '.join(TASKS)} (default: "
                                                          "niah,passkey)")
    p.add_argument("--lengths", type=CommaList(COUNT), default="1024,2048",
                   help="prompt lengths in tokens, each >= 1 (default 1024,2048)")
    p.add_argument("--depths", type=CommaList(FRACTION), default="0,0.25,0.5,0.75,1", help="fact depths in [0, 1]")
    p.add_argument("--samples", type=COUNT, default=1, help="samples (seeds) per length and depth (>= 1)")
    p.add_argument("--seed", type=SEED, default=0, help="first seed (>= 0)")
    p.add_argument("--haystack", help="niah filler text file (default: the cached pg-essays)")


def builder_for(tasks: Sequence[str], tokenizer: Any, haystack_file: str | None) -> dict[str, Builder]:
    """One Builder per task, loading only the data the tasks need."""
    out = {}
    for task in tasks:
        if task == "niah":
            hay = data.read_text_file(haystack_file) if haystack_file else data.text("pg-essays")
            out[task] = Builder(tokenizer, haystack=hay)
        elif task in ("squad", "hotpotqa"):
            out[task] = Builder(tokenizer, qa=data.qa_items(task))
        else:
            out[task] = Builder(tokenizer)
    return out


def run(ns: argparse.Namespace) -> int:
    tasks = [t.strip() for t in ns.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown retrieval task {unknown[0]!r}; known: {', '.join(TASKS)}")
    lengths, depths = ns.lengths, ns.depths
    cells = grid(ns)
    policies = {(n, b): build_policy(ns, n, b) for n, b in cells}
    team = workers(ns.tp, ns.device)
    llm = load_llm(ns, team)
    too_long = [n for n in lengths if n > llm.args.max_seq_len]
    if too_long:
        raise ValueError(f"prompt length {too_long[0]} exceeds the model context ({llm.args.max_seq_len})")
    builders = builder_for(tasks, llm.tokenizer, ns.haystack)
    samples = [builders[t].make(t, n, d, s) for t in tasks for n in lengths for d in depths
               for s in range(ns.seed, ns.seed + ns.samples)]
    meta = {"eval": "retrieval", "model": str(llm.source), "haystack": ns.haystack or "pg-essays",
            "dtype": ns.dtype, "weights": llm.weights, "kv_dtype": ns.kv_dtype, "device": ns.device}
    results = Results(ns.out, meta, ("task", "policy", "budget", "length", "depth", "seed"))
    todo = [(s, n, b) for (n, b) in cells for s in samples
            if not results.done(task=s.task, policy=n, budget=b, length=s.length, depth=s.depth, seed=s.seed)]

    def compute(item: tuple[Sample, str, int | float | None]) -> dict[str, Any]:
        sample, name, budget = item
        llm.policy = policies[(name, budget)]
        cell = {"task": sample.task, "policy": name, "budget": budget, "length": sample.length, "depth": sample.depth,
                "seed": sample.seed, "prompt_tokens": len(llm.tokenizer.apply_chat(sample.messages)),
                "answers": list(sample.answers)}
        try:
            reply = llm.chat(sample.messages, max_new_tokens=MAX_NEW_TOKENS[sample.task], temperature=0.0)
        except PolicyError as e:  # a budget too small for the policy's sinks + recent at this length
            return cell | {"skipped": str(e)}
        budget_tokens = llm.cache_stats().budget
        return cell | {"budget_tokens": budget_tokens, "reply": reply,
                       "score": metrics.score("contains", reply, sample.answers),
                       "answer_nll": answer_nll(llm, llm.tokenizer.apply_chat(sample.messages), sample.answers[0])}

    for cell in run_cells(todo, compute, team, "retrieval samples"):
        results.add(cell)
    summary = summarize(results.cells)
    results.meta["summary"] = summary
    results.meta["summary_answer_nll"] = summarize(results.cells, "answer_nll")
    results.save()
    if rank() != 0:  # rank 0 reports and plots
        return 0
    print(task_table(summary, "accuracy", 10, 3))
    print(task_table(results.meta["summary_answer_nll"], "answer NLL", 10, 3))
    for path in plot(results.cells, ns.out):
        print(f"plot: {path}")
    if ns.out:
        print(f"results: {ns.out}")
    return 0


def _key(budget: Any) -> str:
    return "full" if budget is None else str(budget)


@torch.inference_mode()
def answer_nll(llm: Any, prompt: list[int], answer: str) -> float:
    """Mean NLL of the gold answer's tokens, teacher-forced after the (compressed) prompt: a graded signal
    where a small model rarely gets the answer exactly, and the same comparison between policies."""
    target = llm.tokenizer.encode(answer)
    store = llm.store = llm.new_store(len(prompt), len(target))
    logits = prefill(llm.model, store, torch.tensor([prompt], device=llm.device), llm.prefill_chunk)
    total = 0.0
    for i, tid in enumerate(target):
        total -= float(logits[0].float().log_softmax(-1)[tid])
        if i + 1 < len(target):
            logits = decode_step(llm.model, store, torch.tensor([tid], device=llm.device))
    return total / len(target)


def summarize(cells: list[dict[str, Any]], metric: str = "score") -> dict[str, dict[str, dict[str, float]]]:
    """task -> policy -> budget -> mean of `metric` (score = accuracy)."""
    acc: dict[str, dict[str, dict[str, list[float]]]] = {}
    for c in (c for c in cells if metric in c):
        acc.setdefault(c["task"], {}).setdefault(c["policy"], {}).setdefault(_key(c["budget"]), []).append(c[metric])
    return {t: {p: {b: sum(v) / len(v) for b, v in bs.items()} for p, bs in ps.items()} for t, ps in acc.items()}


def plot(cells: list[dict[str, Any]], out: str | None) -> list:
    """Per task: one depth x length accuracy heatmap per (policy, budget)."""
    made = []
    for task in sorted({c["task"] for c in cells}):
        mine = [c for c in cells if c["task"] == task and "score" in c]
        lengths = sorted({c["length"] for c in mine})
        depths = sorted({c["depth"] for c in mine})
        grids = {}
        for policy, budget in sorted({(c["policy"], _key(c["budget"])) for c in mine}):
            m = [[float("nan")] * len(lengths) for _ in depths]
            for i, d in enumerate(depths):
                for j, n in enumerate(lengths):
                    s = [c["score"] for c in mine if c["policy"] == policy and _key(c["budget"]) == budget
                         and c["depth"] == d and c["length"] == n]
                    if s:
                        m[i][j] = sum(s) / len(s)
            grids[f"{policy} @ {budget}"] = (m, depths, lengths)
        path = plot_path(out, f"-{task}.png")
        if path:
            made.append(plots.heatmaps(path, grids, "prompt length (tokens)", "depth", f"{task}: accuracy"))
    return [p for p in made if p]
