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


def test_train_refuses_an_existing_out_folder(toy_prepared, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "best.pt").write_text("an earlier run's")
    code = main(["train", "--epochs", "1", "--data-root", str(toy_prepared), "--out", str(out), "--quiet"])
    assert code == 2 and "already exists" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["best.pt"] and (out / "best.pt").read_text() == "an earlier run's"
    # An empty folder of the user's is used, and only emptied again when the run fails
    empty = tmp_path / "mine"
    empty.mkdir()
    code = main(["train", "--epochs", "1", "--data-root", str(toy_prepared), "--out", str(empty), "--quiet",
                 "--set", "model_kwargs.nosuch=3"])
    assert code == 2 and empty.is_dir() and not list(empty.iterdir())


@pytest.mark.parametrize("stop_after", [0, 1])
def test_ctrl_c_keeps_a_run_with_a_best_epoch_and_nothing_else(toy_prepared, tmp_path, capsys, monkeypatch, stop_after):
    """Ctrl-C during epoch 1 leaves no folder; after a finished epoch the run is kept, and said so."""
    from fer_tune.train.report import RunFolderReporter

    report = RunFolderReporter.report

    def report_then_stop(self, metrics, make_checkpoint, is_best):
        if metrics["epoch"] > stop_after:
            raise KeyboardInterrupt
        report(self, metrics, make_checkpoint, is_best)

    monkeypatch.setattr(RunFolderReporter, "report", report_then_stop)
    out = tmp_path / "run"
    code = main(["train", "--model", "simple_cnn", "--epochs", "3", "--data-root", str(toy_prepared),
                 "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 130
    if stop_after == 0:
        assert not out.exists()
    else:
        assert (out / "best.pt").is_file() and f"kept {out}" in err


@pytest.mark.parametrize("argv,message", [
    (["train", "--set", "lerning_rate=1"], "--set: unknown key(s) lerning_rate; valid keys:"),
    (["train", "--model", "resnet9000"], "resnet9000"),
    (["train", "--set", "model_kwargs.nosuch=3"], "nosuch"),
    (["train", "--dataset", "nope"], "no prepared dataset 'nope'"),
    (["train", "--config", "missing.yaml"], "missing.yaml: config file not found"),
    (["train", "--set", "lr={loguniform: [1.0e-3, 1.0e-2]}"], "lr must be a number, got {'loguniform'"),
    (["train", "--set", "lr=.nan"], "lr must be a finite number, got nan"),
    (["train", "--set", "early_stop_patience=-1"], "early_stop_patience must be >= 0"),
    (["train", "--device", "tpu"], "--device tpu: not a device fer-tune trains on"),
    (["train", "--device", "cuda:7"], "--device cuda:7: "),
    (["train", "--device", "meta"], "--device meta: not a device fer-tune trains on"),
    (["train", "--set", "eval_batch_size=.inf"], "eval_batch_size must be a finite int, got inf"),
])
def test_user_errors_are_one_line(toy_prepared, tmp_path, capsys, argv, message):
    code = main(argv + ["--data-root", str(toy_prepared), "--out", str(tmp_path / "run"), "--quiet",
                        "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("fer-tune: error: ") and message in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # no half-made run folder


@pytest.mark.parametrize("argv,start,message", [
    (["search", "--trials", "x"], "fer-tune search: error: ", "argument -n/--trials: invalid int value: 'x'"),
    (["search", "--space", "cpu", "--bogus", "3"], "fer-tune search: error: ", "unrecognized arguments: --bogus 3"),
    (["data", "prepare", "fer2013", "x.zip", "--bad"], "fer-tune data prepare: error: ", "unrecognized arguments: --bad"),
    (["retrain", "exp", "--rank", "1", "--top-k", "2"], "fer-tune retrain: error: ", "not allowed with argument --rank"),
    (["train", "--time-budget", "5q"], "fer-tune train: error: ", "not a duration: '5q'"),
    (["train", "--epochs", "5", "--time-budget", "1m"], "fer-tune train: error: ", "not allowed with argument --epochs"),
    (["search", "--space", "smoke", "--seed", "-1"], "fer-tune search: error: ", "invalid seed: -1 (a whole number from 0 to 4294967295)"),
    (["trainn"], "fer-tune: error: ", "invalid choice: 'trainn'"),
])
def test_bad_flags_are_one_line_naming_the_command(capsys, argv, start, message):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(start) and message in err
    assert err.rstrip().endswith(f"(`{start.split(':')[0]} --help` lists the flags)")
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


def test_a_built_wheel_carries_every_package_and_the_search_spaces(tmp_path):
    """`pip install .` (not only -e) must give a working `--space cnn`: the wheel holds every
    fer_tune package (pyproject lists them) and search_spaces/*.yaml as fer_tune/search_spaces/."""
    import shutil
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    pytest.importorskip("setuptools", minversion="77")
    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    for name in ("fer_tune", "search_spaces"):
        shutil.copytree(root / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    str(src), "-w", str(tmp_path / "dist")], check=True, capture_output=True, cwd=src)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    packages = {str(p.parent.relative_to(root)) for p in (root / "fer_tune").rglob("*.py")
                if "__pycache__" not in p.parts}
    assert packages <= {n.rsplit("/", 1)[0] for n in names if n.endswith(".py")}
    spaces = sorted(p.name for p in (root / "search_spaces").glob("*.yaml"))
    assert spaces and sorted(n.rsplit("/", 1)[1] for n in names
                             if n.startswith("fer_tune/search_spaces/") and n.endswith(".yaml")) == spaces

    # Installed from the wheel, away from the repository, the spaces are found by name.
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True)
    out = subprocess.run([sys.executable, "-c", "from fer_tune.search.space import list_spaces, load_space; "
                          "load_space('cnn'); print(' '.join(list_spaces()))"],
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, cwd=tmp_path,
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == [s[:-5] for s in spaces]


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"fer-tune {version('fer-tune')}"
