"""The `fer-tune` command line: train, data and models commands, and their error lines."""

import json

import pytest

from fer_tune.cli import main
from fer_tune.train import load_checkpoint


def test_train_writes_a_complete_run_folder(toy_prepared, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--model", "simple_cnn", "--epochs", "2", "--data-root", str(toy_prepared),
                 "--out", str(out), "--set", "lr=0.003", "--set", "batch_size=64", "--quiet"])
    assert code == 0
    text = capsys.readouterr().out
    assert "done: 2 epochs (completed)" in text
    assert {p.name for p in out.iterdir()} >= {"config.yaml", "metrics.csv", "best.pt", "last.pt", "summary.json"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_run"] == 2 and summary["dataset"] == "fer2013"
    assert load_checkpoint(out / "best.pt")["config"]["lr"] == 0.003
    assert "lr: 0.003" in (out / "config.yaml").read_text()


def test_train_time_budget_records_the_sized_epochs(toy_prepared, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--model", "simple_cnn", "--time-budget", "4s", "--data-root", str(toy_prepared),
                 "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert f"epochs: {summary['epochs_run']}" in (out / "config.yaml").read_text()


def test_a_diverging_run_is_one_line_and_leaves_nothing(toy_prepared, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--model", "simple_cnn", "--epochs", "2", "--data-root", str(toy_prepared),
                 "--out", str(out), "--set", "optimizer=sgd", "--set", "lr=1e12", "--set", "precision=fp32",
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("fer-tune: error: training loss became nan in epoch 1") and "lower lr" in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("argv,message", [
    (["train", "--set", "lerning_rate=1"], "flags: unknown key(s) lerning_rate; valid keys:"),
    (["train", "--model", "resnet9000"], "resnet9000"),
    (["train", "--dataset", "nope"], "no prepared dataset 'nope'"),
    (["train", "--config", "missing.yaml"], "missing.yaml: config file not found"),
])
def test_user_errors_are_one_line(toy_prepared, tmp_path, capsys, argv, message):
    code = main(argv + ["--data-root", str(toy_prepared), "--out", str(tmp_path / "run"), "--quiet",
                        "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("fer-tune: error: ") and message in err
    assert len(err.strip().splitlines()) == 1


def test_data_info_and_models(toy_prepared, capsys):
    assert main(["data", "info", "fer2013", "--data-root", str(toy_prepared)]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "480" in out
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    for name in ("mlp", "simple_cnn", "mini_resnet", "vgg_fer", "timm/"):
        assert name in listing


def test_set_reads_yaml_values_and_numbers_in_e_notation():
    """YAML 1.1 reads `5e-4` (no dot) as text: --set would record "5e-4" in metrics.json."""
    from fer_tune.cli import parse_assignment

    assert parse_assignment("weight_decay=5e-4") == ("weight_decay", 5e-4)
    assert parse_assignment("lr=-1E3") == ("lr", -1000.0)
    assert parse_assignment("lr=3.0e-4") == ("lr", 3e-4)
    assert parse_assignment("model_kwargs={fc: 1024}") == ("model_kwargs", {"fc": 1024})
    assert parse_assignment("nesterov=false") == ("nesterov", False)
    assert parse_assignment("model=e5") == ("model", "e5")
