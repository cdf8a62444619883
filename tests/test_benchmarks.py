"""The benchmarks' own arithmetic (the figures they print go into the README)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def efficiency():
    return _load("search_efficiency")


def _fig(epochs, best, reach):
    return {"epochs": epochs, "wall_s": 10.0 * epochs, "best_val_acc": best,
            "epochs_to_reach_random_full_best": reach, "counts": {}}


def _seed(tpe, full, asha):
    return {"tpe_asha": (None, 0, tpe), "random_full": (None, 0, full), "random_asha": (None, 0, asha)}


def test_summary_counts_each_seed_against_its_own_random_search(efficiency, capsys):
    per_seed = {
        0: _seed(_fig(80, 0.45, 70), _fig(200, 0.44, 150), _fig(90, 0.44, 85)),   # 70/200 = 35 %: within the goal
        1: _seed(_fig(86, 0.43, None), _fig(100, 0.44, 90), _fig(45, 0.44, 44)),  # never reached
        2: _seed(_fig(84, 0.46, 50), _fig(100, 0.45, 99), _fig(50, 0.40, None)),  # 50/100 = 50 %: reached, too late
    }
    out = efficiency.summarize(per_seed)
    tpe = out["tpe_asha"]
    assert tpe["epochs"] == 84 and tpe["best_val_acc"] == 0.45
    assert tpe["share_of_random_full_epochs"][:1] == [0.35] and math.isinf(tpe["share_of_random_full_epochs"][1])
    assert (tpe["reached"], tpe["within_goal"]) == (2, 1)
    assert (out["random_asha"]["reached"], out["random_asha"]["within_goal"]) == (2, 0)
    printed = capsys.readouterr().out
    assert "in 1 of 3 seeds" in printed and "50%" in printed


def test_a_median_of_never_is_printed_as_never(efficiency, capsys):
    per_seed = {s: _seed(_fig(80, 0.40, None), _fig(100, 0.44, 90), _fig(50, 0.40, None)) for s in (0, 1)}
    out = efficiency.summarize(per_seed)
    assert out["tpe_asha"]["reached"] == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("(1)"))
    assert line.rstrip().endswith("never")


def test_seeds_must_be_positive(efficiency):
    with pytest.raises(SystemExit):
        efficiency.main(["--seeds", "0"])
