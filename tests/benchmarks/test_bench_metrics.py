"""benchmarks.cifar.metrics against hand-computed cases and brute-force pair counting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from benchmarks.cifar.metrics import (  # noqa: E402
    accuracy,
    entropy,
    entropy_ratio,
    ood_metrics,
    typicality,
)


def test_perfect_separation() -> None:
    m = ood_metrics([0.1, 0.2, 0.3], [0.5, 0.9])
    assert m == {"auroc": 100.0, "aupr": 100.0, "fpr95": 0.0}


def test_identical_scores_give_chance() -> None:
    s = [1.0, 2.0, 3.0, 4.0]
    assert ood_metrics(s, s)["auroc"] == pytest.approx(50.0)
    assert ood_metrics([7.0] * 5, [7.0] * 3)["auroc"] == pytest.approx(50.0)  # all ties


def test_reversed_scores() -> None:
    m = ood_metrics([5.0, 6.0], [1.0, 2.0])
    assert m["auroc"] == pytest.approx(0.0)
    assert m["fpr95"] == pytest.approx(100.0)


def test_hand_computed_example() -> None:
    # ID 1, 2, 3, 5; OoD 2.5, 4, 6.
    # AUROC: OoD-above-ID pairs 2 + 3 + 4 = 9 of 12.
    # AP, ranked 6P 5N 4P 3N 2.5P 2N 1N: precisions at the positives 1/1, 2/3, 3/5.
    # FPR95: catching all 3 OoD (TPR >= .95) needs threshold 2.5, which flags ID 3 and 5.
    m = ood_metrics(np.array([1.0, 2.0, 3.0, 5.0]), torch.tensor([2.5, 4.0, 6.0]))
    assert m["auroc"] == pytest.approx(75.0)
    assert m["aupr"] == pytest.approx(100 * (1 + 2 / 3 + 3 / 5) / 3)
    assert m["fpr95"] == pytest.approx(50.0)


def test_fpr95_at_exactly_95_percent() -> None:
    # 19 of 20 OoD scores reach 1.5: TPR = 0.95 exactly there, flagging only ID 10.
    ood = np.arange(20) + 0.5
    m = ood_metrics([0.0, 1.0, 10.0], ood)
    assert m["fpr95"] == pytest.approx(100 / 3)


def test_auroc_matches_pair_counting() -> None:
    rng = np.random.default_rng(0)
    s_id = rng.normal(size=200).round(1)  # rounding makes ties
    s_ood = rng.normal(0.7, 1.0, size=150).round(1)
    diff = s_ood[:, None] - s_id[None, :]
    expected = 100 * ((diff > 0).mean() + 0.5 * (diff == 0).mean())
    assert ood_metrics(s_id, s_ood)["auroc"] == pytest.approx(expected)


def test_infinite_scores_keep_their_rank_and_nan_raises() -> None:
    m = ood_metrics([0.0, 1.0, 2.0], [1.5, math.inf])
    assert m == ood_metrics([0.0, 1.0, 2.0], [1.5, 3.0])
    assert ood_metrics([-math.inf, 1.0], [2.0])["auroc"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="NaN"):
        ood_metrics([0.0, float("nan")], [1.0])


def test_typicality() -> None:
    np.testing.assert_allclose(typicality(torch.tensor([1.0, 4.0, 2.5]), 2.5), [1.5, 1.5, 0.0])


def test_entropy() -> None:
    for k in (2, 10):
        np.testing.assert_allclose(entropy(np.full((3, k), 0.7)), np.log(k))
    p = np.array([0.25, 0.75])
    np.testing.assert_allclose(
        entropy(torch.log(torch.tensor([[1.0, 3.0]]))), -(p * np.log(p)).sum()
    )
    # a certain prediction, also with -inf logits
    np.testing.assert_allclose(entropy([[0.0, -math.inf, -math.inf]]), 0.0)
    np.testing.assert_allclose(entropy([[1000.0, 0.0]]), 0.0, atol=1e-12)


def test_entropy_ratio() -> None:
    assert entropy_ratio([2.0, 4.0], np.array([1.0, 3.0])) == pytest.approx(0.5)
    assert entropy_ratio(torch.tensor([1.0]), [2.0]) == pytest.approx(-0.5)


def test_accuracy() -> None:
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert accuracy(logits, [1, 0, 0, 0]) == pytest.approx(75.0)
    assert accuracy(logits.numpy(), torch.tensor([1, 0, 1, 0])) == pytest.approx(100.0)
    with pytest.raises(ValueError):
        accuracy(logits, [1, 0])
