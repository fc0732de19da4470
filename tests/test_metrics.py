"""The evaluation metrics (chunkkv/eval/metrics.py) on hand-worked examples."""
from __future__ import annotations

import pytest

from chunkkv.eval import metrics as M

approx = pytest.approx


def test_normalize_answer():
    assert M.normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert M.normalize_answer("An apple a day") == "apple day"
    assert M.normalize_answer("theory") == "theory"  # articles only as whole words


def test_qa_f1():
    # "cat sat" vs "cat sat on mat": 2 common, P = 2/2, R = 2/4, F1 = 2/3
    assert M.qa_f1("The cat sat.", "a cat sat on the mat") == approx(2 / 3)
    # multiset overlap: x:1, y:1 -> P = R = 2/3
    assert M.qa_f1("x x y", "x y y") == approx(2 / 3)
    assert M.qa_f1("", "anything") == 0.0
    assert M.qa_f1("Paris.", "paris") == 1.0
    assert M.qa_f1("london", "paris") == 0.0


def test_rouge_l():
    # LCS "the cat on the mat" = 5 of 6 tokens each way
    assert M.rouge_l("the cat sat on the mat", "the cat lay on the mat") == approx(5 / 6)
    # LCS 2: P = 2/4, R = 2/2, F = 2PR/(P+R) = 2/3
    assert M.rouge_l("a b c d", "a c") == approx(2 / 3)
    # order matters: LCS of (a b c) and (c b a) is 1
    assert M.rouge_l("a b c", "c b a") == approx(1 / 3)
    assert M.rouge_l("", "a") == 0.0
    assert M.rouge_l("Hello, World!", "hello world") == 1.0  # case and punctuation ignored


def test_classification_score():
    classes = ["Food", "Food item", "Animal"]
    assert M.classification_score("Food item", "Food item", classes) == 1.0      # "Food" is part of the answer
    assert M.classification_score("Animal or Food item", "Food item", classes) == 0.5
    assert M.classification_score("Animal", "Food item", classes) == 0.0
    assert M.classification_score("nothing", "Animal", classes) == 0.0


def test_retrieval_and_count():
    assert M.retrieval_score("Paragraph 3 and Paragraph 5", "Paragraph 3") == 0.5
    assert M.retrieval_score("I think 12", "Paragraph 12") == 1.0
    assert M.retrieval_score("no idea", "Paragraph 12") == 0.0
    assert M.count_score("There are 4 unique paragraphs out of 10", "4") == 0.5
    assert M.count_score("4", "4") == 1.0
    assert M.count_score("four", "4") == 0.0


def test_edit_similarity_and_code():
    assert M.edit_similarity("abc", "abd") == approx(4 / 6)            # LCS 2
    assert M.edit_similarity("kitten", "sitting") == approx(8 / 13)    # LCS "ittn"
    assert M.edit_similarity("", "") == 1.0
    assert M.first_code_line("```python\n# comment\n    x = 1\ny = 2\n") == "    x = 1"
    assert M.first_code_line("\n// c\nreturn a;") == "return a;"
    # "return a+b" (10 chars) is a subsequence of "return a + b" (12): 2 * 10 / 22
    assert M.code_sim("```\nreturn a + b\n", "return a+b") == approx(20 / 22)


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
