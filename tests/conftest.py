import os
from pathlib import Path

import numpy as np
import pytest

# Tests run on small CPUs next to other work: one thread each avoids OpenMP oversubscription.
os.environ.setdefault("OMP_NUM_THREADS", "1")

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def toy_arrays(n: int, seed: int, size: int = 48, num_classes: int = 7):
    """Learnable toy images: each class is a bright box at its own place on noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, n)
    x = rng.integers(0, 60, (n, 1, size, size)).astype(np.uint8)
    cell = size // 4
    for i, c in enumerate(y):
        r, col = divmod(int(c), 4)
        x[i, 0, r * 2 * cell + 2: r * 2 * cell + 2 + cell, col * cell: col * cell + cell - 2] += 150
    return x, y.astype(np.int64)


@pytest.fixture(scope="session")
def toy_data():
    from fer_tune.train import TrainData

    tx, ty = toy_arrays(640, seed=0)
    vx, vy = toy_arrays(200, seed=1)
    return TrainData(tx, ty, vx, vy, ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"))
