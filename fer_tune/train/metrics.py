"""Evaluation helpers: confusion matrix, accuracy, macro-F1, per-class precision/recall/F1."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) counts; rows are true classes, columns predictions."""
    t = torch.as_tensor(y_true).long().flatten().cpu()
    p = torch.as_tensor(y_pred).long().flatten().cpu()
    cm = torch.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return cm.reshape(num_classes, num_classes).numpy()


def scores_from_confusion(cm: np.ndarray, classes: Sequence[str] | None = None) -> dict:
    """Accuracy, macro-F1 and per-class precision/recall/F1/support from a confusion matrix.

    A class with no predictions has precision 0; a class absent from the truth has recall 0 and is
    left out of the macro average (so a subset evaluation is not penalised for missing classes).
    """
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    present = support > 0
    total = cm.sum()
    names = list(classes) if classes is not None else [str(i) for i in range(len(cm))]
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "n": int(total),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(support[i])}
            for i, name in enumerate(names)
        },
        "confusion_matrix": cm.astype(int).tolist(),
    }


def classification_scores(y_true, y_pred, classes: Sequence[str]) -> dict:
    """All scores for predicted labels against true ones."""
    return scores_from_confusion(confusion_matrix(y_true, y_pred, len(classes)), classes)
