"""Class weights for imbalanced data (FER-2013's disgust class is 16x rarer than happy)."""

from __future__ import annotations

import numpy as np


def class_weights(counts, scheme: str, beta: float = 0.999) -> np.ndarray | None:
    """Per-class loss weights from training counts, or None for scheme 'none'.

    Raw weights: inverse 1/n, sqrt_inverse 1/sqrt(n), effective (1 - beta) / (1 - beta^n) (the
    inverse "effective number of samples", Cui et al. 2019). They are scaled so that the average
    weight over training samples is 1, which keeps the loss (and so the learning rate) on the same
    scale as unweighted training. Classes with no samples get weight 0.
    """
    if scheme == "none":
        return None
    n = np.asarray(counts, dtype=np.float64)
    present = n > 0
    raw = np.zeros_like(n)
    if scheme == "inverse":
        raw[present] = 1.0 / n[present]
    elif scheme == "sqrt_inverse":
        raw[present] = 1.0 / np.sqrt(n[present])
    elif scheme == "effective":
        raw[present] = (1.0 - beta) / (1.0 - np.power(beta, n[present]))
    else:
        raise ValueError(f"unknown class-weight scheme {scheme!r}")
    return raw * n.sum() / (raw * n).sum()
