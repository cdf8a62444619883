import atexit
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

# Tests run on small CPUs next to other work: one thread each avoids OpenMP oversubscription.
os.environ.setdefault("OMP_NUM_THREADS", "1")

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def pytest_sessionfinish(session, exitstatus):
    """Leave with pytest's exit status before native finalizers run.

    Once the session has finished and its summary is printed, the interpreter's teardown of the
    native libraries the suite loads (Ray's core worker, gRPC, torch's thread pools) occasionally
    segfaulted in CI: "245 passed", then exit code 139. The results are final by then, so the
    process ends through `os._exit` from the first atexit callback to run, with pytest's status.
    """
    def leave(status: int = int(exitstatus)) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)

    atexit.register(leave)  # registered last, so it runs first


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def write_fer_csv(path: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    """A fer2013.csv (emotion,pixels,Usage) from 48x48 uint8 arrays per usage."""
    lines = ["emotion,pixels,Usage"]
    for usage, (x, y) in splits.items():
        for img, label in zip(x, y):
            lines.append(f"{int(label)},{' '.join(map(str, img.reshape(-1).tolist()))},{usage}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def toy_prepared(tmp_path_factory):
    """A prepared 'fer2013' dataset of toy images (480 train / 140 val / 140 test) and its data root."""
    from fer_tune import data

    tmp = tmp_path_factory.mktemp("toy_prepared")
    csv = write_fer_csv(tmp / "fer2013.csv", {"Training": toy_arrays(480, 10), "PublicTest": toy_arrays(140, 11),
                                              "PrivateTest": toy_arrays(140, 12)})
    root = tmp / "data"
    data.prepare("fer2013", csv, data_root=root, log=lambda *a, **k: None)
    return root


# -- the real archives (../shared/datasets), each prepared once per test session -------------------

@pytest.fixture(scope="session")
def real_data_root(tmp_path_factory):
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"{SHARED_DATASETS} is absent")
    return tmp_path_factory.mktemp("real_data")


@pytest.fixture(scope="session")
def real_fer(real_data_root):
    from fer_tune.data import load, prepare

    prepare("fer2013", SHARED_DATASETS / "fer2013.zip", data_root=real_data_root, log=lambda *a: None)
    return load("fer2013", data_root=real_data_root)


@pytest.fixture(scope="session")
def real_rafdb(real_data_root):
    from fer_tune.data import load, prepare

    prepare("rafdb", SHARED_DATASETS / "rafdb.zip", data_root=real_data_root, log=lambda *a: None)
    return load("rafdb", data_root=real_data_root)
