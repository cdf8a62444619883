"""Split names and ids, and the stratified seeded slice of train that makes a val (or test) split."""

import numpy as np

SPLITS = ("train", "val", "test")
TRAIN, VAL, TEST = range(3)


def stratified_indices(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random `fraction` of each class (at least one per present class)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    picked = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        picked.append(rng.choice(members, size=stratified_count(len(members), fraction), replace=False))
    return np.sort(np.concatenate(picked)) if picked else np.empty(0, dtype=np.int64)


def stratified_count(members: int, fraction: float) -> int:
    """How many of a class's `members` `stratified_indices` keeps (whatever the seed)."""
    return min(members, max(1, round(fraction * members))) if members else 0


def slice_train(split: np.ndarray, labels: np.ndarray, fraction: float, seed: int, to: int = VAL) -> np.ndarray:
    """A copy of `split` where a stratified `fraction` of the train images is moved to split `to`."""
    train = np.flatnonzero(split == TRAIN)
    out = split.copy()
    out[train[stratified_indices(labels[train], fraction, seed)]] = to
    return out
