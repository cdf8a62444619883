"""`fer-tune retrain`: a fabricated search experiment over toy data, retrained end to end."""

import argparse
import importlib
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import toy_arrays, write_fer_csv

from fer_tune.data.prepared import PreparedDataset
from fer_tune.errors import RunFailed, UserError
from fer_tune.evaluate import read_experiment, retrain
from fer_tune.search import results as tables

retrain_mod = importlib.import_module("fer_tune.evaluate.retrain")  # the package exports the function `retrain`
from fer_tune.train import TrainingDiverged, load_checkpoint

QUIET = dict(progress=False, log=lambda *a, **k: None)
COPIES = 20  # test images that are pixel copies of train images

SPACE = {
    "name": "toy", "metric": "val_acc", "mode": "max", "max_epochs": 1, "grace_period": 1, "reduction_factor": 2,
    "trials": 4,
    "params": {
        "model": {"choice": ["mlp", "simple_cnn"]},
        "model_kwargs.hidden": {"choice": [[64], [32]], "when": {"model": ["mlp"]}},
        "model_kwargs.width": {"choice": [0.25], "when": {"model": ["simple_cnn"]}},
        "lr": {"loguniform": [1.0e-3, 3.0e-2]},
        "batch_size": {"choice": [64]},
        "schedule": {"value": "constant"},
        "channels_last": {"value": False},
        "aug_strength": {"value": 0.0},
    },
}


def prepare_toy_fer(root, name="fer2013", transform=None, size=None):
    """A toy fer2013 with COPIES test images that are pixel copies of train images."""
    from fer_tune import data

    train, val, test = toy_arrays(480, 10), toy_arrays(140, 11), toy_arrays(140, 12)
    test = tuple(np.concatenate([t[:-COPIES], tr[:COPIES]]) for t, tr in zip(test, train))
    if transform:
        train, val, test = transform(train), transform(val), transform(test)
    root.mkdir(parents=True, exist_ok=True)
    csv = write_fer_csv(root / f"{name}.csv", {"Training": train, "PublicTest": val, "PrivateTest": test})
    return data.prepare("fer2013", csv, name=name, data_root=root / "data", size=size, log=lambda *a, **k: None)


def make_experiment(results, dataset, name="exp", with_best_json=True):
    """A search experiment folder as `fer-tune search` leaves it: trials.csv, best.json, search.yaml."""
    exp = results / name
    exp.mkdir(parents=True)
    record = {"name": name, "space": SPACE, "flags": {"seed": 0},
              "dataset": {"name": dataset.name, "sha256": dataset.sha256}}
    (exp / "search.yaml").write_text(yaml.safe_dump(record))
    rows = [
        {"trial_id": "t3", "status": "stopped early", "epochs": 1, "model": "mlp", "model_kwargs.hidden": "[32]",
         "model_kwargs.width": None, "lr": 0.004, "batch_size": 64, "schedule": "constant", "best_val_acc": 0.7},
        {"trial_id": "t1", "status": "completed", "epochs": 1, "model": "mlp", "model_kwargs.hidden": "[64]",
         "model_kwargs.width": None, "lr": 0.003, "batch_size": 64, "schedule": "constant", "best_val_acc": 0.9},
        {"trial_id": "t9", "status": "failed", "epochs": 0, "model": "simple_cnn", "model_kwargs.hidden": None,
         "model_kwargs.width": 0.25, "lr": 0.02, "batch_size": 64, "schedule": "constant", "best_val_acc": None},
        {"trial_id": "t2", "status": "completed", "epochs": 1, "model": "simple_cnn", "model_kwargs.hidden": None,
         "model_kwargs.width": 0.25, "lr": 0.005, "batch_size": 64, "schedule": "constant", "best_val_acc": 0.8},
    ]
    pd.DataFrame(rows).to_csv(exp / "trials.csv", index=False)
    if with_best_json:
        config = {"model": "mlp", "model_kwargs": {"hidden": [64]}, "lr": 0.003, "batch_size": 64,
                  "schedule": "constant", "channels_last": False, "aug_strength": 0.0, "epochs": 1, "seed": 0,
                  "select_metric": "val_acc"}
        (exp / "best.json").write_text(json.dumps({"metric": "val_acc", "mode": "max", "value": 0.9,
                                                   "trial": rows[1], "config": config}))
    return exp


@pytest.fixture(scope="module")
def toy_fer(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrain")
    return root / "data", prepare_toy_fer(root)


class Counter:
    """Wraps a function and counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        out = self.fn(*args, **kwargs)
        self.calls.append((args, kwargs, out))
        return out


def test_ranking_reads_configs_from_best_json_and_the_table(toy_fer, tmp_path):
    data_root, ds = toy_fer
    exp = read_experiment("exp", make_experiment(tmp_path, ds).parent)
    assert exp.max_epochs == 1 and exp.dataset == "fer2013" and exp.metric == "val_acc"
    ranked = exp.ranked(3)
    assert [r.trial_id for r in ranked] == ["t1", "t2", "t3"]  # by best_val_acc; the failed trial left out
    assert ranked[0].config.model_kwargs == {"hidden": [64]} and ranked[0].config.lr == 0.003
    # Ranks 2 and 3 come from the table through the space: conditional and fixed values resolved.
    assert ranked[1].config.model == "simple_cnn" and ranked[1].config.model_kwargs == {"width": 0.25}
    assert ranked[2].config.model_kwargs == {"hidden": [32]} and ranked[2].config.lr == 0.004
    assert ranked[2].config.channels_last is False and ranked[2].config.aug_strength == 0.0
    with pytest.raises(UserError, match="has only 3 ranked trial"):
        exp.ranked(4)


def test_table_values_come_back_in_the_space_types(toy_fer, tmp_path):
    """A column several models share is float where a row is empty: vgg_fer_s's `fc: 128` comes
    back as 128.0, and the model refuses a float width. Ranked configs restore the choice's own value."""
    from fer_tune.models import create_model

    data_root, ds = toy_fer
    exp_dir = tmp_path / "typed"
    exp_dir.mkdir()
    params = {k: v for k, v in SPACE["params"].items() if k != "model_kwargs.width"}
    params.update({"model": {"choice": ["mlp", "vgg_fer_s"]},
                   "model_kwargs.fc": {"choice": [64, 128], "when": {"model": ["vgg_fer_s"]}}})
    space = {**SPACE, "params": params}
    (exp_dir / "search.yaml").write_text(yaml.safe_dump({"name": "typed", "space": space, "flags": {"seed": 0},
                                                         "dataset": {"name": ds.name, "sha256": ds.sha256}}))
    rows = [{"trial_id": "a", "status": "completed", "epochs": 1, "model": "mlp", "model_kwargs.hidden": "[64]",
             "model_kwargs.fc": None, "lr": 0.003, "batch_size": 64, "best_val_acc": 0.9},
            {"trial_id": "b", "status": "completed", "epochs": 1, "model": "vgg_fer_s", "model_kwargs.hidden": None,
             "model_kwargs.fc": 128, "lr": 0.004, "batch_size": 64, "best_val_acc": 0.8}]
    pd.DataFrame(rows).to_csv(exp_dir / "trials.csv", index=False)
    assert pd.read_csv(exp_dir / "trials.csv")["model_kwargs.fc"].tolist()[1] == 128.0  # the float the bug saw
    ranked = read_experiment(exp_dir).ranked(2)
    fc = ranked[1].config.model_kwargs["fc"]
    assert fc == 128 and type(fc) is int
    assert ranked[0].config.model_kwargs == {"hidden": [64]}
    create_model(ranked[1].config.model, **ranked[1].config.model_kwargs)  # raised on 128.0 before
    # The tables fer-tune writes keep such a column whole (pandas' Int64, a gap is NA): read back the same
    tables.write_tables(exp_dir, tables.build_table(rows, "val_acc", "max"), metric="val_acc", mode="max")
    assert str(pd.read_parquet(exp_dir / "trials.parquet")["model_kwargs.fc"].dtype) == "Int64"
    again = read_experiment(exp_dir).ranked(2)
    assert [r.config.model_kwargs for r in again] == [r.config.model_kwargs for r in ranked]


def test_ranked_configs_resolve_each_trials_alternative(toy_fer, tmp_path):
    """A key with one distribution (or fixed value) per condition: a table without the fixed
    values' columns gets each trial's own branch back."""
    data_root, ds = toy_fer
    exp_dir = tmp_path / "alt"
    exp_dir.mkdir()
    params = {**SPACE["params"], "aug_strength": [{"value": 0.0, "when": {"model": "mlp"}},
                                                  {"value": 0.3, "when": {"model": "simple_cnn"}}],
              "lr": [{"loguniform": [1.0e-3, 3.0e-3], "when": {"model": "mlp"}},
                     {"loguniform": [1.0e-2, 3.0e-2], "when": {"model": "simple_cnn"}}]}
    (exp_dir / "search.yaml").write_text(yaml.safe_dump({"name": "alt", "space": {**SPACE, "params": params},
                                                         "flags": {"seed": 0},
                                                         "dataset": {"name": ds.name, "sha256": ds.sha256}},
                                                        sort_keys=False))  # as search writes it: conditions after their keys
    rows = [{"trial_id": "a", "status": "completed", "epochs": 1, "model": "mlp", "model_kwargs.hidden": "[64]",
             "model_kwargs.width": None, "lr": 0.002, "batch_size": 64, "best_val_acc": 0.9},
            {"trial_id": "b", "status": "completed", "epochs": 1, "model": "simple_cnn", "model_kwargs.hidden": None,
             "model_kwargs.width": 0.25, "lr": 0.02, "batch_size": 64, "best_val_acc": 0.8}]
    pd.DataFrame(rows).to_csv(exp_dir / "trials.csv", index=False)
    first, second = read_experiment(exp_dir).ranked(2)
    assert (first.config.model, first.config.aug_strength, first.config.lr) == ("mlp", 0.0, 0.002)
    assert (second.config.model, second.config.aug_strength, second.config.lr) == ("simple_cnn", 0.3, 0.02)


def test_report_counts_the_train_images_a_subset_retrain_had():
    from fer_tune.data import stratified_indices

    rng = np.random.default_rng(0)
    labels = rng.choice(7, size=3000, p=[0.14, 0.015, 0.14, 0.25, 0.17, 0.11, 0.175])
    classes = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
    counts = {"train": {c: int((labels == i).sum()) for i, c in enumerate(classes)}, "val": {"angry": 5}}
    assert retrain_mod.trained_counts(counts, 1.0) == counts
    shown = retrain_mod.trained_counts(counts, 0.02)
    assert list(shown) == ["train (subset 0.02)", "val"] and shown["val"] == counts["val"]
    for seed in (0, 1):
        kept = labels[stratified_indices(labels, 0.02, seed)]
        assert shown["train (subset 0.02)"] == {c: int((kept == i).sum()) for i, c in enumerate(classes)}


def test_table_integers_come_back_whole_without_a_space(toy_fer, tmp_path):
    """With no space in search.yaml the table's columns are config keys as they are; a column some rows
    leave empty is float (fc 128.0), and integers must come back whole for the models."""
    from fer_tune.models import create_model

    data_root, ds = toy_fer
    exp_dir = tmp_path / "nospace"
    exp_dir.mkdir()
    (exp_dir / "search.yaml").write_text(yaml.safe_dump({"name": "nospace", "flags": {"seed": 0},
                                                         "dataset": {"name": ds.name, "sha256": ds.sha256}}))
    rows = [{"trial_id": "a", "status": "completed", "epochs": 1, "model": "mlp", "model_kwargs.fc": None,
             "model_kwargs.width": 0.5, "lr": 0.003, "batch_size": 64, "best_val_acc": 0.7},
            {"trial_id": "b", "status": "completed", "epochs": 1, "model": "vgg_fer_s", "model_kwargs.fc": 128,
             "model_kwargs.width": 0.5, "lr": 0.004, "batch_size": 64, "best_val_acc": 0.8}]
    pd.DataFrame(rows).to_csv(exp_dir / "trials.csv", index=False)
    cfg = read_experiment(exp_dir).ranked(1)[0].config
    assert cfg.model_kwargs == {"fc": 128, "width": 0.5} and type(cfg.model_kwargs["fc"]) is int
    assert cfg.lr == 0.004 and type(cfg.batch_size) is int
    create_model(cfg.model, **cfg.model_kwargs)  # raised "fc must be a positive integer, got 128.0" before


@pytest.fixture(scope="module")
def seeded(toy_fer, tmp_path_factory):
    """One retrain with 2 seeds, counting test-split reads and test scoring."""
    data_root, ds = toy_fer
    results = tmp_path_factory.mktemp("seeded")
    exp = make_experiment(results, ds)
    reads = []
    original = PreparedDataset.arrays

    def arrays(self, split):
        reads.append((self.name, split))
        return original(self, split)

    scored = Counter(retrain_mod.score_on_test)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PreparedDataset, "arrays", arrays)
        mp.setattr(retrain_mod, "score_on_test", scored)
        m = retrain("exp", storage=results, data_root=data_root, seeds=2, **QUIET)
    return exp, m, reads, scored


def test_retrain_touches_the_test_split_once_per_model(seeded):
    exp, m, test_reads, scored = seeded
    # The test split is read once, after training, and each final model predicts it once.
    assert [r for r in test_reads if r[1] == "test"] == [("fer2013", "test")]
    assert test_reads[-1] == ("fer2013", "test")
    assert len(scored.calls) == 2 and all(len(c[0][1]) == 140 for c in scored.calls)
    assert m["protocol"]["test_evaluations_per_model"] == 1


def test_retrain_seeds_writes_final(seeded):
    exp, m, _, _ = seeded
    final = exp / "final"
    names = {p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file()}
    for f in ("metrics.json", "report.md", "learning_curves.png", "confusion_matrix.png", "per_class_f1.png",
              "class_distribution.png", "runs/rank1-seed0/best.pt",
              "runs/rank1-seed1/best.pt", "runs/rank1-seed0/metrics.csv", "runs/rank1-seed0/config.yaml"):
        assert f in names
    assert any(n.startswith("runs/rank1-seed1/events.out.tfevents") for n in names)
    assert not any(n.endswith("last.pt") for n in names)
    assert not [p for p in exp.iterdir() if p.name.startswith(".")]  # no temp folder left

    # Default epochs: 2 x the space's max_epochs (1); seeds 0 and 1 of the best (t1) config.
    assert "2 = 2 x the search's max_epochs 1" in m["protocol"]["epochs"]
    assert [(x["name"], x["epochs_run"], x["seed"]) for x in m["models"]] == [("rank1-seed0", 2, 0),
                                                                             ("rank1-seed1", 2, 1)]
    state = load_checkpoint(final / "runs/rank1-seed1/best.pt")
    assert state["config"]["model_kwargs"] == {"hidden": [64]} and state["config"]["seed"] == 1
    assert state["epoch"] == m["models"][1]["best_epoch"]  # the checkpoint is the best val epoch


def test_retrain_metrics_agree_with_the_confusion_matrices(seeded):
    exp, m, _, _ = seeded
    final = exp / "final"
    # Metrics agree with their confusion matrices; no_train_copy leaves the copies out.
    assert json.loads((final / "metrics.json").read_text())["models"][0]["test"] == m["models"][0]["test"]
    assert m["dataset"]["test_with_train_copy"] == COPIES
    for model in m["models"]:
        for subset, n in (("all", 140), ("no_train_copy", 140 - COPIES)):
            s = model["test"][subset]
            cm = np.array(s["confusion_matrix"])
            assert cm.sum() == s["n"] == n
            assert s["accuracy"] == pytest.approx(np.trace(cm) / n)
            assert [c["support"] for c in s["per_class"].values()] == cm.sum(1).tolist()
            f1 = [c["f1"] for c, k in zip(s["per_class"].values(), cm.sum(1)) if k > 0]
            assert s["macro_f1"] == pytest.approx(np.mean(f1))
    # Seeds: mean and sample std of the per-model accuracies, and the pooled confusion matrix.
    accs = [x["test"]["all"]["accuracy"] for x in m["models"]]
    summary = m["final"]["test"]["all"]
    assert summary["accuracy"]["values"] == accs
    assert summary["accuracy"]["mean"] == pytest.approx(np.mean(accs))
    assert summary["accuracy"]["std"] == pytest.approx(np.std(accs, ddof=1))
    assert np.array_equal(summary["pooled_confusion_matrix"],
                          np.sum([x["test"]["all"]["confusion_matrix"] for x in m["models"]], axis=0))
    assert summary["accuracy"]["mean"] > 0.4  # learnt something (chance ~0.14)
    assert summary["images"] == 140 and m["final"]["test"]["no_train_copy"]["images"] == 140 - COPIES

    report = (final / "report.md").read_text()
    for png in ("learning_curves.png", "confusion_matrix.png", "per_class_f1.png", "class_distribution.png"):
        assert f"({png})" in report
    assert f"{summary['accuracy']['mean']:.4f} ± {summary['accuracy']['std']:.4f} (n=2)" in report
    assert "with seeds 0, 1;" in report
    # The largest confusions count the pooled matrix's predictions, and say so (2 per test image). The toy
    # models confuse nothing; a matrix that does:
    import copy
    import re

    m = copy.deepcopy(m)
    pooled = np.diag([40] * 7)
    pooled[1, 6], pooled[0, 3] = 30, 10
    m["final"]["test"]["all"]["pooled_confusion_matrix"] = pooled.tolist()
    report = retrain_mod.final_markdown(m, {"cm": "cm.png", "f1": "f1.png", "curves": "c.png"})
    assert re.findall(r"- \*\*(\w+)\*\* predicted as \*\*(\w+)\*\*: ([\d.]+) % \((.*)\)", report) == [
        (m["dataset"]["classes"][1], m["dataset"]["classes"][6], "42.9", "30 of 70 predictions: 2 models x 35 images"),
        (m["dataset"]["classes"][0], m["dataset"]["classes"][3], "20.0", "10 of 50 predictions: 2 models x 25 images")]
    m["final"]["kind"] = "ensemble of the top 2 configs (softmax average)"  # --top-k 2 --seeds 2: one row per ensemble
    assert "(30 of 70 predictions: 2 ensembles x 35 images)" in retrain_mod.final_markdown(m, {"cm": "", "f1": "", "curves": ""})


def test_top_k_ensemble_averages_the_softmax_of_the_k_best(toy_fer, tmp_path, monkeypatch):
    data_root, ds = toy_fer
    make_experiment(tmp_path, ds, with_best_json=False)  # every config from the table
    scored = Counter(retrain_mod.score_on_test)
    monkeypatch.setattr(retrain_mod, "score_on_test", scored)
    m = retrain("exp", storage=tmp_path, data_root=data_root, top_k=2, epochs=1, tta=True, **QUIET)
    assert [x["name"] for x in m["models"]] == ["rank1-seed0", "rank2-seed0"]
    assert [c["trial_id"] for c in m["configs"]] == ["t1", "t2"]
    assert m["models"][1]["config"]["model"] == "simple_cnn" and m["models"][1]["epochs_run"] == 1
    # --tta: each model meets the test split once, scored with the flip and, in the same pass, without it.
    assert [c[1]["tta"] for c in scored.calls] == ["flip", "flip"]
    plain = [c[2][0] for c in scored.calls]
    flip = [c[2][1] for c in scored.calls]
    assert not any(np.array_equal(p, f) for p, f in zip(plain, flip))
    # The ensemble is scored from the same probabilities: their mean, argmax, against the test labels.
    test_y = ds.arrays("test")[1]
    (ens,) = m["ensembles"]
    assert ens["members"] == ["rank1-seed0", "rank2-seed0"]
    assert ens["test"]["all"]["accuracy"] == pytest.approx(np.mean(np.mean(flip, 0).argmax(1) == test_y))
    assert m["final"]["models"] == [ens["name"]]
    assert m["final"]["test"]["all"]["accuracy"]["mean"] == ens["test"]["all"]["accuracy"]
    assert m["final"]["test_without_tta"]["all"]["accuracy"]["mean"] == pytest.approx(
        np.mean(np.mean(plain, 0).argmax(1) == test_y))
    assert m["models"][0]["test_without_tta"]["all"]["accuracy"] == pytest.approx(np.mean(plain[0].argmax(1) == test_y))
    assert m["protocol"]["tta"] == "horizontal flip"
    assert "accuracy (no TTA)" in (tmp_path / "exp" / "final" / "report.md").read_text()


def test_errors_leave_nothing_half_written(toy_fer, tmp_path, monkeypatch):
    data_root, ds = toy_fer
    exp = make_experiment(tmp_path, ds)
    with pytest.raises(UserError, match="--rank, --top-k and --screen exclude each other"):
        retrain("exp", storage=tmp_path, data_root=data_root, rank=1, top_k=2, **QUIET)
    with pytest.raises(UserError, match="no search experiment 'nope'"):
        retrain("nope", storage=tmp_path, data_root=data_root, **QUIET)

    calls = []

    def crash(cfg, data, reporter, **kw):
        calls.append(cfg)
        if len(calls) == 2:
            raise RuntimeError("power cut")
        return real_fit(cfg, data, reporter, **kw)

    real_fit = retrain_mod.fit
    monkeypatch.setattr(retrain_mod, "fit", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        retrain("exp", storage=tmp_path, data_root=data_root, seeds=2, epochs=1, **QUIET)
    assert sorted(p.name for p in exp.iterdir()) == ["best.json", "search.yaml", "trials.csv"]
    assert len(calls) == 2

    def diverge(cfg, data, reporter, **kw):
        raise TrainingDiverged("training loss became nan in epoch 1 (lr 10)")

    monkeypatch.setattr(retrain_mod, "fit", diverge)
    with pytest.raises(RunFailed, match=r"retrain run \S+ failed: training loss became nan .*final was not written"):
        retrain("exp", storage=tmp_path, data_root=data_root, epochs=1, **QUIET)
    assert sorted(p.name for p in exp.iterdir()) == ["best.json", "search.yaml", "trials.csv"]


def test_an_existing_final_needs_force(seeded, toy_fer):
    exp, _, _, _ = seeded
    before = (exp / "final" / "metrics.json").read_text()
    with pytest.raises(UserError, match="final already exists; pass --force"):
        retrain(exp, data_root=toy_fer[0], epochs=1, **QUIET)
    assert (exp / "final" / "metrics.json").read_text() == before


def test_dataset_must_be_the_one_searched(toy_fer, tmp_path):
    data_root, ds = toy_fer
    exp = make_experiment(tmp_path, ds)
    record = yaml.safe_load((exp / "search.yaml").read_text())
    record["dataset"]["sha256"] = "0" * 64
    (exp / "search.yaml").write_text(yaml.safe_dump(record))
    with pytest.raises(UserError, match="prepared from a different source .* pass --dataset fer2013"):
        retrain("exp", storage=tmp_path, data_root=data_root, epochs=1, **QUIET)
    record["dataset"] = {"name": "in-memory", "sha256": None}
    (exp / "search.yaml").write_text(yaml.safe_dump(record))
    with pytest.raises(UserError, match=r"in-memory data\); pass --dataset NAME"):
        retrain("exp", storage=tmp_path, data_root=data_root, epochs=1, **QUIET)


def cli(argv):
    """The retrain/transfer/evaluate/predict subcommands on a bare parser: (exit code, the UserError's
    message), where fer_tune.cli.main would print the message."""
    from fer_tune.evaluate.cli import add_commands

    parser = argparse.ArgumentParser(prog="fer-tune")
    sub = parser.add_subparsers(dest="command", required=True)
    add_commands(sub, lambda p: p.add_argument("--data-root"))
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except UserError as exc:
        return 2, str(exc)
    return 0, ""


def test_cli_retrain_rank(toy_fer, tmp_path, capsys):
    data_root, ds = toy_fer
    exp = make_experiment(tmp_path, ds)
    code, err = cli(["retrain", "exp", "--storage", str(tmp_path), "--data-root", str(data_root),
                     "--time-budget", "2s", "--rank", "3", "--quiet"])
    assert code == 0, err
    out = capsys.readouterr().out
    assert "full test" in out and "no copy in train" in out and str(exp / "final") in out
    m = json.loads((exp / "final" / "metrics.json").read_text())
    assert [(x["name"], x["trial_id"]) for x in m["models"]] == [("rank3-seed0", "t3")]
    (model,) = m["models"]
    assert model["config"]["model_kwargs"] == {"hidden": [32]}
    # The loop sized the epochs to the budget; the config records what was run.
    assert m["protocol"]["epochs"] == "as many as fit in 2 s per run (--time-budget)"
    assert 1 <= model["epochs_run"] == model["config"]["epochs"] < 1000 and model["config"]["time_budget"] == 2.0
    code, err = cli(["retrain", "exp", "--storage", str(tmp_path), "--data-root", str(data_root), "--seeds", "0"])
    assert code == 2 and err == "--seeds 0: must be >= 1"
    code, err = cli(["retrain", "exp", "--storage", str(tmp_path), "--data-root", str(data_root), "--epochs", "10",
                     "--time-budget", "1h"])
    assert code == 2 and err.startswith("--epochs and --time-budget exclude each other")
    with pytest.raises(SystemExit):  # argparse: --rank and --top-k are exclusive
        cli(["retrain", "exp", "--rank", "1", "--top-k", "2"])


def one_epoch_retrain_cli(toy_fer, tmp_path) -> tuple:
    """A toy experiment under tmp_path and the `fer-tune retrain` arguments of a 1-epoch retrain of it."""
    data_root, ds = toy_fer
    exp = make_experiment(tmp_path, ds)
    return exp, ["retrain", "exp", "--storage", str(tmp_path), "--data-root", str(data_root), "--quiet",
                 "--epochs", "1"]


def test_kill_stops_a_retrain_like_ctrl_c_and_leaves_nothing(toy_fer, tmp_path):
    """SIGTERM (`kill`, `timeout`, a job scheduler) mid-training: exit 130, no final/, no temp folder."""
    exp, args = one_epoch_retrain_cli(toy_fer, tmp_path)
    args = args[:-2] + ["--time-budget", "10m"]  # in place of `--epochs 1`: still training when the signal comes
    proc = subprocess.Popen([sys.executable, "-m", "fer_tune.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(exp.glob(".tmp-final-*/runs/*/metrics.csv")):  # training has begun its epochs
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().endswith("fer-tune: interrupted"), err
    assert sorted(p.name for p in exp.iterdir()) == ["best.json", "search.yaml", "trials.csv"]


def test_cli_retrain_set_changes_the_retrained_config_and_is_recorded(toy_fer, tmp_path):
    exp, base = one_epoch_retrain_cli(toy_fer, tmp_path)
    code, err = cli(base + ["--set", "ema=0.99", "--set", "label_smoothing=0"])
    assert code == 0, err
    m = json.loads((exp / "final" / "metrics.json").read_text())
    assert m["protocol"]["overrides"] == {"ema": 0.99, "label_smoothing": 0}
    (model,) = m["models"]
    assert model["config"]["ema"] == 0.99 and model["config"]["label_smoothing"] == 0.0
    assert m["configs"][0]["config"]["ema"] == 0.0  # the searched config itself is reported unchanged
    state = load_checkpoint(exp / "final" / model["checkpoint"])
    assert state["config"]["ema"] == 0.99
    for argv, message in [(["--set", "epochs=3"], "--set epochs: retrain sets epochs itself; use --epochs"),
                          (["--set", "lerning_rate=1"], "--set: unknown key(s) lerning_rate"),
                          (["--set", "ema=2"], "ema must be in [0.0, ")]:
        code, err = cli(base + ["--force"] + argv)
        assert code == 2 and message in err, err


def test_cli_retrain_first_seed_runs_later_seeds_alone(toy_fer, tmp_path):
    exp, base = one_epoch_retrain_cli(toy_fer, tmp_path)
    code, err = cli(base + ["--first-seed", "3", "--seeds", "2"])
    assert code == 0, err
    m = json.loads((exp / "final" / "metrics.json").read_text())
    assert [(x["name"], x["seed"], x["config"]["seed"]) for x in m["models"]] == [("rank1-seed3", 3, 3),
                                                                                ("rank1-seed4", 4, 4)]
    assert m["protocol"]["first_seed"] == 3
    assert load_checkpoint(exp / "final" / "runs" / "rank1-seed4" / "best.pt")["config"]["seed"] == 4
    for argv, message in [(["--first-seed", "-1"], "--first-seed -1: must be >= 0"),
                          (["--set", "seed=3"], "--set seed: retrain sets seed itself; use --seeds or --first-seed")]:
        code, err = cli(base + ["--force"] + argv)
        assert code == 2 and err == message, err


def test_replacing_final_says_the_transfer_is_stale(toy_fer, tmp_path):
    data_root, ds = toy_fer
    exp = make_experiment(tmp_path, ds)
    retrain("exp", storage=tmp_path, data_root=data_root, epochs=1, **QUIET)
    from fer_tune.data.decode import file_sha256

    note = f"note: {exp / 'transfer'} was made from the model this retrain replaced"
    (exp / "transfer").mkdir()
    for source, stale in [(exp / "final" / "runs" / "rank1-seed0" / "best.pt", True),
                          (tmp_path / "elsewhere.pt", False)]:  # a transfer from a model this retrain leaves alone
        if not stale:
            source.write_bytes(b"another model")
        (exp / "transfer" / "metrics.json").write_text(json.dumps({"source_model": str(source),
                                                                   "source_model_sha256": file_sha256(source)}))
        lines = []
        retrain("exp", storage=tmp_path, data_root=data_root, epochs=1, force=True, progress=False,
                log=lines.append)
        assert any(line.startswith(note) for line in lines) == stale, lines


def test_screen_retrains_the_config_that_did_best_in_its_short_run(toy_fer, tmp_path):
    data_root, ds = toy_fer
    exp = make_experiment(tmp_path, ds)
    best = json.loads((exp / "best.json").read_text())
    best["config"]["lr"] = 1e-9  # the search's rank 1 cannot learn in the screen: another config must win
    (exp / "best.json").write_text(json.dumps(best))
    reads, lines = [], []
    original = PreparedDataset.arrays

    def arrays(self, split):
        reads.append(split)
        return original(self, split)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PreparedDataset, "arrays", arrays)
        m = retrain("exp", storage=tmp_path, data_root=data_root, screen=3, screen_budget=1.0, epochs=1,
                    progress=False, log=lines.append)
    screen = m["screen"]
    assert [x["trial_id"] for x in screen["runs"]] == ["t1", "t2", "t3"] and screen["budget_s"] == 1.0
    val = {x["rank"]: x["val"]["val_acc"] for x in screen["runs"]}
    assert screen["chosen_rank"] == max(val, key=val.get) != 1
    assert all(x["epochs_run"] >= 1 for x in screen["runs"])
    # Only the chosen config is retrained, under its own rank; the test split is read once, at the end.
    (model,) = m["models"]
    assert model["rank"] == screen["chosen_rank"] and [c["rank"] for c in m["configs"]] == [screen["chosen_rank"]]
    assert reads.count("test") == 1 and reads[-1] == "test"
    assert f"retraining rank {screen['chosen_rank']}" in "\n".join(lines)
    final = exp / "final"
    assert sorted(p.name for p in (final / "screen").iterdir()) == ["rank1-seed0", "rank2-seed0", "rank3-seed0"]
    assert not list((final / "screen").rglob("*.pt"))  # screen runs are not final models
    assert (final / "screen" / "rank2-seed0" / "metrics.csv").exists()
    report = (final / "report.md").read_text()
    assert "## Screening" in report and f"rank {screen['chosen_rank']}, best by val_acc, retrained" in \
        m["protocol"]["screen"]
    assert f"Rank {screen['chosen_rank']} (trial `{model['trial_id']}`), as retrained:" in report


def test_screen_flags(toy_fer, tmp_path):
    exp, base = one_epoch_retrain_cli(toy_fer, tmp_path)
    for argv, message in [(["--screen", "1"], "--screen 1: must be >= 2"),
                          (["--screen-budget", "5m"], "--screen-budget 300.0: needs --screen K"),
                          (["--screen", "9"], "--rank/--top-k/--screen 9: "), ]:
        code, err = cli(base + argv)
        assert code == 2 and message in err, err
    with pytest.raises(SystemExit):  # argparse: --screen excludes --rank and --top-k
        cli(base + ["--screen", "2", "--rank", "1"])
    assert not (exp / "final").exists()


def test_crops_tta_is_recorded_and_reported_beside_the_plain_score(toy_fer, tmp_path):
    data_root, ds = toy_fer
    make_experiment(tmp_path, ds)
    m = retrain("exp", storage=tmp_path, data_root=data_root, epochs=1, tta="crops", **QUIET)
    assert m["protocol"]["tta"].startswith("horizontal flip x (the image") and m["protocol"]["tta"].endswith("14 views")
    assert m["final"]["test_without_tta"]["all"]["accuracy"]["mean"] is not None
    report = (tmp_path / "exp" / "final" / "report.md").read_text()
    assert "accuracy (crops TTA)" in report and "accuracy (no TTA)" in report
