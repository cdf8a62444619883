"""`fer-tune transfer`: a toy FER-2013 model moved to a toy 'rafdb' (the same boxes, shifted and brighter)."""

import csv
import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_retrain import QUIET, Counter, make_experiment, prepare_toy_fer

from fer_tune.data.decode import file_sha256
from fer_tune.data.prepared import PreparedDataset
from fer_tune.errors import UserError
from fer_tune.evaluate import transfer
from fer_tune.evaluate.transfer import DEFAULT_JOINT_FRACTION
from fer_tune.train import RunFolderReporter, TrainConfig, TrainData, fit, load_checkpoint
from fer_tune.train.loop import classifier_of
from fer_tune.train.checkpoint import model_from_checkpoint

transfer_mod = importlib.import_module("fer_tune.evaluate.transfer")


def shifted(split):
    """Another 'dataset': boxes 3 px lower, background 40 brighter."""
    x, y = split
    x = np.roll(x, 3, axis=2).astype(np.int16) + 40
    return np.clip(x, 0, 255).astype(np.uint8), y


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A data root with toy fer2013 and rafdb, and an experiment whose final/ holds one fer2013 model
    (fabricated like `retrain` writes it: runs/<name>/best.pt listed in final/metrics.json)."""
    root = tmp_path_factory.mktemp("transfer")
    fer = prepare_toy_fer(root)
    prepare_toy_fer(root, name="rafdb", transform=shifted)
    exp = make_experiment(root / "results", fer)
    run = exp / "final" / "runs" / "rank1-seed0"
    cfg = TrainConfig(model="mlp", model_kwargs={"hidden": [64]}, epochs=2, batch_size=64, lr=3e-3,
                      channels_last=False, aug_strength=0.0, schedule="constant")
    result = fit(cfg, TrainData.from_prepared(fer), RunFolderReporter(run, progress=False, tensorboard=False))
    (exp / "final" / "metrics.json").write_text(json.dumps({
        "dataset": {"name": "fer2013"},
        "models": [{"name": "rank1-seed0", "rank": 1, "checkpoint": "runs/rank1-seed0/best.pt",
                    "val": {"val_acc": result.best["val_acc"]}, "config": cfg.to_dict()}]}))
    return root / "data", exp


def test_transfer_all_strategies(world, monkeypatch):
    data_root, exp = world
    reads = []
    original = PreparedDataset.arrays
    monkeypatch.setattr(PreparedDataset, "arrays", lambda self, split: reads.append((self.name, split))
                        or original(self, split))
    scored = Counter(transfer_mod.score_on_test)
    monkeypatch.setattr(transfer_mod, "score_on_test", scored)
    lines = []
    m = transfer(exp, to="rafdb", strategy="all", epochs=2, lr_factor=1.0, data_root=data_root, progress=False,
                 log=lines.append)

    # Each test split is read once, after fine-tuning; each model scores each split once.
    assert sorted(r for r in reads if r[1] == "test") == [("fer2013", "test"), ("rafdb", "test")]
    assert len(scored.calls) == 5 * 2
    rows = {r["strategy"]: r for r in m["comparison"]}
    assert list(rows) == ["zero-shot", "full", "freeze-lower", "linear-probe", "joint"]
    before = rows["zero-shot"]["source_acc"]
    for r in rows.values():
        assert r["forgetting"] == pytest.approx(before - r["source_acc"])
        t = m["test"][r["strategy"]]["target"]["all"]
        cm = np.array(t["confusion_matrix"])
        assert cm.sum() == 140 and r["target_acc"] == pytest.approx(np.trace(cm) / 140)
    assert rows["zero-shot"]["epochs_run"] == 0 and rows["full"]["epochs_run"] == 2
    # Every strategy's epochs were scored on fer2013 val too; the default keeps the best rafdb val epoch.
    assert m["selection"] == {"select": "target", "metric": "val_acc"}
    for name in m["strategies"]:
        history = list(csv.DictReader(open(exp / "transfer" / name / "metrics.csv")))
        assert len(history) == 2 and all(0 <= float(h["val_source_acc"]) <= 1 for h in history)
        best = max(history, key=lambda h: float(h["val_acc"]))  # the first of equals, as the loop keeps it
        assert rows[name]["best_epoch"] == int(best["epoch"])
        assert rows[name]["source_val_acc"] == pytest.approx(float(best["val_source_acc"]))
    assert m["source_model_sha256"] == file_sha256(Path(m["source_model"]))
    # Fine-tuning on the shifted data beats using the model as it is.
    assert max(rows[s]["target_acc"] for s in ("full", "joint")) > rows["zero-shot"]["target_acc"]

    # The printed comparison table has every strategy.
    table = next(text for text in lines if text.startswith("strategy")).splitlines()
    assert all(name in table[0] for name in ("rafdb acc", "fer2013 acc", "forgot"))
    assert [line.split()[0] for line in table[1:]] == list(rows)
    assert f"{rows['joint']['target_acc']:.4f}" in table[5]

    # Joint: the mixture is half fer2013 (a stratified sample), val stays rafdb's.
    mix = m["strategies"]["joint"]["mixture"]
    assert mix["target_images"] == 480 and abs(mix["source_fraction"] - 0.5) < 0.02
    # Freezing: the frozen parameters kept the source model's values, the others moved.
    out = exp / "transfer"
    source_state = load_checkpoint(exp / "final" / "runs" / "rank1-seed0" / "best.pt")
    source = source_state["model"]
    # Every fine-tuned network keeps the input normalisation its weights were trained with
    assert {tuple(load_checkpoint(out / s / "best.pt")["norm"]) for s in m["strategies"]} == {tuple(source_state["norm"])}
    model, _ = model_from_checkpoint(load_checkpoint(out / "linear-probe" / "best.pt"))
    head = {n for n, p in model.named_parameters() if any(p is q for q in classifier_of(model).parameters())}
    tuned = {n: p for n, p in model.named_parameters()}
    for name, value in tuned.items():
        assert torch.equal(value, source[name]) == (name not in head), name
    lower = load_checkpoint(out / "freeze-lower" / "best.pt")["model"]
    body = [n for n, _ in model.named_parameters() if n not in head]
    frozen = body[: len(body) // 2]
    assert frozen and all(torch.equal(lower[n], source[n]) for n in frozen)
    assert not all(torch.equal(lower[n], source[n]) for n in body[len(body) // 2:])
    full = load_checkpoint(out / "full" / "best.pt")["model"]
    assert not any(torch.equal(full[n], source[n]) for n in body)

    for f in ("metrics.json", "report.md", "transfer_comparison.png", "learning_curves.png", "confusion_matrices.png",
              "per_class_f1.png", "class_distribution.png", "joint/best.pt", "full/metrics.csv"):
        assert (out / f).is_file(), f
    assert json.loads((out / "metrics.json").read_text())["comparison"] == m["comparison"]
    assert "forgot" in (out / "report.md").read_text()
    assert not [p for p in exp.iterdir() if p.name.startswith(".")]

    with pytest.raises(UserError, match="transfer already exists; pass --force"):
        transfer(exp, to="rafdb", data_root=data_root, **QUIET)


def test_image_shapes_must_match(world, tmp_path):
    data_root, exp = world
    prepare_toy_fer(tmp_path, name="rafdb24", size=24)  # the same images at another size: not refused as the same
    (tmp_path / "data" / "fer2013").symlink_to(data_root / "fer2013")
    with pytest.raises(UserError, match=r"rafdb24 images are 1x24x24 but the model .* use 1x48x48; .*--size 48"):
        transfer(exp, to="rafdb24", data_root=tmp_path / "data", force=True, **QUIET)


def test_transfer_needs_a_retrained_model(world, tmp_path):
    data_root, exp = world
    fer = PreparedDataset(data_root / "fer2013")
    bare = make_experiment(tmp_path, fer)
    with pytest.raises(UserError, match=r"no retrained model .* run `fer-tune retrain exp` first"):
        transfer(bare, to="rafdb", data_root=data_root, **QUIET)
    with pytest.raises(UserError, match="--strategy everything: choose one of full, freeze-lower"):
        transfer(bare, to="rafdb", strategy="everything", data_root=data_root, **QUIET)
    with pytest.raises(UserError, match="--epochs and --time-budget exclude each other"):
        transfer(bare, to="rafdb", epochs=5, time_budget=60.0, data_root=data_root, **QUIET)
    for key, message in [("lr", "--set lr: transfer sets lr itself; use --lr-factor"),
                         ("model_kwargs.hidden", "--set model_kwargs.hidden: transfer sets model_kwargs itself; the "
                                                 "network fine-tuned is the source model's"),
                         ("warmup", r"--set: unknown key\(s\) warmup; valid keys")]:
        with pytest.raises(UserError, match=message):
            transfer(bare, to="rafdb", overrides={key: 1}, data_root=data_root, **QUIET)
    with pytest.raises(UserError, match="--joint-fraction 1.0: must lie strictly between 0 and 1"):
        transfer(bare, to="rafdb", strategy="joint", joint_fraction=1.0, data_root=data_root, **QUIET)


def test_transfer_refuses_its_own_source_and_a_stray_joint_fraction(world, tmp_path):
    data_root, exp = world
    with pytest.raises(UserError, match=r"--to fer2013: those are the images the model was trained on \(fer2013\)"):
        transfer(exp, to="fer2013", data_root=data_root, force=True, **QUIET)
    copy = prepare_toy_fer(tmp_path, name="fer_again")  # the same images prepared again, under another name
    (tmp_path / "data" / "fer2013").symlink_to(data_root / "fer2013")
    (tmp_path / "data" / "rafdb").symlink_to(data_root / "rafdb")
    with pytest.raises(UserError, match=r"--to fer_again: those are the images the model was trained on"):
        transfer(exp, to=copy.name, data_root=tmp_path / "data", force=True, **QUIET)
    for fraction in (0.3, DEFAULT_JOINT_FRACTION):  # given, even at its default value
        with pytest.raises(UserError, match="--joint-fraction applies to --strategy joint .or all., not full"):
            transfer(exp, to="rafdb", strategy="full", joint_fraction=fraction, data_root=data_root, force=True,
                     **QUIET)


def test_an_ensembles_best_network_by_val_is_transferred_and_named(world, tmp_path):
    """final/ of `retrain --top-k 2`: the network with the best val score, whichever config's, with a note."""
    import shutil

    data_root, exp = world
    copy = tmp_path / exp.name
    shutil.copytree(exp, copy, ignore=shutil.ignore_patterns("transfer"))
    shutil.copytree(copy / "final" / "runs" / "rank1-seed0", copy / "final" / "runs" / "rank2-seed0")
    meta = json.loads((copy / "final" / "metrics.json").read_text())
    first = meta["models"][0]
    meta["models"].append({**first, "name": "rank2-seed0", "rank": 2, "checkpoint": "runs/rank2-seed0/best.pt",
                           "val": {"val_acc": first["val"]["val_acc"] + 0.01}})
    meta["ensembles"] = [{"name": "top2-seed0", "members": ["rank1-seed0", "rank2-seed0"]}]
    (copy / "final" / "metrics.json").write_text(json.dumps(meta))
    lines = []
    m = transfer(copy, to="rafdb", strategy="linear-probe", epochs=1, data_root=data_root, progress=False,
                 log=lines.append)
    assert Path(m["source_model"]).parent.name == "rank2-seed0"
    assert any(line.startswith("note: final/ scores an ensemble of 2 configs") and line.endswith("rank2-seed0")
               for line in lines), lines


def test_select_mean_keeps_the_epoch_best_on_both_val_splits(world, tmp_path, capsys):
    """`fer-tune transfer --select mean`: each strategy keeps the epoch with the best mean of target and
    source val accuracy."""
    import shutil

    from fer_tune.cli import main
    from fer_tune.evaluate.evaluate import probs_of_checkpoint

    data_root, exp = world
    copy = tmp_path / exp.name
    shutil.copytree(exp, copy, ignore=shutil.ignore_patterns("transfer"))
    with pytest.raises(UserError, match="--select both: choose one of target, mean"):
        transfer(copy, to="rafdb", select="both", data_root=data_root, **QUIET)
    assert main(["transfer", str(copy), "--to", "rafdb", "--strategy", "joint", "--select", "mean", "--epochs", "4",
                 "--lr-factor", "1", "--set", "warmup_epochs=2", "--set", "label_smoothing=0.1",
                 "--data-root", str(data_root), "--quiet"]) == 0
    m = json.loads((copy / "transfer" / "metrics.json").read_text())
    assert m["selection"] == {"select": "mean", "metric": "val_mean_acc"}
    # --set changed those keys of the fine-tuning run, and is on record
    assert m["overrides"] == {"warmup_epochs": 2, "label_smoothing": 0.1}
    tuned_cfg = m["strategies"]["joint"]["config"]
    assert (tuned_cfg["warmup_epochs"], tuned_cfg["label_smoothing"], tuned_cfg["epochs"]) == (2, 0.1, 4)
    rows = {r["strategy"]: r for r in m["comparison"]}
    history = list(csv.DictReader(open(copy / "transfer" / "joint" / "metrics.csv")))
    for h in history:
        assert float(h["val_mean_acc"]) == pytest.approx((float(h["val_acc"]) + float(h["val_source_acc"])) / 2)
    best = max(history, key=lambda h: float(h["val_mean_acc"]))
    assert rows["joint"]["best_epoch"] == int(best["epoch"])
    assert rows["joint"]["target_val_acc"] == pytest.approx(float(best["val_acc"]))
    assert rows["joint"]["source_val_acc"] == pytest.approx(float(best["val_source_acc"]))
    # Zero-shot's val accuracies: the source model on each val split, before any fine-tuning.
    source = load_checkpoint(Path(m["source_model"]))
    for key, name in (("source_val_acc", "fer2013"), ("target_val_acc", "rafdb")):
        vx, vy = PreparedDataset(data_root / name).arrays("val")
        assert rows["zero-shot"][key] == pytest.approx(float((probs_of_checkpoint(source, vx).argmax(1) == vy).mean()))
    table = capsys.readouterr().out
    assert "fer2013 val" in table and f"{rows['joint']['source_val_acc']:.4f}" in table
    report = (copy / "transfer" / "report.md").read_text()
    assert "best epoch by the mean of rafdb val and fer2013 val accuracy" in report

    # A model fine-tuned that way carries val_mean_acc; --select target on it goes back to val_acc.
    from fer_tune.train import TrainConfig
    tuned = TrainConfig.from_dict(load_checkpoint(copy / "transfer" / "joint" / "best.pt")["config"])
    assert tuned.select_metric == "val_mean_acc"
    assert transfer_mod.selection_metric("target", tuned) == "val_acc"
    assert transfer_mod.selection_metric("target", tuned.replace(select_metric="val_loss")) == "val_loss"
