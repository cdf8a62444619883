"""Searches on a real (local, 2-CPU) Ray instance, shared by the tests of this module.

Tiny models on toy images, 1-3 epochs: what is tested is the wiring (Tune + Optuna + ASHA, Ray
Train trials, failures, Ctrl-C, resume after SIGKILL, no leaked placement groups), not accuracy.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import toy_arrays
from fer_tune.errors import UserError
from fer_tune.search import cluster, snapshot
from fer_tune.search.space import parse_space
from fer_tune.search.tuner import journal_storage, run_search
from fer_tune.train import TrainData

pytestmark = pytest.mark.slow

CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
TINY = {"model": "simple_cnn", "model_kwargs.width": 0.25, "model_kwargs.hidden": 32, "batch_size": 32,
        "channels_last": False, "aug_strength": 0.0, "schedule": "constant", "label_smoothing": 0.0}


@pytest.fixture(scope="module")
def ray_instance():
    started = cluster.connect(None, num_cpus=2)  # local, dashboard on: as `fer-tune search` starts it
    import ray

    yield ray.get_runtime_context().gcs_address
    cluster.shutdown(started)


@pytest.fixture(scope="module")
def tiny_data():
    tx, ty = toy_arrays(256, seed=0, size=16)
    vx, vy = toy_arrays(96, seed=1, size=16)
    return TrainData(tx, ty, vx, vy, CLASSES)


def test_train_executor_asha_search_frees_every_placement_group(ray_instance, tiny_data, tmp_path):
    """8 trials, each a Ray Train run, 2 at a time on 2 CPUs, ASHA stopping some (its bar over the
    last 4 results at a rung): the search finishes (no worker group waits for leaked CPUs) and
    leaves no placement group or cleaner. The learning rate has one range per optimizer."""
    lr_ranges = {"adamw": [1e-4, 3e-3], "sgd": [3e-3, 3e-2]}
    space = parse_space({"max_epochs": 3, "grace_period": 1, "reduction_factor": 2, "promotion_window": 4, **TINY,
                         "optimizer": {"choice": ["adamw", "sgd"]},
                         "lr": [{"loguniform": r, "when": {"optimizer": o}} for o, r in lr_ranges.items()],
                         "momentum": {"uniform": [0.8, 0.95], "when": {"optimizer": "sgd"}}}, name="tiny")
    summary = run_search(space, tiny_data, trials=8, concurrency=2, storage=tmp_path, name="asha", seed=1,
                         executor="train", progress=False)
    table = summary.table
    assert len(table) == 8 and set(table["status"]) <= {"completed", "stopped early"}
    assert (table["status"] == "stopped early").any() and (table["status"] == "completed").any()
    assert summary.epochs_spent < 8 * 3 == summary.epochs_without_early_stopping
    assert (table.loc[table.status == "completed", "epochs"] == 3).all()
    assert table["best_val_acc"].notna().all() and table["node_id"].str.len().gt(0).all()
    assert table["node_ip"].str.count(r"\.").eq(3).all()  # the worker's IPv4 address, as `ray status` shows it
    assert table["startup_s"].gt(0).all()
    assert not any(cluster.wait_for_no_leftovers(timeout_s=20).values())
    # Each trial's `lr` from its optimizer's range; Optuna's per-range names stay out of the table
    assert all(lr_ranges[o][0] <= lr <= lr_ranges[o][1] for o, lr in zip(table["optimizer"], table["lr"]))
    assert not [c for c in table.columns if "[" in c]

    exp = tmp_path / "asha"
    saved = pd.read_parquet(exp / "trials.parquet")
    assert list(saved["trial_id"]) == list(table["trial_id"])
    record = yaml.safe_load((exp / "search.yaml").read_text())
    assert record["status"] == "finished" and record["space"]["params"]["optimizer"]["choice"] == ["adamw", "sgd"]
    assert "driver" not in record  # only while it runs
    assert record["space"]["promotion_window"] == 4
    assert record["versions"]["ray"] and record["dataset"]["train_images"] == 256
    assert sorted(p.name for p in (exp / "train_runs").iterdir()) == sorted(table["trial_id"])
    assert not [p for p in (exp / "train_runs").glob("*/checkpoint_*") if p.is_dir()]  # deleted when finished

    import optuna  # the study is on disk, every trial told: stopped early as PRUNED at its last epoch
    study = optuna.load_study(study_name="asha", storage=journal_storage(exp / "optuna.journal"))
    assert len(study.trials) == 8
    assert {n for t in study.trials for n in t.params} <= {"optimizer", "momentum", "lr[optimizer=adamw]",
                                                             "lr[optimizer=sgd]"}
    state = {"completed": optuna.trial.TrialState.COMPLETE, "stopped early": optuna.trial.TrialState.PRUNED}
    told = sorted((t.state.name, round(t.value, 6)) for t in study.trials)  # ran the budget: its best epoch's value
    assert told == sorted((state[r.status].name, round(r.best_val_acc if r.status == "completed" else r.last_val_acc, 6))
                          for r in table.itertuples())
    pruned_at = sorted(t.last_step for t in study.trials if t.state == optuna.trial.TrialState.PRUNED)
    assert pruned_at == sorted(table.loc[table.status == "stopped early", "epochs"])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(Path(table.loc[0, "trial_dir"])), size_guidance={"tensors": 0})
    acc.Reload()
    assert {"val_acc", "train_loss", "val_macro_f1"} <= set(acc.Tags()["scalars"])
    # HParams: each trial's session without an experiment summary, so that TensorBoard lists the union of
    # the trials' hyperparameters (momentum is an SGD trial's only)
    from tensorboard.plugins.hparams import metadata as hparams_metadata
    names = {}
    for trial_dir, optimizer in zip(table["trial_dir"], table["optimizer"]):
        acc = EventAccumulator(trial_dir, size_guidance={"tensors": 0})
        acc.Reload()
        content = acc.PluginTagToContent("hparams")
        assert "_hparams_/experiment" not in content and "_hparams_/session_end_info" in content
        session = hparams_metadata.parse_session_start_info_plugin_data(content["_hparams_/session_start_info"])
        assert ("momentum" in session.hparams) == (optimizer == "sgd")
        names.update(session.hparams)
    assert {"optimizer", "lr", "batch_size"} <= set(names) and ("momentum" in names) == (table.optimizer == "sgd").any()
    assert names["channels_last"].string_value == "false"  # a bool as its text, not torch's number 0.0


def test_direct_executor_records_failed_trials_and_goes_on(ray_instance, tiny_data, tmp_path):
    """A trial that raises (mlp with an empty hidden layer) and one whose loss becomes NaN (sgd at
    lr 1e9) are recorded as failed with their errors; the others complete."""
    space = parse_space({"max_epochs": 2, "grace_period": 2, "reduction_factor": 2, **TINY,
                         "model": {"choice": ["simple_cnn", "mlp"]},
                         "model_kwargs.width": {"value": 0.25, "when": {"model": "simple_cnn"}},
                         "model_kwargs.hidden": {"value": [0], "when": {"model": "mlp"}},
                         "optimizer": {"choice": ["adamw", "sgd"]},
                         "lr": {"value": 1.0e+9, "when": {"optimizer": "sgd"}}}, name="faulty")
    summary = run_search(space, tiny_data, trials=4, storage=tmp_path, name="faults", executor="direct",
                         max_failures=1, seed=2, progress=False)  # seed 2 samples each kind of trial
    table = summary.table.set_index("trial_id")
    assert len(table) == 4
    for tid, row in table.iterrows():
        model, optimizer = row["model"], row["optimizer"]
        if model == "mlp":
            assert row["status"] == "failed" and "hidden must be a positive integer" in row["error"]
        elif optimizer == "sgd":
            assert row["status"] == "failed" and row["error"].startswith("TrainingDiverged: training loss became nan")
        else:
            assert row["status"] == "completed" and row["error"] == "" and row["epochs"] == 2
    assert set(table["status"]) == {"failed", "completed"}
    errors = " ".join(table["error"])
    assert "UserError: hidden" in errors and "TrainingDiverged" in errors
    assert (table.loc[table.status == "failed", "failures"] == 2).all()  # tried, then retried once
    assert summary.counts["failed"] == (table.status == "failed").sum()
    assert "failed" in summary.text() and summary.best["trial_id"] in table.index
    # The Optuna study: each trial under its Tune id; a finished trial's value is its best epoch's, as in the table.
    import optuna
    study = optuna.load_study(study_name="faults", storage=journal_storage(tmp_path / "faults" / "optuna.journal"))
    told = {t.user_attrs["trial_id"]: t for t in study.trials}
    assert set(told) == set(table.index)
    for tid, row in table.iterrows():
        assert told[tid].state.name == {"completed": "COMPLETE", "failed": "FAIL"}[row["status"]]
        if row["status"] == "completed":
            assert told[tid].value == pytest.approx(row["best_val_acc"])
    assert study.best_trial.user_attrs["trial_id"] == summary.best["trial_id"]


def test_worker_error_names_the_workers_exception():
    from ray.train import WorkerGroupError

    from fer_tune.search.trainable import worker_error
    from fer_tune.train import TrainingDiverged

    exc = WorkerGroupError("Training failed", {0: TrainingDiverged("training loss became nan in epoch 1")})
    assert worker_error(exc) == "TrainingDiverged: training loss became nan in epoch 1"


# -- the CLI in a subprocess: SIGKILL and resume, Ctrl-C -----------------------------------------

def cli(args, **kw):
    # Without RAY_AUTH_MODE, as in a shell that never exported it: the test's instance runs with token
    # authentication (Ray turns it on and writes ~/.ray/auth_token), as a `ray start` cluster does, and
    # fer-tune must turn it on for its own connection (before any import of ray reads the mode).
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "fer_tune.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def search_args(toy_prepared, storage, address, name, trials):
    return ["search", "--space", "smoke", "--dataset", "fer2013", "--data-root", str(toy_prepared),
            "--subset", "0.5", "-n", str(trials), "--executor", "direct", "--concurrency", "2", "--quiet",
            "--storage", str(storage), "--name", name, "--address", address]


def wait_for_finished(table_path: Path, count: int, proc, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        if table_path.is_file():
            df = pd.read_csv(table_path)
            if df["status"].isin(["completed", "stopped early"]).sum() >= count:
                return
        time.sleep(0.3)
    proc.kill()
    raise AssertionError(f"fewer than {count} finished trials in {timeout_s} s")


def test_resume_after_sigkill_keeps_finished_trials(ray_instance, toy_prepared, tmp_path, monkeypatch):
    # Ray restores what its last experiment snapshot holds, taken at most every second
    # (TUNE_GLOBAL_CHECKPOINT_S=1); these toy trials can start and end within one second, which
    # real trials never do. A snapshot at every controller step keeps that window out of the test.
    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "0")
    args = search_args(toy_prepared, tmp_path, ray_instance, "killed", 8)
    proc = cli(args)
    wait_for_finished(tmp_path / "killed" / "trials.csv", 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    shown = cli(["trials", str(tmp_path / "killed")]).communicate(timeout=60)[0]  # search.yaml still says running
    assert f"its driver (pid {proc.pid}) ended without finishing, killed or crashed" in shown, shown
    assert f"continue with `fer-tune search --resume --name killed --storage {tmp_path}`" in shown
    before = pd.read_csv(tmp_path / "killed" / "trials.csv")
    done = before[before.status.isin(["completed", "stopped early"])].set_index("trial_id")
    assert len(done) >= 3 and len(before) < 8
    # The worst moment for the kill: while Tune copied its snapshot into the experiment folder
    # (CI saw a JSONDecodeError and an EOFError on resume). Every file cut short; --resume falls back
    # on the complete copy in .tune-snapshot.
    tune_files = [p for pattern in snapshot.TUNE_FILES for p in (tmp_path / "killed").glob(pattern)]
    copies = [tmp_path / "killed" / f"{snapshot.SNAPSHOT}{end}" for end in ("", ".old")]  # .old: killed mid-swap
    assert len(tune_files) >= 4 and any(copy.is_dir() for copy in copies)
    for path in tune_files:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    # Without that copy: one line, and the folder left as it was (Tune would start the search over)
    shutil.copytree(tmp_path / "killed", tmp_path / "nocopy", ignore=shutil.ignore_patterns(f"{snapshot.SNAPSHOT}*"))
    files = {p: p.read_bytes() for p in (tmp_path / "nocopy").rglob("*") if p.is_file()}
    refused = cli(search_args(toy_prepared, tmp_path, ray_instance, "nocopy", 8) + ["--resume"])
    out, _ = refused.communicate(timeout=120)
    assert refused.returncode == 2 and len(out.splitlines()) == 1, out
    assert out.startswith("fer-tune: error: --resume: ") and "is cut short" in out
    assert {p: p.read_bytes() for p in (tmp_path / "nocopy").rglob("*") if p.is_file()} == files

    proc = cli(args + ["--resume"])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    after = pd.read_csv(tmp_path / "killed" / "trials.csv").set_index("trial_id")
    assert len(after) == 8 and set(after["status"]) <= {"completed", "stopped early"}
    for tid, row in done.iterrows():  # kept: same status, epochs and result, not trained again
        assert after.loc[tid, "status"] == row["status"] and after.loc[tid, "epochs"] == row["epochs"]
        assert after.loc[tid, "best_val_acc"] == pytest.approx(row["best_val_acc"])
        reports = [json.loads(line) for line in (Path(row["trial_dir"]) / "result.json").read_text().splitlines()]
        assert [r["epoch"] for r in reports if not r.get("replayed")] == list(range(1, row["epochs"] + 1))
    record = yaml.safe_load((tmp_path / "killed" / "search.yaml").read_text())
    assert record["status"] == "finished" and len(record["resumed"]) == 1 and "driver" not in record
    import optuna
    study = optuna.load_study(study_name="killed", storage=journal_storage(tmp_path / "killed" / "optuna.journal"))
    told = [t.state.name for t in study.trials]  # none left RUNNING
    # a trial asked just before the kill but not yet in Tune's snapshot is re-asked on resume; its
    # orphaned Optuna trial is marked failed (at most one per concurrent slot)
    assert told.count("FAIL") <= 2
    assert sorted(s for s in told if s != "FAIL") == sorted(
        after["status"].map({"completed": "COMPLETE", "stopped early": "PRUNED"}))
    complete = {t.user_attrs["trial_id"]: t.value for t in study.trials if t.state.name == "COMPLETE"}
    assert complete == pytest.approx(after.loc[list(complete), "best_val_acc"].to_dict())  # best epoch, not last


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "kill"])
def test_ctrl_c_stops_cleanly_and_writes_the_tables(ray_instance, toy_prepared, tmp_path, signum):
    """Ctrl-C, and `kill` (SIGTERM, which ray.init would turn into a plain exit), stop gracefully."""
    proc = cli(search_args(toy_prepared, tmp_path, ray_instance, "interrupted", 12))
    wait_for_finished(tmp_path / "interrupted" / "trials.csv", 1, proc)
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert f"interrupted: continue with `fer-tune search --resume --name interrupted --storage {tmp_path}`" in out
    table = pd.read_csv(tmp_path / "interrupted" / "trials.csv")
    assert table["status"].isin(["completed", "stopped early"]).sum() >= 1 and len(table) < 12
    assert set(table["status"]) <= {"completed", "stopped early", "interrupted", "pending"}
    assert (tmp_path / "interrupted" / "trials.parquet").is_file()
    record = yaml.safe_load((tmp_path / "interrupted" / "search.yaml").read_text())
    assert record["status"] == "interrupted" and "driver" not in record
    if signum == signal.SIGINT:
        # The resume finds every interrupted trial's checkpoint (the end of the search kept the one Tune's
        # last snapshot names, though the worker may have written a newer one), and fails none.
        proc = cli(search_args(toy_prepared, tmp_path, ray_instance, "interrupted", 12) + ["--resume"])
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
        after = pd.read_csv(tmp_path / "interrupted" / "trials.csv")
        assert len(after) == 12 and set(after["status"]) <= {"completed", "stopped early"}, out


def test_one_worker_train_trial_runs_without_a_process_group(ray_instance, tmp_path):
    """A one-worker Ray Train trial skips torch.distributed's process group (it has no peer; the DDP
    test below trains with one): the worker sees none, and its reports reach Tune."""
    from ray import tune

    from fer_tune.search.trainable import TrialSetup, train_trial

    setup = TrialSetup(space=None, epochs=1, seed=0, workers=1, train_storage=str(tmp_path / "train"))

    def worker(config):
        import ray.train
        import torch.distributed as dist

        ray.train.report({"epoch": 1, "process_group": dist.is_initialized()})

    def trial(config):
        train_trial(config, setup, [None], worker=worker)

    grid = tune.Tuner(tune.with_resources(trial, {"cpu": 0, "memory": 64 * 2**20}), tune_config=tune.TuneConfig(num_samples=1),
                      run_config=tune.RunConfig(name="one-worker", storage_path=str(tmp_path), verbose=0)).fit()
    assert grid[0].error is None and grid[0].metrics["process_group"] is False


def test_multi_worker_trial_trains_data_parallel(ray_instance, tiny_data, tmp_path):
    """--workers-per-trial 2: one Ray Train run with two DDP workers, each on its shard."""
    space = parse_space({"max_epochs": 2, "grace_period": 2, "reduction_factor": 2, **TINY, "lr": 0.01}, name="ddp")
    summary = run_search(space, tiny_data, trials=1, storage=tmp_path, name="ddp", workers_per_trial=2,
                         progress=False)
    row = summary.table.iloc[0]
    assert row["status"] == "completed" and row["epochs"] == 2
    reports = [json.loads(line) for line in (Path(row["trial_dir"]) / "result.json").read_text().splitlines()]
    assert [r["world_size"] for r in reports] == [2, 2]
    with pytest.raises(UserError, match="needs --executor train"):
        run_search(space, tiny_data, trials=1, storage=tmp_path, name="x", workers_per_trial=2, executor="direct")
