"""`python -m engine.eval longbench --data DIR`: the 16 English LongBench tasks from local jsonl files.

DIR holds LongBench's files as published (`<task>.jsonl`, one record per line with `context`, `input`,
`answers`, `all_classes`). Prompts, generation lengths, the chat/no-chat split, first-line scoring of
the few-shot tasks and the metrics follow LongBench's pred.py / eval.py (THUDM/LongBench, v1); a prompt
longer than the model allows is cut in the middle (head and tail kept, as LongBench does). Greedy
decoding. Scores are 0-100 per task, policy and budget. `--preset vatp` is the VATP paper's protocol:
budget = 50% of the prompt, the first 20 tokens protected, policies full, h2o, vatp unless named.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..cli import COUNT, Integer
from ..llm import ContextError
from ..policies import PolicyError
from . import metrics
from ..dist import rank
from .common import Results, add_grid_args, build_policy, grid, load_llm, run_cells, task_table, workers

_ANSWER_ONLY = "Only give me the answer and do not output any other words."
_PASSAGES = (f"Answer the question based on the given passages. {_ANSWER_ONLY}\n\nThe following are given "
             f"passages.\n{{context}}\n\nAnswer the question based on the given passages. {_ANSWER_ONLY}\n\n"
             "Question: {input}\nAnswer:")
_QASPER = ("as concisely as you can, using a single phrase or sentence if possible. If the question cannot be "
           "answered based on the information in the article, write \"unanswerable\". If the question is a yes/no "
           "question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.")
_STORY = "as concisely as you can, using a single phrase if possible. Do not provide any explanation."

# LongBench's config/dataset2prompt.json (English tasks; "asconcisely" of early releases fixed as upstream did)
PROMPTS = {
    "narrativeqa": (f"You are given a story, which can be either a novel or a movie script, and a question. Answer "
                    f"the question {_STORY}\n\nStory: {{context}}\n\nNow, answer the question based on the story "
                    f"{_STORY}\n\nQuestion: {{input}}\n\nAnswer:"),
    "qasper": (f"You are given a scientific article and a question. Answer the question {_QASPER}\n\nArticle: "
               f"{{context}}\n\n Answer the question based on the above article {_QASPER}\n\nQuestion: {{input}}"
               "\n\nAnswer:"),
    "multifieldqa_en": ("Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following "
                        "question based on the above text, only give me the answer and do not output any other "
                        "words.\n\nQuestion: {input}\nAnswer:"),
    "hotpotqa": _PASSAGES,
    "2wikimqa": _PASSAGES,
    "musique": _PASSAGES,
    "gov_report": ("You are given a report by a government agency. Write a one-page summary of the report.\n\n"
                   "Report:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:"),
    "qmsum": ("You are given a meeting transcript and a query containing a question or instruction. Answer the "
              "query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the "
              "above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:"),
    "multi_news": ("You are given several news passages. Write a one-page summary of all news. \n\nNews:\n"
                   "{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:"),
    "trec": ("Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n"
             "{input}"),
    "triviaqa": ("Answer the question based on the given passage. Only give me the answer and do not output any "
                 "other words. The following are some examples.\n\n{context}\n\n{input}"),
    "samsum": ("Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}"
               "\n\n{input}"),
    "passage_count": ("There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. "
                      "Please carefully read these paragraphs and determine how many unique paragraphs there are "
                      "after removing duplicates. In other words, how many non-repeating paragraphs are there in "
                      "total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing "
                      "duplicates. The output format should only contain the number, such as 1, 2, 3, and so on."
                      "\n\nThe final answer is: "),
    "passage_retrieval_en": ("Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which "
                             "paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n"
                             "{input}\n\nPlease enter the number of the paragraph that the abstract is from. The "
                             "answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: "),
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}


@dataclass(frozen=True)
class Task:
    prompt: str  # str.format template with {context} and {input}
    max_new_tokens: int  # LongBench's config/dataset2maxlen.json
    metric: str  # a key of metrics.METRICS (LongBench's eval.py dataset2metric)
    chat: bool = True  # LongBench leaves the few-shot and code prompts out of the chat template
    first_line: bool = False  # the few-shot tasks score only the reply's first line


_TABLE = [  # task, new tokens, metric, chat template, first line only
    ("narrativeqa", 128, "qa_f1", True, False), ("qasper", 128, "qa_f1", True, False),
    ("multifieldqa_en", 64, "qa_f1", True, False), ("hotpotqa", 32, "qa_f1", True, False),
    ("2wikimqa", 32, "qa_f1", True, False), ("musique", 32, "qa_f1", True, False),
    ("gov_report", 512, "rouge_l", True, False), ("qmsum", 512, "rouge_l", True, False),
    ("multi_news", 512, "rouge_l", True, False), ("trec", 64, "classification", False, True),
    ("triviaqa", 32, "qa_f1", False, True), ("samsum", 128, "rouge_l", False, True),
    ("passage_count", 32, "count", True, False), ("passage_retrieval_en", 32, "retrieval", True, False),
    ("lcc", 64, "code_sim", False, False), ("repobench-p", 64, "code_sim", False, False),
]
TASKS: dict[str, Task] = {name: Task(PROMPTS[name], *rest) for name, *rest in _TABLE}
PRESETS = {"vatp": {"budgets": [0.5], "sinks": 20, "policies": "full,h2o,vatp"}}


@dataclass(frozen=True)
class Record:
    index: int
    context: str
    input: str
    answers: tuple[str, ...]
    classes: tuple[str, ...]


def load_task(folder: Path, task: str, limit: int | None = None) -> list[Record]:
    """`<folder>/<task>.jsonl`; every line must carry context, input and a non-empty answers list."""
    path = folder / f"{task}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (LongBench's data/{task}.jsonl)")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                answers = rec["answers"]
                if not isinstance(answers, list) or not answers:
                    raise TypeError("answers must be a non-empty list")
                out.append(Record(len(out), str(rec["context"]), str(rec.get("input") or ""),
                                  tuple(str(a) for a in answers), tuple(rec.get("all_classes") or ())))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path} line {n}: not a LongBench record ({type(e).__name__}: {e})") from None
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise ValueError(f"{path} holds no records")
    return out


def truncate_middle(tokenizer: Any, text: str, max_tokens: int) -> tuple[str, bool]:
    """Keep the first and last max_tokens // 2 tokens (LongBench: the instructions sit at both ends)."""
    ids = tokenizer.encode(text)
    if len(ids) <= max_tokens:
        return text, False
    half = max_tokens // 2
    return tokenizer.decode(ids[:half]) + tokenizer.decode(ids[-half:]), True


def prompt_ids(tokenizer: Any, task: Task, rec: Record, context_len: int, max_length: int | None
               ) -> tuple[list[int], bool]:
    """Token ids of the model input: the task prompt, cut to fit, in the chat template where LongBench uses one."""
    text = task.prompt.format(context=rec.context, input=rec.input)
    wrap = (lambda t: tokenizer.apply_chat([{"role": "user", "content": t}])) if task.chat else \
        (lambda t: tokenizer.encode(t, bos=tokenizer.add_bos))
    frame = len(wrap(""))
    limit = max_length if max_length is not None else context_len - task.max_new_tokens - frame - 8
    if limit < 32:
        raise ValueError(f"the model context ({context_len}) leaves no room for a prompt with {task.max_new_tokens} "
                         f"new tokens")
    text, cut = truncate_middle(tokenizer, text, limit)
    return wrap(text), cut


def answer_text(task: Task, reply: str) -> str:
    return reply.lstrip("\n").split("\n")[0] if task.first_line else reply


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="folder of LongBench <task>.jsonl files")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks (default: all 16 English tasks)")
    add_grid_args(p)
    p.add_argument("--preset", choices=sorted(PRESETS), help="vatp: budget 0.5 of the prompt, sinks 20, full,h2o,vatp")
    p.add_argument("--limit", type=COUNT, help="first N records of each task (>= 1)")
    p.add_argument("--max-length", type=Integer(32), help="prompt tokens before truncation, >= 32 (default: the "
                                                          "model context minus the task's new tokens and the template)")


def apply_preset(ns: argparse.Namespace) -> None:
    """Fill what the preset fixes unless the flags already say otherwise."""
    preset = PRESETS[ns.preset]
    ns.budgets = ns.budgets or preset["budgets"]
    ns.sinks = preset["sinks"] if ns.sinks is None else ns.sinks
    ns.policies = ns.policies or preset["policies"]


def run(ns: argparse.Namespace) -> int:
    if ns.preset:
        apply_preset(ns)
    tasks = [t.strip() for t in ns.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown LongBench task {unknown[0]!r}; the 16 English tasks: {', '.join(TASKS)}")
    folder = Path(ns.data)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder (LongBench's data/ with <task>.jsonl files)")
    records = {t: load_task(folder, t, ns.limit) for t in tasks}
    cells = grid(ns)
    policies = {(n, b): build_policy(ns, n, b) for n, b in cells}
    team = workers(ns.tp, ns.device)
    llm = load_llm(ns, team)
    meta = {"eval": "longbench", "model": str(llm.source), "data": str(folder.resolve()), "preset": ns.preset,
            "sinks": ns.sinks, "max_length": ns.max_length, "dtype": ns.dtype, "weights": llm.weights, "kv_dtype": ns.kv_dtype, "device": ns.device}
    results = Results(ns.out, meta, ("task", "policy", "budget", "index"))
    todo = [(t, r, n, b) for (n, b) in cells for t in tasks for r in records[t]
            if not results.done(task=t, policy=n, budget=b, index=r.index)]

    def compute(item: tuple[str, Any, str, int | float | None]) -> dict[str, Any]:
        task_name, rec, name, budget = item
        task = TASKS[task_name]
        ids, cut = prompt_ids(llm.tokenizer, task, rec, llm.args.max_seq_len, ns.max_length)
        llm.policy = policies[(name, budget)]
        cell = {"task": task_name, "policy": name, "budget": budget, "index": rec.index, "prompt_tokens": len(ids),
                "truncated": cut}
        try:
            reply = llm.generate(ids, max_new_tokens=task.max_new_tokens, temperature=0.0)
        except (PolicyError, ContextError) as e:  # e.g. a prompt too short for sinks + recent: kept out of the score
            return cell | {"skipped": str(e)}
        return cell | {"budget_tokens": llm.cache_stats().budget, "reply": reply,
                       "score": metrics.score(task.metric, answer_text(task, reply), rec.answers, rec.classes)}

    for cell in run_cells(todo, compute, team, "longbench samples"):
        results.add(cell)
    summary = summarize(results.cells)
    results.meta["summary"] = summary
    results.save()
    if rank() != 0:  # rank 0 reports
        return 0
    print(task_table(summary, "score", 22, 2))
    if ns.out:
        print(f"results: {ns.out}")
    return 0


def summarize(cells: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """task -> policy -> budget -> score (0-100, LongBench's scale), plus "average" over the tasks."""
    acc: dict[str, dict[str, dict[str, list[float]]]] = {}
    for c in (c for c in cells if "score" in c):
        b = "full" if c["budget"] is None else str(c["budget"])
        acc.setdefault(c["task"], {}).setdefault(c["policy"], {}).setdefault(b, []).append(c["score"])
    out = {t: {p: {b: round(100 * sum(v) / len(v), 2) for b, v in bs.items()} for p, bs in ps.items()}
           for t, ps in acc.items()}
    avg: dict[str, dict[str, list[float]]] = {}
    for ps in out.values():
        for p, bs in ps.items():
            for b, s in bs.items():
                avg.setdefault(p, {}).setdefault(b, []).append(s)
    out["average"] = {p: {b: round(sum(v) / len(v), 2) for b, v in bs.items()} for p, bs in avg.items()}
    return out
