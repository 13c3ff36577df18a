"""OoD detection and classification metrics (scikit-learn for the ranking metrics).

Scores follow one convention: higher means more out-of-distribution. All percentages.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve


def as_numpy(a: Any) -> np.ndarray:
    """numpy array (float64 for floats) from a numpy array, torch tensor or sequence."""
    if hasattr(a, "detach"):  # torch.Tensor, without importing torch
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    return a.astype(np.float64) if a.dtype.kind == "f" else a


def _finite_ranks(scores: np.ndarray) -> np.ndarray:
    """Replace +-inf by finite values that keep the ranking (NaN raises).

    A diverged model can give an OoD image an infinite score; ranking metrics only see the
    order, so +inf becomes (largest finite + 1) and -inf (smallest finite - 1).
    """
    if np.isnan(scores).any():
        raise ValueError(f"{int(np.isnan(scores).sum())} OoD scores are NaN")
    finite = scores[np.isfinite(scores)]
    if finite.size == scores.size:
        return scores
    hi = finite.max() + 1 if finite.size else 1.0
    lo = finite.min() - 1 if finite.size else -1.0
    return np.where(np.isposinf(scores), hi, np.where(np.isneginf(scores), lo, scores))


def ood_metrics(id_scores: Any, ood_scores: Any) -> dict[str, float]:
    """AUROC, AUPR and FPR95 of telling OoD (positive) from ID by score, in percent.

    - ``auroc``: area under the ROC curve (ties count one half).
    - ``aupr``: average precision with OoD as the positive class.
    - ``fpr95``: the fraction of ID samples flagged when the threshold flags 95% of OoD
      samples (the smallest false-positive rate on the ROC curve with TPR >= 0.95).
    """
    s_id, s_ood = as_numpy(id_scores).ravel(), as_numpy(ood_scores).ravel()
    if s_id.size == 0 or s_ood.size == 0:
        raise ValueError("ood_metrics needs at least one ID and one OoD score")
    scores = _finite_ranks(np.concatenate([s_id, s_ood]))
    labels = np.concatenate([np.zeros(s_id.size), np.ones(s_ood.size)])
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return {
        "auroc": 100.0 * float(roc_auc_score(labels, scores)),
        "aupr": 100.0 * float(average_precision_score(labels, scores)),
        "fpr95": 100.0 * float(fpr[np.searchsorted(tpr, 0.95, side="left")]),
    }


def typicality(scores: Any, id_reference_mean: float) -> np.ndarray:
    """Two-tailed score ``|score - mean_ID|``: both unusually high and low ``L_x`` are OoD."""
    return np.abs(as_numpy(scores) - float(id_reference_mean))


def entropy(logits: Any) -> np.ndarray:
    """Per-sample entropy ``H = -sum_k p_k log p_k`` of ``p = softmax(logits)`` (nats)."""
    z = as_numpy(logits).astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    p = np.exp(log_p)
    plogp = np.multiply(p, log_p, out=np.zeros_like(p), where=p > 0)  # 0 log 0 = 0
    return -plogp.sum(axis=-1)


def entropy_ratio(h_ood: Any, h_id: Any) -> float:
    """The paper's ``(mean H_ood - mean H_id) / mean H_id``."""
    m_ood, m_id = float(np.mean(as_numpy(h_ood))), float(np.mean(as_numpy(h_id)))
    return (m_ood - m_id) / m_id


def accuracy(logits: Any, labels: Any) -> float:
    """Percentage of samples whose argmax logit is the label."""
    pred = as_numpy(logits).argmax(axis=-1)
    y = as_numpy(labels).ravel()
    if pred.shape != y.shape:
        raise ValueError(f"{pred.shape[0]} predictions but {y.shape[0]} labels")
    return 100.0 * float(np.mean(pred == y))
