"""`run_search`: Ray Tune + OptunaSearch (TPE) + ASHA over a search space, trials via Ray Train.

    from fer_tune.search import run_search
    summary = run_search("smoke", data, trials=8, storage="results", executor="direct")
    print(summary.text())

`data` is a `TrainData` (tests, notebooks) or the name of a prepared dataset. The data is
`ray.put` once and shared by every trial. The Optuna study lives in `<experiment>/optuna.journal`,
so a resumed search keeps what the sampler learned and `optuna.importance` can read it:

    study = optuna.load_study(study_name=NAME, storage=journal_storage(EXP / "optuna.journal"))
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fer_tune.errors import UserError
from fer_tune.search import results, snapshot
from fer_tune.search import storage as storage_mod
from fer_tune.search.callbacks import CheckpointCleanup, TablesCallback, TensorBoardCallback
from fer_tune.search.storage import driver_cache, experiment_folder
from fer_tune.search.space import SearchSpace, load_space, space_from_record
from fer_tune.search.trainable import TrialSetup, direct_trial, train_trial
from fer_tune.train.loop import TrainData

EXECUTORS = ("train", "direct")
SAMPLERS = ("tpe", "random")
JOURNAL = "optuna.journal"
# How often Tune snapshots the experiment state (trial statuses, searcher, callbacks); Ray's
# default is every >= 10 s. A trial that finished after the last snapshot would run again after
# a SIGKILL of the driver, so the search snapshots every second (cheap: small JSON and pickles).
EXPERIMENT_SNAPSHOT_S = "1"


@dataclass
class SearchSummary:
    name: str
    path: str  # experiment folder (local path or URI)
    table: Any  # pandas DataFrame, best first
    metric: str
    mode: str
    max_epochs: int
    seconds: float
    interrupted: bool = False
    counts: dict = field(default_factory=dict)
    best: dict | None = None
    best_config: dict | None = None

    @property
    def epochs_spent(self) -> int:
        return int(self.table["epochs"].sum()) if len(self.table) else 0

    @property
    def epochs_without_early_stopping(self) -> int:
        return len(self.table) * self.max_epochs

    def text(self) -> str:
        c = self.counts
        lines = [f"search {self.name}: {len(self.table)} trials: {c.get('completed', 0)} completed, "
                 f"{c.get('stopped early', 0)} stopped early, {c.get('failed', 0)} failed"
                 + (f", {c.get('interrupted', 0) + c.get('running', 0) + c.get('pending', 0)} interrupted"
                    if self.interrupted else "") + f" in {self.seconds:.0f} s",
                 f"epochs spent: {self.epochs_spent} of {self.epochs_without_early_stopping} without early "
                 f"stopping ({len(self.table)} trials x {self.max_epochs} epoch{'s' * (self.max_epochs != 1)})"]
        if self.best:
            lines.append(f"best: trial {self.best['trial_id']}  {self.metric} {self.best.get('best_' + self.metric):.4f}"
                         f"  ({self.best.get('epochs')} epoch{'s' * (self.best.get('epochs') != 1)})")
            lines.append("best config: " + json.dumps(self.best_config or {}, default=str))
        lines.append(f"results: {self.path}  (fer-tune trials {self.path}; fer-tune board {self.path})")
        if self.interrupted:
            lines.append(f"interrupted: continue with `{results.resume_command(self.name, self.path)}`")
        return "\n".join(lines)


def run_search(space: SearchSpace | str, data: TrainData | str, *, trials: int | None = None,
               max_epochs: int | None = None, grace_period: int | None = None, reduction_factor: int | None = None,
               promotion_window: int | None = None,
               metric: str | None = None, mode: str | None = None, subset: float = 1.0,
               storage: str | Path = "results", name: str | None = None, address: str | None = None,
               executor: str = "train", workers_per_trial: int = 1, cpus_per_trial: float = 1.0,
               gpus_per_trial: float = 0.0, concurrency: int | None = None, seed: int = 0, resume: bool = False,
               retry_failed: bool = False, max_failures: int = 0, data_root: str | None = None,
               num_cpus: int | None = None, progress: bool = True, report_interval_s: float = 0.5,
               table_refresh_s: float = 10.0, checkpoint_every: int = 1, sampler: str = "tpe",
               early_stopping: bool = True, keep_checkpoints: bool = False,
               flags: dict | None = None, resume_flags: dict | None = None) -> SearchSummary:
    """Run (or with `resume=True` continue) a search and return its summary.

    Resources are per worker: a trial has `workers_per_trial` workers of `cpus_per_trial` CPUs and
    `gpus_per_trial` GPUs each (fractional GPUs share a device). `concurrency` defaults to what the
    cluster holds. `address`: None starts a local Ray instance (with `num_cpus`), "auto" or
    "ray://..." joins a cluster. `sampler="random"` and `early_stopping=False` (no ASHA) are the
    baselines of benchmarks/search_efficiency.py. A trial's checkpoints are deleted when it
    finishes unless `keep_checkpoints`. `resume_flags`: the flags a user gave with `resume=True`;
    those that say otherwise than the search was started with are named as ignored.
    """
    t_start = time.time()
    if sampler not in SAMPLERS:
        raise UserError(f"--sampler {sampler}: choose one of {', '.join(SAMPLERS)}")
    _check_flags(executor, workers_per_trial, cpus_per_trial, gpus_per_trial, concurrency, subset, trials,
                 max_failures, report_interval_s)
    shared_path = str(storage).startswith("file://")  # the user vouches that every node mounts it
    storage = storage_mod.normalize(storage)
    if resume:
        # Continue the search as it was started: its space, budget, data, seed, sampler and executor.
        name = _experiment_name(name, None, storage, resume=True)
        local_dir = experiment_folder(storage, name)
        if local_dir is None:  # the record, journal and tables come back from the URI (any machine can resume)
            storage_mod.fetch(f"{storage}/{name}", driver_cache(name))
        record = _read_record(local_dir or driver_cache(name), storage, name)
        if local_dir is not None:  # Tune's own copy may be cut short or mixed (the driver was killed mid-copy)
            snapshot.restore(local_dir)
            broken = snapshot.cut_short(local_dir)
            if broken:
                raise UserError(f"--resume: {local_dir / broken[0]} is cut short (the search was killed while Ray "
                                "Tune saved it) and no complete copy exists; start it again under a new --name")
        _check_restorable(f"{storage.rstrip('/')}/{name}")
        space, saved = _saved_search(record)
        ignored = resume_ignored(record, resume_flags or {})
        if ignored:
            print(f"fer-tune: note: --resume continues {name} as it was started; ignored: {', '.join(ignored)}",
                  file=sys.stderr)
        trials, executor, seed, subset = saved["trials"], saved["executor"], saved["seed"], saved["subset"]
        workers_per_trial, cpus_per_trial = saved["workers_per_trial"], saved["cpus_per_trial"]
        gpus_per_trial, sampler = saved["gpus_per_trial"], saved.get("sampler", "tpe")
        early_stopping = saved.get("early_stopping", True)
        if not isinstance(data, TrainData):
            if record["dataset"]["name"] == "in-memory":
                raise UserError(f"--resume {name}: this search ran on in-memory data; pass the same TrainData again")
            data = record["dataset"]["name"]
    else:
        space = load_space(space) if isinstance(space, (str, Path)) else space
        space = space.with_budget(max_epochs=max_epochs, grace_period=grace_period, reduction_factor=reduction_factor,
                                  promotion_window=promotion_window, metric=metric, mode=mode)
        trials = trials or space.trials
        name = _experiment_name(name, space, storage, resume=False)
        local_dir = experiment_folder(storage, name)
        if local_dir is not None and local_dir.exists() and any(local_dir.iterdir()):
            raise UserError(f"--name {name}: {local_dir} already exists; use --resume to continue it or another --name")
        if local_dir is not None:
            storage_mod.check_can_create(local_dir, storage)
    train_data, dataset_info = _resolve_data(data, subset, seed, data_root)
    if resume and record["dataset"].get("sha256") not in (None, dataset_info["sha256"]):
        raise UserError(f"--resume {name}: dataset {dataset_info['name']} changed since the search started "
                        f"(sha256 {dataset_info['sha256'][:12]}..., was {record['dataset']['sha256'][:12]}...)")

    import ray
    from fer_tune.search import cluster

    started = cluster.connect(address, num_cpus=num_cpus, quiet=True)
    # the daemons of the instance this command started (a refused second instance means there are no others)
    own_daemons = cluster.ray_processes() if started and not address and not os.environ.get("RAY_ADDRESS") else []
    try:
        if started and not cluster.check_state_api():
            print("fer-tune: warning: the Ray dashboard's State API does not answer; Ray Train may leak the "
                  "placement groups of stopped trials (install ray[default])", file=sys.stderr)
        capacity = cluster.cluster_capacity()
        # An autoscaling cluster (cluster/gpu.yaml) may start with no GPUs at all: concurrency comes
        # from what it can grow to, and Tune's waiting trials are what make the autoscaler add nodes.
        reach = cluster.reachable_capacity(capacity, cluster.autoscaler_max_resources(address))
        if progress:
            where = "a local Ray instance" if started and not address else f"Ray at {address or 'the connected cluster'}"
            print(f"fer-tune: {executor} executor on {where} ({cluster.describe(capacity, reach)}); "
                  "inspect it with `RAY_AUTH_MODE=token ray status` (token authentication is on by default)")
            local = started and not address
            for note in (fp32_note(space, capacity, local), cpu_budget_note(space, trials, subset, capacity, local)):
                if note:
                    print(f"fer-tune: note: {note}")
        cluster.check_fits(capacity, workers_per_trial, cpus_per_trial, gpus_per_trial, address)
        if local_dir is not None and not shared_path:
            cluster.check_local_storage(storage, capacity, gpus_per_trial)
        holds = cluster.max_concurrency(reach, workers_per_trial, cpus_per_trial, gpus_per_trial)
        concurrency = concurrency or holds
        if concurrency > holds and not address and executor == "train":
            print(f"fer-tune: warning: --concurrency {concurrency} > the {holds} trials this machine holds; "
                  "the extra trials' worker groups wait for CPUs", file=sys.stderr)
        work_dir = local_dir or driver_cache(name)
        storage_mod.make_folder(work_dir, storage)
        exp_path = str(local_dir) if local_dir else f"{storage}/{name}"
        setup = TrialSetup(space=space, epochs=space.max_epochs, seed=seed, subset=subset, executor=executor,
                           workers=workers_per_trial, cpus_per_worker=cpus_per_trial, gpus_per_worker=gpus_per_trial,
                           train_storage=f"{storage.rstrip('/')}/{name}/train_runs", report_interval_s=report_interval_s,
                           checkpoint_every=checkpoint_every,
                           num_to_keep=None if local_dir is not None else 2,
                           finished=results.finished_trials(work_dir) if resume else {})
        record = _record(space, dataset_info, name, storage, dict(
            trials=trials, executor=executor, workers_per_trial=workers_per_trial, cpus_per_trial=cpus_per_trial,
            gpus_per_trial=gpus_per_trial, concurrency=concurrency, seed=seed, subset=subset, address=address,
            max_failures=max_failures, sampler=sampler, early_stopping=early_stopping, **(flags or {})))
        _write_yaml(work_dir / "search.yaml", {**record, "status": "running", "driver": cluster.driver_record()},
                    keep_from=work_dir / "search.yaml")
        if local_dir is None:  # `fer-tune trials s3://...` shows it running (and whether its driver is)
            storage_mod.upload(work_dir, f"{storage}/{name}", items=("search.yaml",))

        data_ref = ray.put(train_data)
        trainable = _trainable(setup, data_ref)
        tables = TablesCallback(str(local_dir) if local_dir else None, metric=space.metric, mode=space.mode,
                                max_epochs=space.max_epochs, setup=setup, params=list(space.params),
                                refresh_s=table_refresh_s)
        tuner = _tuner(trainable, space, setup, name=name, storage=storage, trials=trials, seed=seed,
                       concurrency=concurrency, max_failures=max_failures, journal=work_dir / JOURNAL,
                       tables=tables, progress=progress, resume=resume, retry_failed=retry_failed,
                       sampler=sampler, early_stopping=early_stopping, keep_checkpoints=keep_checkpoints)
        with cluster.env(TUNE_GLOBAL_CHECKPOINT_S=os.environ.get("TUNE_GLOBAL_CHECKPOINT_S", EXPERIMENT_SNAPSHOT_S),
                         TUNE_DISABLE_AUTO_CALLBACK_LOGGERS="1", RAY_AIR_NEW_OUTPUT="0",
                         TUNE_MAX_PENDING_TRIALS_PG=str(concurrency)), \
                (snapshot.kept(local_dir) if local_dir is not None else contextlib.nullcontext()), \
                cluster.exit_if_the_instance_ends(own_daemons, lambda: _lost_ray(tables, work_dir, name, exp_path)):
            grid = tuner.fit()
        for callback in _callbacks(tuner):
            if isinstance(callback, CheckpointCleanup):
                callback.final_sweep(wait_s=2.0 if executor == "train" else 0.0)
        all_trials = tables.trials or getattr(getattr(grid, "_experiment_analysis", None), "trials", None) or []
        tables.write(all_trials)
        frame = tables.frame if tables.frame is not None else results.build_table([], space.metric, space.mode)
        counts = frame["status"].value_counts().to_dict() if len(frame) else {}
        interrupted = bool(counts.get("interrupted") or counts.get("running") or counts.get("pending")) \
            or len(frame) < trials
        best = results.best_row(frame, space.metric)
        best_config = None
        if best is not None:
            best_config = next((t.config for t in all_trials if t.trial_id == best["trial_id"]), None)
        summary = SearchSummary(name=name, path=exp_path, table=frame,
                                metric=space.metric, mode=space.mode, max_epochs=space.max_epochs,
                                seconds=time.time() - t_start, interrupted=interrupted, counts=counts, best=best,
                                best_config=best_config)
        _write_yaml(work_dir / "search.yaml", {**record, "status": "interrupted" if interrupted else "finished",
                                               "counts": counts, "epochs_spent": summary.epochs_spent,
                                               "epochs_without_early_stopping": summary.epochs_without_early_stopping,
                                               "seconds": round(summary.seconds, 1)}, keep_from=work_dir / "search.yaml")
        if local_dir is None:
            storage_mod.upload(work_dir, f"{storage}/{name}")
        return summary
    finally:
        cluster.shutdown(started)


# -- pieces -------------------------------------------------------------------------------------

def _trainable(setup: TrialSetup, data_ref):
    from ray import tune

    fn = train_trial if setup.executor == "train" else direct_trial
    trainable = tune.with_parameters(fn, setup=setup, data_ref=[data_ref])
    if setup.executor == "train":
        # The trial itself only waits on its TorchTrainer, whose worker group reserves the CPUs/GPUs;
        # Tune needs some resource in the trial's bundle, so it asks for a little memory.
        return tune.with_resources(trainable, {"cpu": 0, "memory": 64 * 2**20})
    return tune.with_resources(trainable, {"cpu": setup.cpus_per_worker, "gpu": setup.gpus_per_worker})


def _check_restorable(path: str) -> None:
    """--resume needs Ray Tune's experiment state; checked before search.yaml says running again."""
    from ray import tune

    if not tune.Tuner.can_restore(path):
        raise UserError(f"--resume: {path} has no Ray Tune experiment state to resume (it was interrupted "
                        "before the first snapshot); start it again without --resume under a new --name")


def _tuner(trainable, space: SearchSpace, setup: TrialSetup, *, name, storage, trials, seed, concurrency,
           max_failures, journal: Path, tables, progress, resume, retry_failed, sampler="tpe",
           early_stopping=True, keep_checkpoints=False):
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.schedulers import FIFOScheduler

    callbacks = [tables, TensorBoardCallback(space.metric, space.searched()), CSVLoggerCallback(), JsonLoggerCallback()]
    local = experiment_folder(storage, name)
    if local is not None:  # keeps every checkpoint until it is safe to delete (see CheckpointCleanup)
        callbacks.append(CheckpointCleanup(str(local / "train_runs") if setup.executor == "train" else None,
                                           keep_finished=keep_checkpoints))
    reporter = _progress_reporter(space) if progress else None
    failure_config = tune.FailureConfig(max_failures=max_failures)
    if resume:
        path = f"{storage.rstrip('/')}/{name}"
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                   restart_errored=retry_failed)
        # The restored run config holds the first run's callback objects; use this run's (same
        # types, same order: Tune restores their saved state by position).
        if tuner._local_tuner is None:  # Ray Client (ray://): the tuner lives on the head node
            return tuner
        run_config = tuner._local_tuner.get_run_config()
        run_config.callbacks = callbacks
        run_config.progress_reporter = reporter
        run_config.verbose = 1 if progress else 0
        run_config.failure_config = failure_config
        return tuner
    searcher = JournalOptunaSearch(space=space.suggest, metric=space.metric, mode=space.mode,
                                   sampler=make_sampler(seed, trials, sampler), study_name=name,
                                   journal=str(journal), points_to_evaluate=space.startup_points(trials),
                                   max_epochs=space.max_epochs)
    scheduler = make_scheduler(space) if early_stopping else FIFOScheduler()
    run_config = tune.RunConfig(
        name=name, storage_path=storage, callbacks=callbacks, progress_reporter=reporter, verbose=1 if progress else 0,
        failure_config=failure_config, checkpoint_config=tune.CheckpointConfig(num_to_keep=setup.num_to_keep))
    tune_config = tune.TuneConfig(metric=space.metric, mode=space.mode, num_samples=trials, search_alg=searcher,
                                  scheduler=scheduler, max_concurrent_trials=concurrency,
                                  # direct trials run in the trial actor: reusing it saves a process start
                                  # (and a torch import) per trial. A Train trial's actor only waits on
                                  # its TorchTrainer; it is not reused.
                                  reuse_actors=setup.executor == "direct",
                                  trial_dirname_creator=trial_dirname)
    return tune.Tuner(trainable, tune_config=tune_config, run_config=run_config)


def _callbacks(tuner) -> list:
    local = getattr(tuner, "_local_tuner", None)
    return list(local.get_run_config().callbacks or []) if local is not None else []


def _progress_reporter(space: SearchSpace):
    """The live table: our metric columns and the first unconditional searched hyperparameters."""
    from ray import tune

    # Only parameters every trial has: the reporter's best-trial line looks each one up.
    params = [p for p in space.searched() if not space.params[p].when]
    return tune.CLIReporter(
        metric_columns={"epoch": "epoch", "train_loss": "train_loss", "val_loss": "val_loss", "val_acc": "val_acc",
                        "val_macro_f1": "val_macro_f1", "time_total_s": "s"},
        parameter_columns={p: p.replace("model_kwargs.", "") for p in params[:8]},
        sort_by_metric=True, max_report_frequency=15, max_progress_rows=25)


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def fp32_note(space: SearchSpace, capacity: dict[str, float], local: bool) -> str | None:
    """On a local CPU-only instance whose CPU has no native bf16, trials of a space left at
    `precision: auto` train in fp32, several times slower than the figures in the README: say so
    before the first trial, where a user sizes --subset and --max-epochs (a cluster's workers may differ)."""
    from fer_tune.train.runtime import cpu_has_bf16

    precision = space.params.get("precision")
    auto = precision is None or (precision.fixed and precision.candidates() == ["auto"])
    if not local or capacity["GPU"] > 0 or not auto or cpu_has_bf16():
        return None
    return ("this CPU has no native bf16, so trials train in fp32, 3-4x slower than on a CPU with AVX-512 bf16; "
            "size --subset and --max-epochs for that")


# Epochs (trials x max_epochs) on all of train above which a search is GPU-sized: cpu.yaml's 16 x 12
# on half of train took 17.5 min with bf16 here; cnn.yaml's 40 x 30 on all of it would take days.
CPU_EPOCH_BUDGET = 400


def cpu_budget_note(space: SearchSpace, trials: int, subset: float, capacity: dict[str, float],
                    local: bool) -> str | None:
    """A local search without GPUs whose budget is sized for a GPU cluster (cnn.yaml, timm.yaml): say so,
    and name the CPU-sized search, before hours go by."""
    if not local or capacity["GPU"] > 0 or trials * space.max_epochs * subset <= CPU_EPOCH_BUDGET:
        return None
    return (f"{trials} trials x up to {space.max_epochs} epochs on {subset:.0%} of train is sized for GPUs "
            "(hours to days on this CPU); `--space cpu --subset 0.5 --executor direct` is the CPU-sized search, "
            "or pass smaller --trials, --max-epochs and --subset")


def make_sampler(seed: int, trials: int, kind: str = "tpe"):
    """Seeded multivariate TPE; `group` handles the conditional (define-by-run) space and
    `constant_liar` keeps concurrent trials apart. kind="random": plain random search (a baseline).

    Tuned for searches of tens of trials, not Optuna's hundreds: a third of the trials (3..10) start
    at random, and the best quarter of the finished trials is TPE's "good" group (`good_group_size`)
    instead of Optuna's best tenth. With the default tenth, a 16-trial search modelled "good" on one
    or two trials and every real-data run here spent most of its trials next to its best start-up
    trial (README, search efficiency)."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)  # `gamma`: deprecated in Optuna 4.9, to be removed in 6 (pinned <6)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True,
                                          n_startup_trials=min(10, max(3, trials // 3)),
                                          gamma=good_group_size)


def good_group_size(finished: int) -> int:
    """How many of the `finished` trials TPE models as good: the best quarter (at most 25), the
    quantile of the original TPE paper (Bergstra et al. 2011), where Optuna's default takes a tenth."""
    return min(math.ceil(0.25 * finished), 25)


def journal_storage(path: str | Path):
    import optuna

    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def make_scheduler(space: SearchSpace):
    """ASHA on `epoch` with the space's budget: Ray's, or with `promotion_window` N, RecentASHA."""
    from ray.tune.schedulers import ASHAScheduler

    budget = dict(time_attr="epoch", max_t=space.max_epochs, grace_period=space.grace_period,
                  reduction_factor=space.reduction_factor)
    if space.promotion_window:
        return RecentASHA(window=space.promotion_window, **budget)
    return ASHAScheduler(**budget)


def _asha_classes():
    from ray.tune.schedulers.async_hyperband import AsyncHyperBandScheduler, _Bracket

    return AsyncHyperBandScheduler, _Bracket


class _RecentBracket(_asha_classes()[1]):
    """Ray's ASHA bracket, its cut at each rung taken over the last `window` results that reached
    the rung instead of all of them (Ray keeps them in arrival order)."""

    def __init__(self, *args, window: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.window = window

    def cutoff(self, recorded):
        return super().cutoff(dict(list(recorded.items())[-self.window:]))


class RecentASHA(_asha_classes()[0]):
    """ASHA whose bar at a rung is the best 1/reduction_factor of the last `window` trials that
    reached it, not of every trial so far.

    Ray's ASHA promotes a trial that beats (1 - 1/rf) of all earlier results at the rung. That is
    the paper's rule, and sound for a sampler that does not learn (random search). TPE does learn:
    its start-up trials, drawn at random, set a low bar, and its later proposals clear it, so ASHA
    lets most of them run the full budget (README, search efficiency: 20 of 32 trials promoted from
    a 4-epoch rung). A window of the recent results keeps the bar where the sampler is now."""

    def __init__(self, *, window: int, **kwargs):
        super().__init__(**kwargs)
        self._brackets = [_RecentBracket(kwargs["grace_period"], kwargs["max_t"], kwargs["reduction_factor"], s,
                                         window=window, stop_last_trials=self._stop_last_trials)
                          for s in range(len(self._brackets))]


def _searcher_class():
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch


class JournalOptunaSearch(_searcher_class()):
    """OptunaSearch whose study lives in an Optuna journal file next to the experiment. On a
    resume, Optuna trials that were asked but never told (the driver died) are marked failed.

    A trial that ends before `max_epochs` without an error (ASHA stopped it at a rung; or its own
    early_stop_patience, when a space sets one) is told to
    Optuna as PRUNED at the last epoch it reported, not as COMPLETE with that early score as Ray's
    OptunaSearch does. TPE then ranks it below every trial that ran the whole budget, and stopped
    trials among themselves by how far ASHA let them go, then by score: the order ASHA judged them
    in, where COMPLETE would rank a 2-epoch score against 12-epoch ones.

    A trial that ran its whole budget is told its best epoch's value (Ray tells its last), the
    value the trial table ranks by and retrain selects its checkpoint on, so `study.best_trial` is
    the table's best finished trial. Every Optuna trial carries its Tune trial id as the user
    attribute `trial_id`, to find its row in the table."""

    def __init__(self, *args, journal: str, max_epochs: int | None = None, **kwargs):
        import warnings

        import optuna

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            super().__init__(*args, storage=journal_storage(journal), **kwargs)
        self._journal = journal
        self._max_epochs = max_epochs

    def _suggest_from_define_by_run_func(self, func, ot_trial):
        # A trial's config is what the space returns (every active key, real values). Ray would add
        # Optuna's own parameter names, which are not always config keys: an alternative samples
        # `lr[optimizer=sgd]` for `lr`.
        returned: dict = {}

        def run(trial):
            returned.update(func(trial))
            return returned

        super()._suggest_from_define_by_run_func(run, ot_trial)
        return dict(returned)

    def suggest(self, trial_id: str):
        config = super().suggest(trial_id)
        if trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr("trial_id", trial_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict):
        # A trial that finished just before the driver was killed is still running in Tune's last
        # snapshot: on --resume it replays its end, but Optuna was already told (reporting to a
        # finished Optuna trial raises UpdateFinishedTrialError and would end the search).
        if not self._told(trial_id):
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if self._told(trial_id):
            return
        if not error and self._stopped_early(result) and trial_id in self._ot_trials:
            import optuna
            from ray.tune.result import TRAINING_ITERATION

            # Tune hands the result that made ASHA stop the trial only to on_trial_complete: report it
            # first, so that the pruned trial's value is its score at the epoch ASHA judged
            ot_trial, step, value = self._ot_trials[trial_id], result.get(TRAINING_ITERATION), result.get(self.metric)
            reported = self._ot_study._storage.get_trial(ot_trial._trial_id).intermediate_values
            if None not in (step, value) and step not in reported:
                ot_trial.report(value, step)
            self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.PRUNED)
            self._completed_trials.add(trial_id)
            return
        if not error and result and result.get(self.metric) is not None and trial_id in self._ot_trials:
            result = {**result, self.metric: self._best_value(trial_id, result[self.metric])}
        super().on_trial_complete(trial_id, result, error)

    def _best_value(self, trial_id: str, last: float) -> float:
        reported = self._ot_study._storage.get_trial(self._ot_trials[trial_id]._trial_id).intermediate_values
        values = [v for v in (*reported.values(), last) if v is not None and not math.isnan(v)]
        return (max if self.mode == "max" else min)(values) if values else last

    def _stopped_early(self, result: dict | None) -> bool:
        epoch = (result or {}).get("epoch")
        return self._max_epochs is not None and epoch is not None and epoch < self._max_epochs

    def _told(self, trial_id: str) -> bool:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None:
            return False
        return self._ot_study._storage.get_trial(ot_trial._trial_id).state.is_finished()

    def restore(self, checkpoint_path: str):
        super().restore(checkpoint_path)
        import optuna

        known = {t._trial_id for t in self._ot_trials.values()}
        storage = self._ot_study._storage
        for frozen in self._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if frozen._trial_id not in known:
                storage.set_trial_state_values(frozen._trial_id, optuna.trial.TrialState.FAIL)


def _check_flags(executor, workers, cpus, gpus, concurrency, subset, trials, max_failures, report_interval_s):
    if executor not in EXECUTORS:
        raise UserError(f"--executor {executor}: choose one of {', '.join(EXECUTORS)}")
    if not isinstance(workers, int) or workers < 1:
        raise UserError(f"--workers-per-trial {workers}: must be a whole number >= 1")
    if executor == "direct" and workers > 1:
        raise UserError(f"--workers-per-trial {workers} needs --executor train (multi-worker trials run through "
                        "Ray Train; the direct executor runs one worker per trial)")
    if not cpus > 0:
        raise UserError(f"--cpus-per-trial {cpus}: must be > 0")
    if gpus < 0 or (gpus > 1 and not float(gpus).is_integer()):
        raise UserError(f"--gpus-per-trial {gpus}: must be >= 0, a fraction of one GPU or a whole number")
    if concurrency is not None and concurrency < 1:
        raise UserError(f"--concurrency {concurrency}: must be >= 1")
    if not 0 < subset <= 1:
        raise UserError(f"--subset {subset}: must be a fraction of train in (0, 1]")
    if trials is not None and trials < 1:
        raise UserError(f"--trials {trials}: must be >= 1")
    if max_failures < 0:
        raise UserError(f"--max-failures {max_failures}: must be >= 0")
    if report_interval_s <= 0:
        raise UserError(f"report interval {report_interval_s}: must be > 0")




def _read_record(folder: Path, storage: str, name: str) -> dict:
    path = folder / "search.yaml"
    if not path.is_file():
        local = experiment_folder(storage, name)
        known = ", ".join(results.list_experiments(local.parent)) if local else ""
        raise UserError(f"--resume: no search to resume at {folder}; known: {known or 'none'}")
    return yaml.safe_load(path.read_text())


def _saved_search(record: dict) -> tuple[SearchSpace, dict]:
    """The resolved space and the flags a search was started with (from its search.yaml)."""
    return space_from_record(record["space"]), record["flags"]


def resume_ignored(record: dict, given: dict) -> list[str]:
    """The flags given with --resume (`given`: the CLI's key -> value) that say otherwise than the
    search was started with, as `--flag value`: --resume continues the search as it was started."""
    space, saved = _saved_search(record)
    started = {"space": space.name, "trials": saved["trials"], "max_epochs": space.max_epochs,
               "grace_period": space.grace_period, "reduction_factor": space.reduction_factor,
               "promotion_window": space.promotion_window, "metric": space.metric, "mode": space.mode,
               "dataset": record["dataset"]["name"], "subset": saved["subset"], "executor": saved["executor"],
               "workers_per_trial": saved["workers_per_trial"], "cpus_per_trial": saved["cpus_per_trial"],
               "gpus_per_trial": saved["gpus_per_trial"], "seed": saved["seed"],
               "sampler": saved.get("sampler", "tpe"), "no_early_stopping": not saved.get("early_stopping", True)}
    ignored = []
    for key, value in given.items():
        if key not in started or value == started[key] or (key == "space" and Path(str(value)).stem == space.name):
            continue
        ignored.append(f"--{key.replace('_', '-')}" + ("" if value is True else f" {value}"))
    return ignored


def _experiment_name(name: str | None, space: SearchSpace | None, storage: str, resume: bool) -> str:
    if name is not None:
        if not name.strip() or "/" in name or name.startswith("."):
            raise UserError(f"--name {name!r}: use a plain folder name (letters, digits, '-', '_', '.')")
        return name
    if resume:
        local = experiment_folder(storage, "x")
        found = results.list_experiments(local.parent) if local else []
        if not found:
            raise UserError(f"--resume: no experiments under {storage}; give --name")
        return found[-1]
    return f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _resolve_data(data, subset: float, seed: int, data_root):
    """(TrainData, facts for search.yaml) from a TrainData or a prepared dataset's name."""
    if isinstance(data, TrainData):
        data = data.train_subset(subset, seed)
        info = {"name": "in-memory", "sha256": None}
    else:
        from fer_tune import data as datasets

        dataset = datasets.load(str(data), data_root)  # UserError naming the prepare command when missing
        data = TrainData.from_prepared(dataset, subset=subset, seed=seed)
        info = {"name": dataset.name, "sha256": dataset.sha256}
    info.update(train_images=int(len(data.train_y)), val_images=int(len(data.val_y)),
                image_shape=list(data.train_x.shape[1:]), classes=list(data.classes), subset=subset)
    return data, info


def _record(space: SearchSpace, dataset_info: dict, name: str, storage: str, flags: dict) -> dict:
    return {"name": name, "storage": storage, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "space": space.to_dict(), "flags": flags, "dataset": dataset_info, "versions": versions(),
            "git_commit": git_commit(), "host": platform.node()}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("fer-tune", "ray", "torch", "optuna", "timm", "numpy", "pandas"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True,
                           text=True, timeout=5).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def _lost_ray(tables: TablesCallback, work_dir: Path, name: str, exp_path: str) -> None:
    """The local Ray instance ended under the search (a signal to the whole process group): write the
    tables from what the driver knows (trials then running stay `running`) and say how to continue."""
    # The hint first: Ray's client may end the process any moment now (the tables on disk are at most
    # one refresh old, and --resume works from Tune's own snapshot either way).
    print(f"fer-tune: interrupted: this search's Ray instance ended (its processes were stopped, e.g. by a signal "
          f"to the whole process group); continue with `{results.resume_command(name, exp_path)}`",
          file=sys.stderr, flush=True)
    try:
        record = yaml.safe_load((work_dir / "search.yaml").read_text())
        record.pop("driver", None)
        _write_yaml(work_dir / "search.yaml", {**record, "status": "interrupted"})
        tables.write(tables.trials)
    except Exception as exc:  # nothing more can be saved; say so and still leave
        print(f"fer-tune: could not write the tables ({exc})", file=sys.stderr)


def _write_yaml(path: Path, payload: dict, keep_from: Path | None = None) -> None:
    """search.yaml; on a resume, the first run's start time and flags stay, the new ones are added."""
    if keep_from is not None and keep_from.is_file():
        try:
            old = yaml.safe_load(keep_from.read_text()) or {}
        except yaml.YAMLError:
            old = {}
        if old.get("started") and old.get("started") != payload.get("started"):
            resumes = list(old.get("resumed", []))
            if payload.get("status") == "running":
                resumes.append(payload["started"])
            payload = {**payload, "started": old["started"], "resumed": resumes}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(payload, sort_keys=False, default_flow_style=None))
    os.replace(tmp, path)



