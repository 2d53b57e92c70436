"""LongBench's metrics, written from their definitions (no rouge / fuzzywuzzy / jieba dependency).

Every metric maps (prediction, one ground truth) to [0, 1]; `score` takes the best over the ground
truths, as LongBench's eval.py does. Where our reading departs from LongBench's code, the docstring says
so: ROUGE-L is the plain LCS F1 over lower-cased words (the `rouge` package splits sentences on "." and
weights F by P/R), classification implements the intended rule (the original's `if list != 0` is always
true, so it never falls back to string similarity), and the code similarity is not rounded to whole
percents (fuzz.ratio is).
"""
from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """SQuAD's English normalisation: lower case, drop punctuation, drop articles, squeeze whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def _f1(pred: Sequence[str], truth: Sequence[str]) -> float:
    same = sum((Counter(pred) & Counter(truth)).values())
    if same == 0:
        return 0.0
    p, r = same / len(pred), same / len(truth)
    return 2 * p * r / (p + r)


def token_f1(pred: str, truth: str) -> float:
    """Bag-of-words F1 after `normalize_answer` (LongBench qa_f1_score)."""
    return _f1(normalize_answer(pred).split(), normalize_answer(truth).split())


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Longest common subsequence, O(len(a) * len(b)) time, O(len(b)) memory."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, 1):
            prev_diag, row[j] = row[j], prev_diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(pred: str, truth: str) -> float:
    """ROUGE-L F1: LCS of the lower-cased word sequences (words = runs of letters and digits)."""
    p, t = re.findall(r"\w+", pred.lower()), re.findall(r"\w+", truth.lower())
    lcs = lcs_length(p, t) if p and t else 0
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(t)
    return 2 * prec * rec / (prec + rec)


def classification(pred: str, truth: str, classes: Sequence[str]) -> float:
    """Class names found in the prediction; a name that is only a part of the true class (e.g. "ENTY" in
    "ENTY:animal") does not count against it. 1/k if the true class is among the k found, else 0."""
    found = [c for c in classes if c in pred]
    found = [c for c in found if c == truth or c not in truth]
    return 1.0 / len(found) if truth in found else 0.0


def _numbers_matching(pred: str, want: str) -> float:
    numbers = re.findall(r"\d+", pred)
    return sum(n == want for n in numbers) / len(numbers) if numbers else 0.0


def count(pred: str, truth: str) -> float:
    """passage_count: the share of the numbers in the prediction that equal the true count."""
    return _numbers_matching(pred, str(truth).strip())


def retrieval(pred: str, truth: str) -> float:
    """passage_retrieval_en: truth is "Paragraph N"; the share of the prediction's numbers equal to N."""
    m = re.search(r"Paragraph (\d+)", truth)
    if m is None:
        raise ValueError(f"retrieval ground truth must look like 'Paragraph N', got {truth!r}")
    return _numbers_matching(pred, m.group(1))


def edit_similarity(a: str, b: str) -> float:
    """The Levenshtein ratio with substitutions costing 2 (what fuzz.ratio computes): 1 - d / (len a + len b),
    which equals 2 * LCS / (len a + len b). Two empty strings are identical."""
    if not a and not b:
        return 1.0
    return 2 * lcs_length(a, b) / (len(a) + len(b))


def code_similarity(pred: str, truth: str) -> float:
    """lcc / repobench-p: the first prediction line that is not a comment or a code fence, against the
    true next line."""
    line = next((ln for ln in pred.lstrip("\n").split("\n") if not any(m in ln for m in ("`", "#", "//"))), "")
    return edit_similarity(line, truth)


def contains_answer(pred: str, truth: str) -> float:
    """Retrieval evals (needle, passkey, QA in a haystack): the normalised answer occurs in the prediction."""
    want = normalize_answer(truth)
    return float(bool(want) and f" {want} " in f" {normalize_answer(pred)} ")


METRICS: dict[str, Callable[..., float]] = {
    "qa_f1": token_f1, "rouge_l": rouge_l, "classification": classification, "count": count,
    "retrieval": retrieval, "code_sim": code_similarity, "contains": contains_answer,
}


def score(metric: str, pred: str, truths: Sequence[str], classes: Sequence[str] = ()) -> float:
    """Best score of `pred` over the ground truths."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    if not truths:
        raise ValueError("no ground truth to score against")
    fn = METRICS[metric]
    if metric == "classification":
        return max(fn(pred, t, classes) for t in truths)
    return max(fn(pred, t) for t in truths)
