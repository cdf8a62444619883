"""The trial tables and `fer-tune trials` / `board` (no Ray run: rows from stand-in trials)."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

from fer_tune.cli import main
from fer_tune.search import cluster, results
from fer_tune.search.space import load_space


def fake_trial(tid, status, epochs, val_acc=None, config=None, error=None):
    accs = val_acc or []
    analysis = {}
    if accs:
        analysis = {"val_acc": {"max": max(accs), "min": min(accs), "last": accs[-1]},
                    "val_loss": {"max": 2.0, "min": 1.0 + 0.1 * len(accs), "last": 1.5}}
    last = {"epoch": epochs, "time_total_s": 10.0 + epochs, "node_id": "n1", "worker_ip": "10.0.0.7",
            **({"val_acc": accs[-1]} if accs else {})}
    return SimpleNamespace(trial_id=tid, status=status, last_result=last if epochs else {}, metric_analysis=analysis,
                           config=config or {"lr": 0.01, "optimizer": "adamw"}, path=f"/x/trial_{tid}",
                           get_error=lambda: error, error_file=None)


def rows_for(trials, finished):
    return [results.trial_row(t, max_epochs=4, finished=finished) for t in trials]


def test_status_best_last_and_error_of_each_trial():
    trials = [
        fake_trial("a", "TERMINATED", 4, [0.3, 0.5, 0.6, 0.55]),
        fake_trial("b", "TERMINATED", 1, [0.2]),
        fake_trial("c", "ERROR", 1, [0.1], error=RuntimeError(
            "Traceback (most recent call last):\n  File \"x.py\", line 3\nfer_tune.search.trainable.TrialFailed: "
            "TrainingDiverged: training loss became nan in epoch 2 (lr 1e+09)")),
        fake_trial("d", "TERMINATED", 2, [0.4, 0.45]),
        fake_trial("e", "PENDING", 0),
        fake_trial("f", "RUNNING", 3, [0.1, 0.2, 0.7], config={"lr": 0.1, "optimizer": "sgd", "momentum": 0.9}),
    ]
    rows = {r["trial_id"]: r for r in rows_for(trials, finished={"a", "b", "c"})}
    assert rows["a"]["status"] == "completed" and rows["a"]["best_val_acc"] == 0.6 and rows["a"]["last_val_acc"] == 0.55
    assert rows["a"]["best_val_loss"] == pytest.approx(1.4)  # losses: best is the minimum
    assert rows["b"]["status"] == "stopped early" and rows["b"]["epochs"] == 1
    assert rows["c"]["status"] == "failed"
    assert rows["c"]["error"] == "TrainingDiverged: training loss became nan in epoch 2 (lr 1e+09)"
    # Ray's own errors: the exception line and the cause after it, not the metadata lines.
    died = fake_trial("g", "ERROR", 0, error=RuntimeError(
        "Traceback (most recent call last):\n  File \"w.py\", line 1\nray.exceptions.ActorDiedError: The actor died "
        "unexpectedly before finishing this task.\n\tclass_name: ImplicitFunc\n\tnamespace: 1588e23a\n"
        "The actor never ran - it was cancelled before it started running."))
    assert rows_for([died], set())[0]["error"] == ("ActorDiedError: The actor died unexpectedly before finishing this "
                                                   "task. The actor never ran - it was cancelled before it started "
                                                   "running.")
    assert rows["d"]["status"] == "interrupted"  # terminated, but Tune never completed it (Ctrl-C)
    assert rows["e"]["status"] == "pending" and rows["f"]["status"] == "running"
    assert rows["a"]["wall_s"] == 14.0 and rows["a"]["node_id"] == "n1" and rows["a"]["node_ip"] == "10.0.0.7"

    table = results.build_table(rows.values(), "val_acc", "max", params=["optimizer", "lr", "momentum"])
    assert list(table["trial_id"]) == ["f", "a", "d", "b", "c", "e"]  # best val_acc first, no metric last
    assert list(table.columns[:6]) == ["trial_id", "status", "epochs", "optimizer", "lr", "momentum"]
    assert results.best_row(table, "val_acc")["trial_id"] == "f"
    # A trial that failed after its best epoch is not the best config (retrain leaves it out too)
    diverged = fake_trial("h", "ERROR", 3, [0.2, 0.9, 0.1], error=RuntimeError("TrainingDiverged: nan"))
    with_failed = results.build_table(rows_for(trials + [diverged], {"a", "b", "c", "h"}), "val_acc", "max")
    assert with_failed.iloc[0]["trial_id"] == "h" and results.best_row(with_failed, "val_acc")["trial_id"] == "f"
    only_failed = with_failed[with_failed.status == "failed"]
    assert results.best_row(only_failed, "val_acc") is None
    by_loss = results.build_table(rows.values(), "val_loss", "min")
    assert by_loss.iloc[0]["trial_id"] == "b"


def test_best_json_goes_when_no_trial_is_best_any_more(tmp_path):
    """A refresh whose every trial has failed (the one best.json named failed late) removes it."""
    good = results.build_table(rows_for([fake_trial("a", "RUNNING", 2, [0.3, 0.6])], set()), "val_acc", "max")
    results.write_tables(tmp_path, good, metric="val_acc", mode="max")
    assert json.loads((tmp_path / "best.json").read_text())["trial"]["trial_id"] == "a"
    failed = results.build_table(rows_for([fake_trial("a", "ERROR", 3, [0.3, 0.6, 0.1], error=ValueError("nan"))],
                                          {"a"}), "val_acc", "max")
    results.write_tables(tmp_path, failed, metric="val_acc", mode="max")
    assert not (tmp_path / "best.json").exists() and (tmp_path / "trials.csv").is_file()


@pytest.fixture
def experiment(tmp_path):
    trials = [fake_trial(t, "TERMINATED", e, accs, config={"lr": lr, "optimizer": opt, "model_kwargs.hidden": [64]})
              for t, e, accs, lr, opt in [("t1", 4, [0.3, 0.62], 0.01, "adamw"), ("t2", 1, [0.25], 0.2, "sgd"),
                                          ("t3", 4, [0.5, 0.71], 0.003, "adamw")]]
    trials.append(fake_trial("t4", "ERROR", 1, [0.1], error=ValueError("boom")))
    table = results.build_table(rows_for(trials, {"t1", "t2", "t3", "t4"}), "val_acc", "max")
    exp = tmp_path / "results" / "smoke-1"
    results.write_tables(exp, table, metric="val_acc", mode="max", configs={"t3": {"lr": 0.003}})
    (exp / "search.yaml").write_text(yaml.safe_dump({"space": load_space("smoke").to_dict()}))
    return exp


def test_tables_round_trip_and_best_json(experiment):
    csv = pd.read_csv(experiment / "trials.csv")
    parquet = pd.read_parquet(experiment / "trials.parquet")
    assert list(csv["trial_id"]) == list(parquet["trial_id"]) == ["t3", "t1", "t2", "t4"]
    assert list(parquet["status"]) == ["completed", "completed", "stopped early", "failed"]
    assert parquet.loc[3, "error"] == "ValueError: boom" or parquet.loc[3, "error"].endswith("boom")
    best = json.loads((experiment / "best.json").read_text())
    assert best["trial"]["trial_id"] == "t3" and best["value"] == 0.71 and best["config"] == {"lr": 0.003}


@pytest.mark.parametrize("fmt", ["table", "csv", "json", "markdown"])
def test_trials_command_formats(experiment, capsys, fmt):
    assert main(["trials", str(experiment), "--format", fmt, "--top", "2"]) == 0
    out = capsys.readouterr().out
    if fmt == "json":
        rows = json.loads(out)
        assert [r["trial_id"] for r in rows] == ["t3", "t1"]
        assert set(rows[0]) >= {"status", "epochs", "best_val_acc", "last_val_acc", "lr", "optimizer", "wall_s"}
        assert rows[0]["model_kwargs.hidden"] == [64]  # a list, not the text the table stores it as
    elif fmt == "csv":
        lines = out.strip().splitlines()
        assert lines[0].startswith("trial_id,status,epochs,best_val_acc,last_val_acc")
        assert len(lines) == 3 and lines[1].startswith("t3,completed,4,0.71")
    elif fmt == "markdown":
        assert out.splitlines()[0].startswith("| trial_id | status | epochs | best_val_acc")
        assert "| t3 | completed | 4 | 0.71 |" in out and "t2" not in out
    else:
        assert "t3" in out and "t1" in out and "t2" not in out and "best val_acc first" in out


def test_a_conditional_integer_stays_whole_in_every_format(tmp_path, capsys):
    """model_kwargs.fc exists only for some trials: pandas would make the column float (512.0)."""
    trials = [fake_trial("v", "TERMINATED", 4, [0.5, 0.7], config={"model": "vgg_fer_s", "model_kwargs.fc": 512}),
              fake_trial("s", "TERMINATED", 4, [0.4, 0.6], config={"model": "simple_cnn"})]
    table = results.build_table(rows_for(trials, {"v", "s"}), "val_acc", "max")
    exp = tmp_path / "cond"
    results.write_tables(exp, table, metric="val_acc", mode="max")
    csv = (exp / "trials.csv").read_text().splitlines()
    fc = csv[0].split(",").index("model_kwargs.fc")
    assert [line.split(",")[fc] for line in csv[1:]] == ["512", ""]
    assert list(pd.read_parquet(exp / "trials.parquet")["model_kwargs.fc"].astype(object).fillna(-1)) == [512, -1]
    assert json.loads((exp / "best.json").read_text())["trial"]["model_kwargs.fc"] == 512
    assert main(["trials", str(exp), "--format", "json", "--all-columns"]) == 0
    assert [r["model_kwargs.fc"] for r in json.loads(capsys.readouterr().out)] == [512, None]
    assert main(["trials", str(exp), "--format", "csv", "--all-columns"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(",")[fc] for line in out[1:]] == ["512", ""]
    assert main(["trials", str(exp), "--all-columns"]) == 0
    out = capsys.readouterr().out
    assert " 512 " in out + " " and "512.0" not in out and "<NA>" not in out and "nan" not in out.lower()


def test_trials_command_shows_keys_with_one_range_per_condition(experiment, capsys):
    """cpu.yaml gives lr and weight_decay one range per optimizer (a list in search.yaml): still columns."""
    (experiment / "search.yaml").write_text(yaml.safe_dump({"space": load_space("cpu").to_dict()}))
    assert main(["trials", str(experiment), "--format", "csv"]) == 0
    header = capsys.readouterr().out.splitlines()[0].split(",")
    assert {"optimizer", "lr"} <= set(header) and "nesterov" not in header  # nesterov: fixed where it applies


def test_trials_command_sort_default_latest_and_errors(experiment, capsys, monkeypatch):
    monkeypatch.chdir(experiment.parent.parent)
    assert main(["trials", "--format", "csv", "--sort", "val_loss"]) == 0  # latest under ./results
    ids = [line.split(",")[0] for line in capsys.readouterr().out.strip().splitlines()[1:]]
    assert ids[0] == "t2"  # one epoch: lowest best val_loss in the stand-ins
    assert main(["trials", "--sort", "val_loss"]) == 0
    head, header, first = capsys.readouterr().out.splitlines()[:3]
    assert head.endswith("(4 trials, by val_loss, lowest first)") and first.split()[0] == "t2"
    assert header.split()[:6] == ["trial_id", "status", "epochs", "best_val_acc", "last_val_acc", "best_val_loss"]
    record = experiment / "search.yaml"
    record.write_text(yaml.safe_dump({**yaml.safe_load(record.read_text()), "status": "running"}))
    assert main(["trials"]) == 0  # a search that did not finish (or is running): its table may be stale
    assert capsys.readouterr().out.splitlines()[0].endswith(
        "(4 trials, best val_acc first; the search is running, or was killed: statuses as of the table's last refresh)")
    alive = cluster.driver_record()  # this process: a search still running
    record.write_text(yaml.safe_dump({**yaml.safe_load(record.read_text()), "driver": alive}))
    assert main(["trials"]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith(
        f"the search is running (driver pid {os.getpid()}): statuses as of the table's last refresh)")
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = {**alive, "pid": int(ended.stdout)}
    record.write_text(yaml.safe_dump({**yaml.safe_load(record.read_text()), "driver": gone}))
    assert main(["trials"]) == 0  # its driver was killed: the rows shown running will not move again
    assert capsys.readouterr().out.splitlines()[0].endswith(
        f"its driver (pid {gone['pid']}) ended without finishing, killed or crashed: trials shown running were cut "
        f"short; continue with `fer-tune search --resume --name {experiment.name}`)")
    if alive["start_tick"] is not None:  # Linux: the pid is alive, but another process's than the driver's
        reused = {**alive, "start_tick": alive["start_tick"] - 1}
        assert cluster.driver_state(reused) == "gone"
    assert cluster.driver_state({**alive, "pid_ns": "pid:[1]"}) is None  # another container's pids: unknown
    record.write_text(yaml.safe_dump({**yaml.safe_load(record.read_text()), "driver": {**gone, "host": "elsewhere"}}))
    assert main(["trials"]) == 0  # another host's driver: unknown
    assert "the search is running, or was killed" in capsys.readouterr().out.splitlines()[0]
    assert main(["trials", f"file://{experiment}", "--format", "csv"]) == 0  # as --storage file://... is written
    assert len(capsys.readouterr().out.strip().splitlines()) == 1 + 4
    assert main(["trials", "--top", "0"]) == 2
    assert "--top 0: must be >= 1" in capsys.readouterr().err
    assert main(["trials", "smoke-1", "--sort", "no_such_metric"]) == 2
    assert "--sort no_such_metric: no such column" in capsys.readouterr().err
    assert main(["trials", "nope"]) == 2
    assert "no search experiment 'nope'" in capsys.readouterr().err
    assert main(["board", "--print"]) == 0
    assert capsys.readouterr().out.strip() == "tensorboard --logdir results/smoke-1 --port 6006"


def test_search_flag_errors_are_one_line(capsys, tmp_path):
    assert main(["search", "--space", "nosuch"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown search space" in err and "cnn, cpu, smoke, timm" in err
    assert main(["search", "--space", "smoke", "--executor", "direct", "--workers-per-trial", "2"]) == 2
    assert "needs --executor train" in capsys.readouterr().err
    assert main(["search", "--space", "smoke", "--subset", "1.5"]) == 2
    assert "--subset 1.5" in capsys.readouterr().err
    assert main(["search", "--space", "smoke", "--name", "", "--storage", str(tmp_path)]) == 2
    assert "--name '': use a plain folder name" in capsys.readouterr().err
    assert main(["search", "--space", "smoke", "--grace-period", "50", "--storage", str(tmp_path)]) == 2
    assert "lower --grace-period or raise --max-epochs" in capsys.readouterr().err
    assert main(["search", "--space", "smoke", "--promotion-window", "1", "--storage", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "promotion_window (1) must be 0 (all results) or at least reduction_factor" in err
    assert not list(tmp_path.iterdir())
    assert main(["search", "--space", "smoke", "--dataset", "nosuch", "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nosuch" in err and "fer-tune data prepare" in err
    (tmp_path / "afile").write_text("")
    assert main(["search", "--space", "smoke", "--storage", str(tmp_path / "afile" / "sub")]) == 2  # before Ray starts
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{tmp_path / 'afile'} is a file, not a folder" in err


def test_trials_importance_reads_the_optuna_journal(experiment, capsys):
    import optuna

    from fer_tune.search.tuner import journal_storage

    assert main(["trials", str(experiment), "--importance"]) == 2
    assert "no optuna.journal" in capsys.readouterr().err
    study = optuna.create_study(study_name="smoke-1", direction="maximize",
                                storage=journal_storage(experiment / "optuna.journal"),
                                sampler=optuna.samplers.RandomSampler(seed=0))
    objective = (lambda t: t.suggest_float("lr", 1e-4, 1e-1, log=True) * 10
                 + 0.001 * (t.suggest_categorical("optimizer", ["adamw", "sgd"]) == "sgd"))
    study.optimize(objective, n_trials=3)
    assert main(["trials", str(experiment), "--importance"]) == 0
    assert "from so few trials the figures are rough" in capsys.readouterr().out.splitlines()[0]
    study.optimize(objective, n_trials=9)
    assert main(["trials", str(experiment), "--importance"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("12 completed trials") and lines[1].split()[0] == "lr" and "rough" not in lines[0]
    assert {line.split()[0] for line in lines[1:]} == {"lr", "optimizer"}


def test_checkpoint_cleanup_deletes_only_what_no_resume_can_ask_for(tmp_path):
    """Tune restores a trial from the checkpoint of its last snapshot (<= 1 s old): a checkpoint
    goes only once a newer one has existed for the grace period, a finished trial's only after
    the grace period (or at the end of the search)."""
    import os
    import time

    from fer_tune.search.callbacks import CheckpointCleanup

    def trial(tid, n):
        path = tmp_path / f"trial_{tid}"
        for i in range(1, n + 1):
            (path / f"checkpoint_{i:06d}").mkdir(parents=True)
            (tmp_path / "train_runs" / tid / f"checkpoint_2026-11-22_09-00-0{i}").mkdir(parents=True)
        return SimpleNamespace(trial_id=tid, path=str(path), status="RUNNING")

    def left(tid):
        return sorted(p.name for p in (tmp_path / f"trial_{tid}").iterdir()) + \
            sorted(p.name for p in (tmp_path / "train_runs" / tid).iterdir())

    def age(tid, seconds):
        old = time.time() - seconds
        for p in [*(tmp_path / f"trial_{tid}").iterdir(), *(tmp_path / "train_runs" / tid).iterdir()]:
            os.utime(p, (old, old))

    cleanup = CheckpointCleanup(str(tmp_path / "train_runs"), grace_s=10.0, interval_s=0.0)
    running, done = trial("a", 3), trial("b", 2)
    cleanup.on_trial_result(0, [], running, {})
    assert left("a") == ["checkpoint_000001", "checkpoint_000002", "checkpoint_000003",
                         "checkpoint_2026-11-22_09-00-01", "checkpoint_2026-11-22_09-00-02",
                         "checkpoint_2026-11-22_09-00-03"]  # the newest is fresh: a snapshot may name any
    age("a", 20)
    cleanup.on_trial_result(0, [], running, {})
    assert left("a") == ["checkpoint_000003", "checkpoint_2026-11-22_09-00-03"]  # the newest always stays

    cleanup.on_trial_complete(0, [], done)
    assert len(left("b")) == 4  # just finished: the last snapshot may still have it running
    cleanup.done["b"] -= 20
    cleanup.on_trial_result(0, [], running, {})
    assert left("b") == [] and left("a") == ["checkpoint_000003", "checkpoint_2026-11-22_09-00-03"]

    keeper = CheckpointCleanup(None, keep_finished=True, grace_s=10.0)
    kept = trial("c", 2)
    keeper.on_trial_complete(0, [], kept)
    age("c", 20)
    keeper.final_sweep()
    assert left("c") == ["checkpoint_000002", "checkpoint_2026-11-22_09-00-01", "checkpoint_2026-11-22_09-00-02"]

    final = CheckpointCleanup(None, grace_s=10.0)
    ended = trial("d", 2)
    final.on_trial_complete(0, [], ended)
    final.final_sweep()  # after the search's last snapshot: no grace needed
    assert [n for n in left("d") if n.startswith("checkpoint_0")] == []

    # Interrupted (Ctrl-C): the worker persisted checkpoint 2 but the driver never took in its report,
    # so the last snapshot names checkpoint 1, which --resume restores: the end keeps it.
    interrupted = trial("e", 2)
    final.on_trial_result(0, [], interrupted, {})
    final.final_sweep()
    assert [n for n in left("e") if n.startswith("checkpoint_0")] == ["checkpoint_000001", "checkpoint_000002"]
    age("e", 20)
    final.final_sweep()
    assert [n for n in left("e") if n.startswith("checkpoint_0")] == ["checkpoint_000002"]


def test_the_resume_hint_names_the_storage_when_it_is_not_the_default(tmp_path, monkeypatch):
    from fer_tune.search.tuner import SearchSummary

    monkeypatch.chdir(tmp_path)

    def hint(path):
        summary = SearchSummary(name="x", path=path, table=pd.DataFrame(), metric="val_acc", mode="max",
                                max_epochs=2, seconds=1.0, interrupted=True)
        return summary.text().splitlines()[-1]

    assert hint("results/x") == "interrupted: continue with `fer-tune search --resume --name x`"
    assert hint(str(tmp_path / "results" / "x")).endswith("--resume --name x`")
    assert hint("/data/runs/x").endswith("--resume --name x --storage /data/runs`")
    assert hint("s3://bucket/fer/x").endswith("--resume --name x --storage s3://bucket/fer`")


def test_a_search_whose_every_trial_failed_exits_1(monkeypatch, capsys, tmp_path):
    """The summary is printed, then one error line with the first trial's error (not exit 0)."""
    from fer_tune.search import tuner

    table = pd.DataFrame({"trial_id": ["a1", "b2"], "status": ["failed", "failed"], "epochs": [0, 0],
                          "best_val_acc": [None, None],
                          "error": ["UserError: hidden must be a positive integer\nTraceback ...", "UserError: x"]})

    def failed_search(*args, **kwargs):
        return tuner.SearchSummary(name="bad", path=str(tmp_path / "bad"), table=table, metric="val_acc", mode="max",
                                   max_epochs=2, seconds=3.0, counts={"failed": 2})

    monkeypatch.setattr(tuner, "run_search", failed_search)
    assert main(["search", "--space", "smoke"]) == 1
    out, err = capsys.readouterr()
    assert "2 trials: 0 completed, 0 stopped early, 2 failed" in out
    assert err.strip() == (f"fer-tune: error: search bad: all 2 trials failed, the first with UserError: hidden must "
                           f"be a positive integer (each trial's error: `fer-tune trials {tmp_path / 'bad'}`)")


def test_resume_names_the_flags_it_ignores(monkeypatch, capsys, tmp_path):
    """--resume continues a search as it was started: the search-defining flags a user gives with it are
    passed on, and those that say otherwise than the search's record are named as ignored."""
    from fer_tune.search import tuner

    seen = {}

    def resumed(space, data, **kwargs):
        seen.update(space=space, **kwargs)
        return tuner.SearchSummary(name="s", path=str(tmp_path / "s"), table=pd.DataFrame(
            {"trial_id": ["a"], "status": ["completed"], "epochs": [2], "best_val_acc": [0.5], "error": [""]}),
            metric="val_acc", mode="max", max_epochs=2, seconds=1.0, counts={"completed": 1},
            best={"trial_id": "a", "best_val_acc": 0.5, "epochs": 2})

    monkeypatch.setattr(tuner, "run_search", resumed)
    assert main(["search", "--resume", "--name", "s", "-n", "8", "--space", "cnn", "--dataset", "rafdb",
                 "--no-early-stopping", "--max-failures", "2"]) == 0
    assert seen["resume"] and seen["space"] is None and seen["max_failures"] == 2  # --max-failures applies
    assert seen["resume_flags"] == {"space": "cnn", "trials": 8, "dataset": "rafdb", "no_early_stopping": True}

    flags = dict(trials=4, executor="direct", workers_per_trial=1, cpus_per_trial=1.0, gpus_per_trial=0.0,
                 concurrency=2, seed=0, subset=0.5, address=None, max_failures=0, sampler="tpe", early_stopping=True)
    record = tuner._record(load_space("smoke"), {"name": "fer2013"}, "s", "results", flags)
    # the same command again with --resume (up-arrow): nothing to say
    assert tuner.resume_ignored(record, {"space": "smoke", "trials": 4, "subset": 0.5, "executor": "direct"}) == []
    assert tuner.resume_ignored(record, {"space": "search_spaces/smoke.yaml", "max_epochs": 3}) == []
    assert tuner.resume_ignored(record, seen["resume_flags"]) == ["--space cnn", "--trials 8", "--dataset rafdb",
                                                                  "--no-early-stopping"]


def test_a_failed_table_write_keeps_the_old_table_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "trials.csv"
    target.write_text("old")

    def half_then_fail(path):
        Path(path).write_text("half")
        raise OSError("No space left on device")

    with pytest.raises(OSError):
        results._atomic(target, half_then_fail)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["trials.csv"]
    results._atomic(target, lambda p: Path(p).write_text("new"))
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["trials.csv"]


def test_trials_reads_the_csv_when_the_parquet_is_damaged_and_says_when_both_are(experiment, capsys):
    (experiment / "trials.parquet").write_bytes(b"PAR1 cut short")
    assert main(["trials", str(experiment), "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("t3,")  # best first, from trials.csv
    (experiment / "trials.csv").write_bytes(b"\x00\xff")
    assert main(["trials", str(experiment)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "trials.csv: unreadable" in err and "--resume" in err
