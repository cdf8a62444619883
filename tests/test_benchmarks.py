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
    assert "(1) in 1, (3) in 0 of 3 seeds" in printed and "50%" in printed


def test_the_windowed_search_is_summarized_beside_the_others_and_searches_can_be_chosen(efficiency, capsys):
    per_seed = {0: {**_seed(_fig(80, 0.45, 70), _fig(200, 0.44, 150), _fig(90, 0.44, 85)),
                    "tpe_recent": (None, 0, _fig(60, 0.45, 40))}}
    out = efficiency.summarize(per_seed)
    assert out["tpe_recent"]["share_of_random_full_epochs"] == [0.2] and out["tpe_recent"]["within_goal"] == 1
    printed = capsys.readouterr().out
    assert "(4) TPE + recent-N ASHA" in printed and "(4) in 1 of 1 seeds" in printed
    out = efficiency.summarize({0: {"random_full": (None, 0, _fig(200, 0.44, 150)),
                                    "tpe_recent": (None, 0, _fig(60, 0.45, 90))}})
    assert set(out) == {"random_full", "tpe_recent"}
    with pytest.raises(SystemExit):  # (4) needs its window
        efficiency.main(["--searches", "tpe_recent"])


def test_a_median_of_never_is_printed_as_never(efficiency, capsys):
    per_seed = {s: _seed(_fig(80, 0.40, None), _fig(100, 0.44, 90), _fig(50, 0.40, None)) for s in (0, 1)}
    out = efficiency.summarize(per_seed)
    assert out["tpe_asha"]["reached"] == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("(1)"))
    assert line.rstrip().endswith("never")


def test_seeds_must_be_positive(efficiency):
    with pytest.raises(SystemExit):
        efficiency.main(["--seeds", "0"])


def test_rungs_are_the_asha_milestones_below_max_t(efficiency):
    assert efficiency.rungs(12, 2, 3) == [2, 6]
    assert efficiency.rungs(12, 4, 3) == [4]
    assert efficiency.rungs(30, 1, 2) == [1, 2, 4, 8, 16]


def test_rung_fidelity_ranks_the_finally_best_trial_at_each_rung(efficiency):
    curves = [
        [0.20, 0.30, 0.50, 0.60],  # the final best: last at epoch 1, second at epoch 2
        [0.25, 0.35, 0.40, 0.41],
        [0.30, 0.28, 0.33, 0.34],
        [0.10, 0.20, 0.30, 0.32],
        [0.40, 0.42],              # stopped early: not a full curve, left out
    ]
    first, second = efficiency.rung_fidelity(curves, [1, 2])
    assert (first["epoch"], first["trials"], first["best_rank"]) == (1, 4, 3)
    # ranks (ascending) at epoch 1: 2, 3, 4, 1; final: 4, 3, 2, 1 -> Pearson of ranks 1/5
    assert first["rho"] == pytest.approx(0.2)
    # best so far at epoch 2: 0.30, 0.35, 0.30, 0.20 -> ranks 2.5, 4, 2.5, 1 -> 3 / sqrt(4.5 * 5)
    assert (second["best_rank"], second["rho"]) == (2, pytest.approx(3 / math.sqrt(22.5)))


def test_throughput_models_take_arguments():
    throughput = _load("throughput")
    assert throughput.model_spec("vgg_fer") == ("vgg_fer", {})
    assert throughput.model_spec("vgg_fer_s:width=0.5,fc=512") == ("vgg_fer_s", {"width": 0.5, "fc": 512})
    assert throughput.model_spec("timm/resnet18:drop_rate=0.1") == ("timm/resnet18", {"drop_rate": 0.1})
    assert throughput.model_spec("x:eps=5e-4") == ("x", {"eps": 5e-4})  # a number, as --set reads it
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        throughput.model_spec("vgg_fer_s:0.5")
