"""Scoring functions of the benchmark scripts, written from their published definitions.

Every function returns a score in [0, 1] (scripts report x100).

LongBench (Bai et al., 2024) metrics, as its paper and repository describe them:

* :func:`qa_f1` -- token-level F1 after the usual answer normalisation (SQuAD style: lower case,
  punctuation removed, articles "a", "an", "the" removed, whitespace collapsed); the multiset of
  common tokens gives precision (over the prediction) and recall (over the reference).
* :func:`rouge_l` -- ROUGE-L F-measure: the longest common subsequence (LCS) of the two token
  sequences, P = LCS / |prediction|, R = LCS / |reference|, F = 2PR / (P + R). Tokens are the
  lower-cased alphanumeric runs of the text.
* :func:`classification_score` -- for TREC: the class names that occur in the prediction, dropping
  those that are only a part of the correct class name; 1 / (number matched) if the correct class
  is among them, else 0.
* :func:`retrieval_score` -- for PassageRetrieval: the paragraph number of the reference
  ("Paragraph 12") against every number in the prediction: the fraction of those numbers that are
  right (0 when there is none).
* :func:`count_score` -- for PassageCount: the fraction of the numbers in the prediction equal to
  the reference count.
* :func:`code_sim` -- for LCC / RepoBench-P: edit similarity of the first line of the prediction
  that is not a comment or a code fence to the reference line: 2 * LCS / (|a| + |b|) over
  characters, which is the normalised insertion/deletion (InDel) similarity.

Per example, a task's score is the best over its reference answers (:func:`best_over`).

Others:

* :func:`extract_last_number`, :func:`gsm8k_correct` -- GSM8K: the final number of the answer.
* :func:`string_match_all` -- RULER: the fraction of expected strings that occur in the output
  (case-insensitive); 1/0 for tasks with a single expected value.
* :func:`keyword_recall` -- NIAH: the fraction of the needle's key phrases in the output.
* :func:`jaccard` -- |A & B| / |A | B| of two sets of positions.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from typing import Callable, Iterable, Optional, Sequence

# ------------------------------------------------------------------------------------------------
# text normalisation
# ------------------------------------------------------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence (dynamic programming, O(|a| |b|) time, O(|b|) memory)."""
    if not a or not b:
        return 0
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            cur[j] = prev[j - 1] + 1 if x == y else (prev[j] if prev[j] >= cur[j - 1] else cur[j - 1])
        prev = cur
    return prev[-1]


# ------------------------------------------------------------------------------------------------
# LongBench metrics
# ------------------------------------------------------------------------------------------------
def qa_f1(prediction: str, reference: str) -> float:
    """Token F1 between the normalised prediction and reference."""
    pred = normalize_answer(prediction).split()
    ref = normalize_answer(reference).split()
    common = Counter(pred) & Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


_WORD = re.compile(r"[a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (LCS over lower-cased alphanumeric tokens)."""
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    lcs = _lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(pred), lcs / len(ref)
    return 2 * p * r / (p + r)


def classification_score(prediction: str, reference: str, all_classes: Sequence[str]) -> float:
    """Classes named in the prediction (minus parts of the correct name); 1/k if the correct one is in."""
    matched = [c for c in all_classes if c in prediction]
    matched = [c for c in matched if not (c in reference and c != reference)]
    return 1.0 / len(matched) if reference in matched else 0.0


_NUMBER = re.compile(r"\d+")


def retrieval_score(prediction: str, reference: str) -> float:
    """Fraction of the numbers in the prediction equal to the reference paragraph number."""
    target = re.findall(r"Paragraph (\d+)", reference)
    if not target:
        return 0.0
    numbers = _NUMBER.findall(prediction)
    if not numbers:
        return 0.0
    return sum(n == target[0] for n in numbers) / len(numbers)


def count_score(prediction: str, reference: str) -> float:
    """Fraction of the numbers in the prediction equal to the reference count."""
    numbers = _NUMBER.findall(prediction)
    if not numbers:
        return 0.0
    return sum(n == str(reference).strip() for n in numbers) / len(numbers)


def first_code_line(prediction: str) -> str:
    """The first line that is not empty, a code fence or a comment."""
    for line in prediction.lstrip("\n").split("\n"):
        s = line.strip()
        if s and not s.startswith(("`", "#", "//")):
            return line
    return ""


def edit_similarity(a: str, b: str) -> float:
    """2 * LCS(a, b) / (|a| + |b|) over characters (normalised InDel similarity); 1 for two empty strings."""
    if not a and not b:
        return 1.0
    return 2.0 * _lcs_length(a, b) / (len(a) + len(b))


def code_sim(prediction: str, reference: str) -> float:
    return edit_similarity(first_code_line(prediction), reference)


def best_over(metric: Callable[..., float], prediction: str, references: Iterable[str], **kw) -> float:
    """The best score of prediction over several acceptable references (0 with none)."""
    scores = [metric(prediction, ref, **kw) for ref in references]
    return max(scores) if scores else 0.0


# ------------------------------------------------------------------------------------------------
# GSM8K, RULER, NIAH
# ------------------------------------------------------------------------------------------------
_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def parse_number(text: str) -> Optional[float]:
    try:
        return float(text.replace(",", "").rstrip("."))
    except ValueError:
        return None


def extract_last_number(text: str) -> Optional[float]:
    """The last number in the text ("1,234.5" -> 1234.5), None without any."""
    found = _NUM.findall(text)
    for item in reversed(found):
        value = parse_number(item)
        if value is not None:
            return value
    return None


def gsm8k_reference(answer: str) -> float:
    """The number after '####' in a GSM8K answer."""
    tail = answer.split("####")[-1]
    value = extract_last_number(tail)
    if value is None:
        raise ValueError(f"no final number in GSM8K answer {answer!r}")
    return value


def gsm8k_correct(prediction: str, reference: float) -> float:
    value = extract_last_number(prediction)
    return 1.0 if value is not None and abs(value - reference) < 1e-6 else 0.0


def string_match_all(prediction: str, expected: Sequence[str]) -> float:
    """Fraction of expected strings found (case-insensitive) in the prediction."""
    if not expected:
        return 0.0
    low = prediction.lower()
    return sum(str(e).lower() in low for e in expected) / len(expected)


def string_match_part(prediction: str, expected: Sequence[str]) -> float:
    """1 if any expected string is found (case-insensitive) in the prediction, else 0 (RULER's QA metric)."""
    low = prediction.lower()
    return float(any(str(e).lower() in low for e in expected))


def keyword_recall(prediction: str, keywords: Sequence[str]) -> float:
    """Fraction of key phrases present (case-insensitive, whitespace-normalised)."""
    norm = " ".join(prediction.lower().split())
    if not keywords:
        return 0.0
    return sum(" ".join(k.lower().split()) in norm for k in keywords) / len(keywords)


def jaccard(a: Iterable, b: Iterable) -> float:
    sa, sb = set(a), set(b)
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)
