"""Tune callbacks of the search: the trial tables (refreshed while running) and TensorBoard.

Both run in the driver. Their bookkeeping (which trials finished in Tune's eyes, how long each
took to its first report) is Tune callback state, saved with the experiment checkpoint, so a
resumed search keeps it.
"""

from __future__ import annotations

import time
from pathlib import Path

from ray.tune import Callback

from fer_tune.search import results
from fer_tune.train.report import METRIC_NAMES


class TablesCallback(Callback):
    """Writes trials.csv / trials.parquet / best.json: on every finished trial, at most every
    `refresh_s` while trials report, and at the end (also after Ctrl-C)."""

    def __init__(self, exp_dir: str | None, *, metric: str, mode: str, max_epochs: int, setup=None,
                 params: list[str] | None = None, refresh_s: float = 10.0):
        self.exp_dir = exp_dir  # None: Tune's driver staging folder (synced to a URI storage)
        self.metric, self.mode, self.max_epochs = metric, mode, max_epochs
        self.trial_setup = setup  # TrialSetup: turns a trial's params into its TrainConfig for best.json
        self.refresh_s = refresh_s
        self.params = list(params or [])  # column order of the hyperparameters
        self.finished: set[str] = set()  # trials Tune completed, stopped or failed (not interrupted)
        self.startup: dict[str, float] = {}  # trial id -> seconds from trial start to first report, less the epoch
        self.started_at: dict[str, float] = {}
        self.trials: list = []
        self._last_write = 0.0
        self.frame = None

    # Tune hooks
    def on_trial_start(self, iteration, trials, trial, **info):
        self.started_at[trial.trial_id] = time.time()
        self.trials = trials
        if self.frame is None:  # a table from the first trial on, before any trial has reported
            self.write(trials)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.trials = trials
        tid = trial.trial_id
        if tid in self.started_at and tid not in self.startup and not result.get("replayed"):
            self.startup[tid] = round(time.time() - self.started_at[tid] - float(result.get("epoch_seconds", 0.0)), 2)
        if time.time() - self._last_write > self.refresh_s:
            self.write(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.finished.add(trial.trial_id)
        self.write(trials)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.finished.add(trial.trial_id)
        self.write(trials)

    def on_experiment_end(self, trials, **info):
        self.write(trials)

    def get_state(self):
        return {"finished": sorted(self.finished), "startup": dict(self.startup)}

    def set_state(self, state):
        self.finished = set(state.get("finished", []))
        self.startup = dict(state.get("startup", {}))

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(trials=[], frame=None, started_at={})
        return state

    # The table
    def rows(self, trials) -> list[dict]:
        return [results.trial_row(t, max_epochs=self.max_epochs, finished=self.finished,
                                  extra={"startup_s": self.startup.get(t.trial_id)}) for t in trials]

    def write(self, trials) -> None:
        if not trials:
            return
        self.trials = trials
        frame = results.build_table(self.rows(trials), self.metric, self.mode, self.params)
        self.frame = frame
        folder = self.exp_dir or trials[0].storage.experiment_driver_staging_path
        configs = {}
        best = results.best_row(frame, self.metric)
        if best is not None and self.trial_setup is not None:
            trial = next((t for t in trials if t.trial_id == best["trial_id"]), None)
            if trial is not None:
                try:
                    configs[trial.trial_id] = self.trial_setup.config(trial.config).to_dict()
                except Exception:  # never end a search over its table: retrain rebuilds the config from the row
                    pass
        results.write_tables(folder, frame, metric=self.metric, mode=self.mode, configs=configs)
        self._last_write = time.time()


class TensorBoardCallback(Callback):
    """One TensorBoard run per trial, in the trial's folder: our metric names as scalars at each
    epoch, and at the end the HParams summary (the trial's hyperparameters with best_<metric>
    and the last val_acc), so the HParams dashboard compares trials."""

    def __init__(self, metric: str, params: list[str]):
        self.metric = metric
        self.params = params
        self._writers: dict = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_writers"] = {}
        return state

    def _writer(self, trial):
        if trial.trial_id not in self._writers:
            from torch.utils.tensorboard import SummaryWriter

            trial.init_local_path()
            self._writers[trial.trial_id] = SummaryWriter(trial.local_path, flush_secs=5)
        return self._writers[trial.trial_id]

    def on_trial_result(self, iteration, trials, trial, result, **info):
        writer = self._writer(trial)
        step = int(result.get("epoch", iteration))
        for name in METRIC_NAMES:
            if name != "epoch" and isinstance(result.get(name), (int, float)):
                writer.add_scalar(name, result[name], step)
        writer.flush()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._close(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._close(trial)

    def on_experiment_end(self, trials, **info):
        for trial in trials:
            self._close(trial, hparams=False)

    def _close(self, trial, hparams: bool = True) -> None:
        if trial.trial_id not in self._writers and not hparams:
            return
        writer = self._writer(trial)
        if hparams:
            write_hparams(writer, trial.config or {}, trial, self.metric)
        writer.close()
        self._writers.pop(trial.trial_id, None)


class CheckpointCleanup(Callback):
    """Deletes the checkpoints nothing can need any more, late enough that a resumed search never
    asks for one.

    Tune restores a trial from the checkpoint named in its last experiment snapshot (taken at most
    every TUNE_GLOBAL_CHECKPOINT_S = 1 s) and fails the trial when that folder is gone ("Could not
    recover from checkpoint as it does not exist on storage anymore"). Deleting at once, as
    Ray's `num_to_keep` does when a newer checkpoint arrives and as deleting a finished trial's
    checkpoints would, races that snapshot: a driver killed in between resumes into failed trials.
    So Tune and Train keep every checkpoint (num_to_keep=None), and this callback deletes
    - a trial's older checkpoints once its newest has existed for `grace_s` (many snapshots later),
    - all checkpoints of a trial Tune completed or ASHA stopped, `grace_s` after it finished, and at
      the end of the search (a search of larger models would otherwise keep gigabytes of them),
      unless `keep_finished`.
    Failed and interrupted trials keep their newest (for --resume), and the older ones until the newest
    has existed for `grace_s`, also at the end of the search. Local storage only: with a URI
    storage Ray keeps the newest two per trial."""

    def __init__(self, train_runs: str | None, *, keep_finished: bool = False, grace_s: float = 10.0,
                 interval_s: float = 2.0):
        self.train_runs = train_runs  # the train executor's Ray Train runs, one folder per trial id
        self.keep_finished = keep_finished
        self.grace_s, self.interval_s = grace_s, interval_s
        self.folders: dict[str, list[Path]] = {}  # trial id -> folders that hold its checkpoints
        self.done: dict[str, float] = {}  # trial id -> when Tune completed or stopped it
        self.active: set[str] = set()  # trials that started or reported in this run
        self._last = 0.0

    def on_trial_start(self, iteration, trials, trial, **info):
        self.active.add(trial.trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.active.add(trial.trial_id)
        self._track(trial)
        if time.time() - self._last > self.interval_s:
            self._sweep()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._track(trial)
        self.done[trial.trial_id] = time.time()
        self._sweep()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._track(trial)

    def on_experiment_end(self, trials, **info):
        from ray.tune.experiment import Trial

        for trial in trials:
            self._track(trial)
            # Finished before a resume (restored as terminated, never run again): long done.
            if trial.status == Trial.TERMINATED and trial.trial_id not in self.active:
                self.done.setdefault(trial.trial_id, 0.0)
        self._sweep()

    def final_sweep(self, wait_s: float = 0.0) -> None:
        """After the search (its last snapshot is written): a stopped Train worker may persist one
        more checkpoint within a second or two of its trial, so wait, then sweep the trials Tune
        finished without grace. An interrupted trial keeps the grace: its worker may have persisted a
        checkpoint whose report the driver never took in, so the last snapshot names an older one,
        the one `--resume` restores."""
        time.sleep(wait_s)
        self._sweep(final=True)

    def _track(self, trial) -> None:
        if trial.trial_id not in self.folders:
            folders = [Path(trial.path)] if getattr(trial, "path", None) else []
            if self.train_runs:
                folders.append(Path(self.train_runs) / trial.trial_id)
            self.folders[trial.trial_id] = folders

    def _sweep(self, final: bool = False) -> None:
        """`final`: after the search's last snapshot, a trial Tune finished needs no grace."""
        import shutil

        now = self._last = time.time()
        for trial_id, folders in self.folders.items():
            finished = trial_id in self.done and (final or now - self.done[trial_id] > self.grace_s)
            for folder in folders:
                ckpts = sorted(p for p in folder.glob("checkpoint_*") if p.is_dir())
                if not ckpts:
                    continue
                if finished and not self.keep_finished:
                    doomed = ckpts
                elif (finished and final) or now - _mtime(ckpts[-1]) > self.grace_s:
                    doomed = ckpts[:-1]
                else:
                    continue
                for ckpt in doomed:
                    shutil.rmtree(ckpt, ignore_errors=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def write_hparams(writer, config: dict, trial, metric: str) -> None:
    """The HParams plugin's session summaries in the trial's own run (torch's add_hparams would
    start a new run folder per call). No experiment summary: TensorBoard shows the first one it
    finds, which lists only its own trial's hyperparameters (conditional ones such as momentum,
    for SGD trials only, went missing); without one it lists every hyperparameter any trial has,
    and every scalar as a metric."""
    from torch.utils.tensorboard.summary import hparams

    lower = results.lower_is_better(metric)
    stats = (getattr(trial, "metric_analysis", {}) or {}).get(metric, {})
    best = stats.get("min" if lower else "max")
    values = {k: _hparam(v) for k, v in config.items()}
    metrics = {}
    if best is not None:
        metrics[f"best_{metric}"] = float(best)
        writer.add_scalar(f"best_{metric}", float(best), int((trial.last_result or {}).get("epoch", 0)))
    last = (trial.last_result or {}).get("val_acc")
    if last is not None:
        metrics["val_acc"] = float(last)
    _, ssi, sei = hparams(values, metrics)
    for summary in (ssi, sei):
        writer.file_writer.add_summary(summary)
    writer.flush()


def _hparam(value):
    if isinstance(value, bool):  # torch's hparams() would store it as the number 1.0 or 0.0
        return str(value).lower()
    if isinstance(value, (int, float, str)):
        return value
    return str(value)
