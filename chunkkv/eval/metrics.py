"""Scoring functions of the benchmark scripts, written from their published definitions.

Every function returns a score in [0, 1] (scripts report x100).

LongBench (Bai et al., 2024) metrics, as its evaluation code (``metrics.py``, ``eval.py`` of THUDM/LongBench)
computes them; the name LongBench gives each (``dataset2metric``) is in brackets:

* :func:`qa_f1` [qa_f1_score] -- token-level F1 after SQuAD's answer normalisation (lower case,
  punctuation removed, articles "a", "an", "the" removed, whitespace collapsed); the multiset of
  common tokens gives precision (over the prediction) and recall (over the reference).
* :func:`qa_f1_zh` [qa_f1_zh_score] -- the same F1 over the words ``jieba`` cuts (``cut_all=False``), each word
  normalised by :func:`normalize_zh_answer` (lower case, Chinese and English punctuation removed, whitespace
  removed) and dropped when nothing is left of it.
* :func:`rouge_l` [rouge_score] -- the ``rouge-l`` F score of the ``rouge`` package (1.0.1) that LongBench calls:
  the texts are split into sentences at every ".", sentences into words at single spaces (after collapsing
  whitespace; case and other punctuation are kept). For each reference sentence and each predicted sentence
  one longest common subsequence (LCS) of words is traced back; ``u`` is the number of *distinct* words in
  the union of those LCSs, P = u / (distinct words of the prediction), R = u / (distinct words of the
  reference), F = 2PR / (P + R + 1e-8). An empty prediction or reference scores 0.
* :func:`rouge_l_zh` [rouge_zh_score] -- :func:`rouge_l` of the texts cut by ``jieba`` and joined with spaces.
* :func:`classification_score` [classification_score] -- for TREC and LSHT: the classes (``all_classes``)
  that occur in the prediction, dropping those that are only a part of the correct class name; 1 / (number
  left) if the correct class is among them, else 0.
* :func:`retrieval_score` / :func:`retrieval_zh_score` [retrieval_score / retrieval_zh_score] -- for
  PassageRetrieval: the paragraph number of the reference ("Paragraph 12", "段落12") against every number in
  the prediction: the fraction of those numbers that are right (0 when there is none).
* :func:`count_score` [count_score] -- for PassageCount: the fraction of the numbers in the prediction equal
  to the reference count.
* :func:`code_sim` [code_sim_score] -- for LCC / RepoBench-P: ``fuzzywuzzy``'s ``fuzz.ratio`` (:func:`fuzz_ratio`)
  of the first line of the prediction without a "`", "#" or "//" to the reference line, over 100.

Per example, a task's score is the best over its reference answers (:func:`best_over`).

Others:

* :func:`extract_last_number`, :func:`gsm8k_correct` -- GSM8K: the final number of the answer.
* :func:`string_match_all` -- RULER: the fraction of expected strings that occur in the output
  (case-insensitive); 1/0 for tasks with a single expected value.
* :func:`keyword_recall` -- NIAH: the fraction of the needle's key phrases in the output.
* :func:`jaccard` -- |A & B| / |A | B| of two sets of positions.
"""
from __future__ import annotations

import difflib
import logging
import re
import string
from collections import Counter
from typing import Callable, Iterable, Optional, Sequence

# ------------------------------------------------------------------------------------------------
# text normalisation
# ------------------------------------------------------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
#: what LongBench's Chinese normalisation removes besides ASCII punctuation: full-width and CJK punctuation,
#: dashes, quotes, the ellipsis and "." (its list has the closing "》" but not the opening "《")
ZH_PUNCTUATION = ("！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿"
                  "–—‘’‛“”„‟…‧﹏.")
_ZH_PUNCT = _PUNCT | set(ZH_PUNCTUATION)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def normalize_zh_answer(text: str) -> str:
    """LongBench's Chinese normalisation: lower case, drop Chinese and English punctuation, drop all whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _ZH_PUNCT)
    return "".join(text.split())


_jieba = None


def jieba_cut(text: str) -> list[str]:
    """The words of ``text`` in jieba's accurate mode (``cut_all=False``), as LongBench cuts Chinese text."""
    global _jieba
    if _jieba is None:
        try:
            import jieba
        except ImportError:
            raise ImportError("chunkkv.eval.metrics: the Chinese LongBench metrics (qa_f1_zh, rouge_l_zh) need "
                              "jieba: pip install jieba (or chunkkv[eval])") from None
        jieba.setLogLevel(logging.WARNING)  # else every process logs building its dictionary
        _jieba = jieba
    return list(_jieba.cut(text, cut_all=False))


# ------------------------------------------------------------------------------------------------
# LongBench metrics
# ------------------------------------------------------------------------------------------------
def _token_f1(pred: Sequence[str], ref: Sequence[str]) -> float:
    """F1 of the multiset of common tokens (0 when there is none)."""
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, reference: str) -> float:
    """Token F1 between the normalised prediction and reference (LongBench's qa_f1_score)."""
    return _token_f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


def qa_f1_zh(prediction: str, reference: str) -> float:
    """Token F1 over jieba's words, each normalised by :func:`normalize_zh_answer`, empty ones dropped
    (LongBench's qa_f1_zh_score)."""
    def words(text: str) -> list[str]:
        return [w for w in (normalize_zh_answer(t) for t in jieba_cut(text)) if w]

    return _token_f1(words(prediction), words(reference))


def _rouge_sentences(text: str) -> list[list[str]]:
    """The rouge package's split: sentences at every ".", empty pieces dropped, whitespace collapsed, words at
    single spaces (an all-blank sentence is the one word "", as there)."""
    return [" ".join(piece.split()).split(" ") for piece in text.split(".") if piece]


def _lcs_words(ref: Sequence[str], pred: Sequence[str]) -> set[str]:
    """The words of the LCS of ``ref`` and ``pred`` that the rouge package traces back from the end: a match is
    taken, else the step goes to the larger neighbour, dropping a word of ``pred`` on a tie. Which LCS is traced
    matters, since only its distinct words count. (The package recurses and fails past Python's recursion
    limit on very long sentences; this loop does not.)"""
    n, m = len(ref), len(pred)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        word, row, up = ref[i - 1], table[i], table[i - 1]
        for j in range(1, m + 1):
            row[j] = up[j - 1] + 1 if word == pred[j - 1] else (up[j] if up[j] > row[j - 1] else row[j - 1])
    words: set[str] = set()
    i, j = n, m
    while i and j:
        if ref[i - 1] == pred[j - 1]:
            words.add(ref[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def rouge_l(prediction: str, reference: str) -> float:
    """The ``rouge`` package's rouge-l F score (LongBench's rouge_score; see the module docstring)."""
    pred, ref = _rouge_sentences(prediction), _rouge_sentences(reference)
    if not pred or not ref:
        return 0.0  # the package raises on a text without a sentence; LongBench scores that 0
    union: set[str] = set()
    for ref_sentence in ref:
        for pred_sentence in pred:
            union |= _lcs_words(ref_sentence, pred_sentence)
    p = len(union) / len({w for s in pred for w in s})
    r = len(union) / len({w for s in ref for w in s})
    return 2.0 * p * r / (p + r + 1e-8)


def rouge_l_zh(prediction: str, reference: str) -> float:
    """:func:`rouge_l` of the texts cut into words by jieba and joined by spaces (LongBench's rouge_zh_score)."""
    return rouge_l(" ".join(jieba_cut(prediction)), " ".join(jieba_cut(reference)))


def classification_score(prediction: str, reference: str, all_classes: Optional[Sequence[str]]) -> float:
    """Classes named in the prediction (minus parts of the correct name); 1/k if the correct one is in
    (LongBench's classification_score, for TREC and LSHT)."""
    if all_classes is None or isinstance(all_classes, str):
        raise ValueError(f"chunkkv.eval.metrics.classification_score: all_classes must be a list of class names, "
                         f"got {all_classes!r}")
    matched = [c for c in all_classes if c in prediction]
    # LongBench removes the parts of the correct name from the list it is iterating over, so the class after
    # each removed one is never looked at (and stays): kept, for the same scores
    i = 0
    while i < len(matched):
        name = matched[i]
        if name in reference and name != reference:
            matched.remove(name)
        i += 1
    return 1.0 / len(matched) if reference in matched else 0.0


_NUMBER = re.compile(r"\d+")


def _paragraph_score(prediction: str, reference: str, pattern: str, name: str) -> float:
    found = re.findall(pattern, reference)
    if not found:
        raise ValueError(f"chunkkv.eval.metrics.{name}: the reference {reference!r} names no paragraph "
                         f"(expected a match of {pattern!r})")
    numbers = _NUMBER.findall(prediction)
    if not numbers:
        return 0.0
    return sum(n == found[0] for n in numbers) / len(numbers)


def retrieval_score(prediction: str, reference: str) -> float:
    """Fraction of the numbers in the prediction equal to the reference's "Paragraph N"."""
    return _paragraph_score(prediction, reference, r"Paragraph (\d+)", "retrieval_score")


def retrieval_zh_score(prediction: str, reference: str) -> float:
    """Fraction of the numbers in the prediction equal to the reference's "段落N"."""
    return _paragraph_score(prediction, reference, r"段落(\d+)", "retrieval_zh_score")


def count_score(prediction: str, reference: str) -> float:
    """Fraction of the numbers in the prediction equal to the reference count."""
    numbers = _NUMBER.findall(prediction)
    if not numbers:
        return 0.0
    return sum(n == str(reference) for n in numbers) / len(numbers)


def first_code_line(prediction: str) -> str:
    """After the leading newlines, the first line without a "`", "#" or "//" anywhere in it ("" if none);
    blank lines count, as in LongBench."""
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            return line
    return ""


def fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy's ``fuzz.ratio`` as computed without python-Levenshtein (which LongBench does not install):
    100 for equal strings, 0 when one is empty, else ``difflib.SequenceMatcher(None, a, b).ratio()`` x 100
    rounded to an integer (half to even). difflib's matches are found block by block (longest common block
    first, then each side), which can be fewer than the longest common subsequence."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def code_sim(prediction: str, reference: str) -> float:
    """:func:`fuzz_ratio` of :func:`first_code_line` of the prediction and the reference, over 100
    (LongBench's code_sim_score)."""
    return fuzz_ratio(first_code_line(prediction), reference) / 100


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
