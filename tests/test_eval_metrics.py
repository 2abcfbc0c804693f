"""Answer metrics and bootstrap statistics against hand-checked values."""

import numpy as np
import pytest

from infoflow_rag.eval.metrics import (
    best_em,
    best_f1,
    clean_prediction,
    exact_match,
    normalize_answer,
    token_f1,
)
from infoflow_rag.eval.stats import Estimate, WinTieLoss, mean_ci, paired_diff, win_tie_loss


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The  Quick, Brown fox!", "quick brown fox"),
        ("An apple a day", "apple day"),
        ("Theatre of the absurd", "theatre of absurd"),  # articles only as whole words
        ("  U.S.A.\n", "usa"),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_ignores_case_punctuation_and_articles():
    assert exact_match("The Eiffel Tower.", "eiffel tower") == 1.0
    assert exact_match("Eiffel", "Eiffel Tower") == 0.0


@pytest.mark.parametrize(
    ("pred", "gold", "expected"),
    [
        ("the cat sat", "cat sat on mat", 2 / 3),  # P = 2/2, R = 2/4
        ("cat cat", "cat", 2 / 3),  # a repeated token matches once per gold occurrence: P = 1/2, R = 1
        ("dog", "cat", 0.0),
        ("Paris, France", "paris", 2 / 3),  # P = 1/2, R = 1
    ],
)
def test_token_f1_partial_overlap(pred, gold, expected):
    assert token_f1(pred, gold) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("pred", "gold", "expected"),
    [
        ("yes", "no", 0.0),
        ("Yes.", "yes", 1.0),
        ("yes it is", "yes", 0.0),  # gold is a label: no partial credit
        ("no", "no way out", 0.0),  # prediction is a label
        ("no answer", "noanswer", 0.0),
    ],
)
def test_token_f1_yes_no_rule(pred, gold, expected):
    assert token_f1(pred, gold) == expected


def test_token_f1_empty_after_normalisation():
    assert token_f1("", "") == 1.0
    assert token_f1("the", "cat") == 0.0


def test_best_scores_take_the_max_over_golds():
    assert best_f1("Paris", ["London", "paris, France"]) == pytest.approx(2 / 3)
    assert best_f1("Paris", ["London", "Paris"]) == 1.0
    assert best_em("the paris", ["London", "Paris"]) == 1.0
    assert best_em("Paris France", ["London", "Paris"]) == 0.0


@pytest.mark.parametrize("golds", [[], "Paris"])
def test_best_scores_reject_missing_golds(golds):
    with pytest.raises(ValueError, match="non-empty list"):
        best_f1("Paris", golds)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Answer: Paris\nBecause it is the capital.", "Paris"),
        ("answer:\n  Paris  ", "Paris"),
        ("\n\n Paris is it.\nMore text", "Paris is it."),
        ("The answer: Paris", "The answer: Paris"),  # only a leading label is removed
        ("   \n", ""),
    ],
)
def test_clean_prediction(raw, expected):
    assert clean_prediction(raw) == expected


def test_mean_ci_contains_the_mean():
    values = np.random.default_rng(1).random(200)
    est = mean_ci(values)
    assert est.mean == pytest.approx(values.mean())
    assert est.low < est.mean < est.high
    assert est.n == 200


def test_mean_ci_shrinks_with_more_questions():
    rng = np.random.default_rng(2)
    small, large = mean_ci(rng.integers(0, 2, 50)), mean_ci(rng.integers(0, 2, 2000))
    assert (large.high - large.low) < (small.high - small.low) / 3


def test_mean_ci_is_deterministic_given_the_seed():
    values = np.random.default_rng(3).random(100)
    assert mean_ci(values, seed=7) == mean_ci(values, seed=7)
    assert mean_ci(values, seed=7) != mean_ci(values, seed=8)


def test_mean_ci_of_constant_values_is_a_point():
    assert mean_ci([0.5] * 10) == Estimate(mean=0.5, low=0.5, high=0.5, n=10)


@pytest.mark.parametrize(("kwargs", "match"), [({"values": []}, "non-empty"), ({"values": [1.0], "alpha": 0}, "alpha")])
def test_mean_ci_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mean_ci(**kwargs)


def test_paired_diff_of_identical_scores_is_zero():
    scores = list(np.random.default_rng(4).random(50))
    assert paired_diff(scores, scores) == Estimate(mean=0.0, low=0.0, high=0.0, n=50)
    assert win_tie_loss(scores, scores) == WinTieLoss(wins=0, ties=50, losses=0)


def test_paired_diff_and_win_tie_loss_by_hand():
    a, b = [1.0, 1.0, 0.0, 0.5], [0.0, 1.0, 1.0, 0.0]
    assert paired_diff(a, b).mean == pytest.approx(0.125)  # (1 + 0 - 1 + 0.5) / 4
    assert win_tie_loss(a, b) == WinTieLoss(wins=2, ties=1, losses=1)
    assert str(win_tie_loss(a, b)) == "2/1/1"


def test_paired_diff_rejects_unaligned_scores():
    with pytest.raises(ValueError, match="3 vs 2"):
        paired_diff([1, 2, 3], [1, 2])
