"""The evaluation metrics (chunkkv/eval/metrics.py) on hand-worked examples."""
from __future__ import annotations

import difflib
import importlib
import warnings

import pytest

from shared_data import missing

from chunkkv.eval import metrics as M

approx = pytest.approx


def test_normalize_answer():
    assert M.normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert M.normalize_answer("An apple a day") == "apple day"
    assert M.normalize_answer("theory") == "theory"  # articles only as whole words


def require(module: str):
    """The module, else skip (locally) or fail (CI=true): the LongBench metrics' dependencies are in the
    eval and bench extras."""
    try:
        return importlib.import_module(module)
    except ImportError:
        missing(f"{module} is not installed (pip install {module}; chunkkv[eval] and chunkkv[bench] bring it)")


def test_qa_f1():
    # "cat sat" vs "cat sat on mat": 2 common, P = 2/2, R = 2/4, F1 = 2/3
    assert M.qa_f1("The cat sat.", "a cat sat on the mat") == approx(2 / 3)
    # multiset overlap: x:1, y:1 -> P = R = 2/3
    assert M.qa_f1("x x y", "x y y") == approx(2 / 3)
    assert M.qa_f1("", "anything") == 0.0
    assert M.qa_f1("Paris.", "paris") == 1.0
    assert M.qa_f1("london", "paris") == 0.0


def test_normalize_zh_answer():
    # lower case (full-width letters too), Chinese and English punctuation out, every blank out
    assert M.normalize_zh_answer("  Hello, 世界！ Ａ。") == "hello世界ａ"
    assert M.normalize_zh_answer("“好的”……") == "好的"
    # LongBench's list has the closing book-title mark but not the opening one
    assert M.normalize_zh_answer("《书》") == "《书"


def test_qa_f1_zh():
    require("jieba")
    # the words jieba's accurate mode gives, on which the hand computation rests
    assert M.jieba_cut("北京是中国的首都。") == ["北京", "是", "中国", "的", "首都", "。"]
    assert M.jieba_cut("首都是北京") == ["首都", "是", "北京"]
    # "。" normalises to nothing and is dropped: 5 predicted words, 3 reference words, 3 common:
    # P = 3/5, R = 3/3, F1 = 2 * 0.6 / 1.6 = 0.75
    assert M.qa_f1_zh("北京是中国的首都。", "首都是北京") == approx(0.75)
    assert M.qa_f1_zh("首都是北京！", "首都是北京") == 1.0
    assert M.qa_f1_zh("，。", "北京") == 0.0


ROUGE_CASES = [  # (prediction, reference, P, R) worked by hand; F = 2PR / (P + R + 1e-8), as the package
    # one sentence each; distinct words 5 and 5; the LCS "the cat on the mat" has the distinct words
    # {the, cat, on, mat}: P = R = 4/5
    ("the cat sat on the mat", "the cat lay on the mat", 4 / 5, 4 / 5),
    # two predicted sentences (split at "."): LCS with the reference "w1 w2" and "w1 w3 w5", union
    # {w1, w2, w3, w5} = 4; distinct predicted words 8, reference words 5
    ("w1 w2 w6 w7 w8. w1 w3 w8 w9 w5", "w1 w2 w3 w4 w5", 4 / 8, 4 / 5),
    # distinct words count: {a} against {a} (the plain LCS F would be 2 * 2/3 * 1 / (5/3) = 0.8)
    ("a a a", "a a", 1.0, 1.0),
    # the trace-back takes a match, else drops a predicted word on a tie: LCS (a, b), not (a, a), so {a, b}
    ("a b a", "a a b", 1.0, 1.0),
    # case and punctuation other than "." are kept: only "world" is common
    ("Hello, world", "hello world", 1 / 2, 1 / 2),
]


@pytest.mark.parametrize("prediction, reference, p, r", ROUGE_CASES)
def test_rouge_l(prediction, reference, p, r):
    assert M.rouge_l(prediction, reference) == approx(2 * p * r / (p + r + 1e-8), rel=1e-12)


def test_rouge_l_without_sentences():
    # the rouge package raises on a text without a sentence and LongBench scores that 0
    assert M.rouge_l("", "a") == 0.0
    assert M.rouge_l("...", "a") == 0.0
    assert M.rouge_l("a", "") == 0.0
    assert M.rouge_l("x y", "a b") == 0.0


def test_rouge_l_matches_the_rouge_package():
    rouge = pytest.importorskip("rouge")  # optional: the hand-worked cases above need no package
    texts = [case[0] for case in ROUGE_CASES] + [case[1] for case in ROUGE_CASES] + [
        "The Occupy LA encampment got a stay. Police do intend to clear protesters. Everything seems calm.",
        "police  cleared the  camp. the protesters stayed . calm . . ", "a. b. a b. b a", "  .  x  .y"]
    for prediction in texts:
        for reference in texts:
            expected = rouge.Rouge().get_scores([prediction], [reference], avg=True)["rouge-l"]["f"]
            assert M.rouge_l(prediction, reference) == approx(expected, rel=1e-12, abs=1e-15)


def test_rouge_l_zh():
    require("jieba")
    assert M.jieba_cut("我爱北京天安门") == ["我", "爱", "北京", "天安门"]
    assert M.jieba_cut("我爱北京") == ["我", "爱", "北京"]
    # words joined by spaces, one sentence each: LCS {我, 爱, 北京}, P = 3/4, R = 3/3
    p, r = 3 / 4, 1.0
    assert M.rouge_l_zh("我爱北京天安门", "我爱北京") == approx(2 * p * r / (p + r + 1e-8), rel=1e-12)
    assert M.rouge_l_zh("", "我爱北京") == 0.0


def test_classification_score():
    classes = ["Food", "Food item", "Animal"]
    assert M.classification_score("Food item", "Food item", classes) == 1.0      # "Food" is part of the answer
    assert M.classification_score("Animal or Food item", "Food item", classes) == 0.5
    assert M.classification_score("Animal", "Food item", classes) == 0.0
    assert M.classification_score("nothing", "Animal", classes) == 0.0
    # LongBench drops "Food" (part of the answer) while iterating over the same list, so the class after it,
    # "Foo", is never examined and stays: 2 matches left, 1/2 (a clean filter would give 1)
    assert M.classification_score("Food item", "Food item", ["Food", "Foo", "Food item"]) == 0.5
    assert M.classification_score("Food item", "Food item", ["Foo", "Food", "Food item"]) == 0.5  # "Food" skipped
    assert M.classification_score("体育新闻", "体育", ["体育", "财经"]) == 1.0  # LSHT's classes are Chinese
    with pytest.raises(ValueError, match=r"chunkkv\.eval\.metrics\.classification_score: all_classes"):
        M.classification_score("Food", "Food", None)


def test_retrieval_and_count():
    assert M.retrieval_score("Paragraph 3 and Paragraph 5", "Paragraph 3") == 0.5
    assert M.retrieval_score("I think 12", "Paragraph 12") == 1.0
    assert M.retrieval_score("no idea", "Paragraph 12") == 0.0
    assert M.retrieval_zh_score("答案是：段落3", "段落3") == 1.0
    assert M.retrieval_zh_score("段落3和段落5", "段落5") == 0.5
    assert M.retrieval_zh_score("第13段", "段落3") == 0.0  # the number, not a digit of it
    for metric, reference in ((M.retrieval_score, "段落3"), (M.retrieval_zh_score, "Paragraph 3")):
        with pytest.raises(ValueError, match=r"chunkkv\.eval\.metrics\.retrieval.*names no paragraph"):
            metric("3", reference)
    assert M.count_score("There are 4 unique paragraphs out of 10", "4") == 0.5
    assert M.count_score("4", "4") == 1.0
    assert M.count_score("four", "4") == 0.0
    assert M.count_score("4", 4) == 1.0


def test_first_code_line():
    assert M.first_code_line("```python\n# comment\n    x = 1\ny = 2\n") == "    x = 1"
    assert M.first_code_line("\n// c\nreturn a;") == "return a;"
    assert M.first_code_line("x = 1  # set x\ny = 2") == "y = 2"     # a "#" anywhere disqualifies the line
    assert M.first_code_line("\n\n   \nx") == "   "                 # a blank line counts
    assert M.first_code_line("```\n# c") == ""


def test_fuzz_ratio_and_code_sim():
    # difflib: longest block "return a" (8), then "+" and "b" on its right: 10 matches, 200 * 10 / 22 = 90.9
    assert M.fuzz_ratio("return a + b", "return a+b") == 91
    assert M.code_sim("```\nreturn a + b\n", "return a+b") == 0.91
    # the first longest block is "a" (a[0], b[1]); nothing matches on its sides: 1 match, 200 / 7 = 28.6
    # (the longest common subsequence, "ba", would give 57)
    assert M.fuzz_ratio("abcaa", "ba") == 29
    assert M.fuzz_ratio("x", "x" + "a" * 15) == 12                   # 200 / 16 = 12.5, rounded half to even
    assert M.fuzz_ratio("same", "same") == 100 and M.fuzz_ratio("", "") == 100
    assert M.fuzz_ratio("", "a") == 0 and M.fuzz_ratio("a", "") == 0
    assert M.code_sim("# only a comment", "x = 1") == 0.0


def test_fuzz_ratio_matches_fuzzywuzzy():
    with warnings.catch_warnings():  # fuzzywuzzy warns that python-Levenshtein is missing: the case compared here
        warnings.simplefilter("ignore")
        fuzz = pytest.importorskip("fuzzywuzzy.fuzz")  # optional: the hand-worked cases above need no package
    if fuzz.SequenceMatcher is not difflib.SequenceMatcher:
        pytest.skip("fuzzywuzzy uses python-Levenshtein here, not the difflib ratio LongBench's install computes")
    pairs = ["return a + b", "return a+b", "abcaa", "ba", "", "x", "    self.assertEqual(a, b)",
             "self.assertEqual(b, a)", "for i in range(10):", "for (int i = 0; i < 10; i++) {"]
    for a in pairs:
        for b in pairs:
            assert M.fuzz_ratio(a, b) == fuzz.ratio(a, b), (a, b)


def test_best_over():
    assert M.best_over(M.qa_f1, "Paris", ["London", "paris"]) == 1.0
    assert M.best_over(M.qa_f1, "Paris", []) == 0.0


def test_gsm8k_numbers():
    assert M.extract_last_number("so 3 + 4 = 7. The answer is 1,234.") == 1234.0
    assert M.extract_last_number("it is -5 degrees") == -5.0
    assert M.extract_last_number("it costs $3.50.") == 3.5
    assert M.extract_last_number("no numbers") is None
    assert M.gsm8k_reference("She has 3 + 4 = <<3+4=7>>7 apples.\n#### 7") == 7.0
    assert M.gsm8k_reference("#### 1,000") == 1000.0
    assert M.gsm8k_correct("... The answer is 72.", 72.0) == 1.0
    assert M.gsm8k_correct("The answer is 72. Then 5 more.", 72.0) == 0.0  # the final number counts
    assert M.gsm8k_correct("none", 1.0) == 0.0


def test_ruler_and_niah_scores():
    assert M.string_match_all("The numbers are 123 and ABC", ["abc", "123", "xyz"]) == approx(2 / 3)
    assert M.string_match_all("7654321.", ["7654321"]) == 1.0
    assert M.string_match_all("765432", ["7654321"]) == 0.0
    kw = ["eat a sandwich", "Dolores Park", "sunny day"]
    assert M.keyword_recall("to eat a  sandwich in dolores park", kw) == approx(2 / 3)
    assert M.keyword_recall("nothing", kw) == 0.0


def test_jaccard():
    assert M.jaccard({1, 2, 3}, {2, 3, 4}) == 0.5
    assert M.jaccard([1, 1, 2], [2, 1]) == 1.0
    assert M.jaccard([], []) == 1.0
    assert M.jaccard([1], []) == 0.0
