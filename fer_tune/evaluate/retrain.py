"""`fer-tune retrain EXPERIMENT`: the best configuration(s) of a search, retrained from scratch
with the full budget, selected on val, tested once.

    from fer_tune.evaluate import retrain
    metrics = retrain("cnn-20250101-120000", seeds=3, tta=True)

What it does:

1. reads the experiment's table and takes the trial of `rank` (default 1), or the `top_k` best;
2. trains each config `seeds` times from scratch on the full train split (`fit`, the one loop),
   for `epochs` = `epoch_factor` x the space's `max_epochs` unless `--epochs`/`--time-budget` say
   otherwise; each run keeps the weights of its best val epoch (the search metric);
   with `screen` K the K best configs first train for `screen_budget` seconds each on the same
   train split (their first seed) and only the one with the best val score is retrained: see
   `screen_configs`;
3. only then reads the test split, and scores every final model on it exactly once
   (`score_on_test`); with `top_k` > 1 the K models of a seed are also averaged (softmax) into an
   ensemble, scored from the same probabilities;
4. writes `<experiment>/final/`: runs/<name>/ (best.pt, config.yaml, metrics.csv, TensorBoard
   events), metrics.json, report.md and its plots. The folder is built under a temp name and
   renamed at the end: an interrupted retrain leaves no half-written final/.

Why 2 x max_epochs by default: ASHA's max_t was chosen to *rank* configurations cheaply, and the
learning-rate schedules (cosine, one-cycle) are stretched to whatever epoch count they are given;
the FER-2013 results we compare with train 50-300 epochs. Twice the search's longest budget is a
middle ground a laptop can still afford; `--epoch-factor` or `--epochs` change it.

With `address` each run (config x seed) is a Ray Train run (a one-worker `TorchTrainer`, with
`cpus_per_run` CPUs and `gpus_per_run` GPUs), as many at once as the cluster holds; each run's
folder comes back as its Train checkpoint, and the driver writes final/ as in the local case.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from fer_tune.data.decode import file_sha256
from fer_tune.errors import RunFailed, UserError, first_line
from fer_tune.evaluate import report as rep
from fer_tune.evaluate.evaluate import EvalData, probs_of_checkpoint_with_and_without_tta, split_scores
from fer_tune.evaluate.experiment import (Experiment, RankedConfig, check_epochs_or_budget, check_overrides,
                                          read_experiment)
from fer_tune.search.storage import remote_experiment
from fer_tune.train.checkpoint import load_checkpoint
from fer_tune.train.config import TrainConfig, selection_sign
from fer_tune.train.loop import TrainData, fit
from fer_tune.train.report import RunFolderReporter
from fer_tune.train.runtime import applied_tta, tta_description, tta_mode_described

DEFAULT_EPOCH_FACTOR = 2.0
BUDGET_EPOCH_CAP = 100_000  # with a time budget the loop sizes the epochs (timing real steps); a placeholder
DEFAULT_SCREEN_BUDGET = 600.0  # seconds per screened config without --time-budget
SUBSETS = ("all", "no_train_copy")


@dataclass
class RunSpec:
    """One training run of the retrain: a ranked config with one seed."""

    name: str  # rank1-seed0
    rank: int
    trial_id: str
    seed: int
    seed_index: int
    config: TrainConfig
    search_score: float | None = None


@dataclass
class RunResult:
    spec: RunSpec
    run_dir: Path
    config: TrainConfig  # as run (epochs sized by a time budget)
    history: list[dict]
    best: dict
    epochs_run: int
    stop_reason: str
    seconds: float
    test: dict = field(default_factory=dict)
    test_without_tta: dict = field(default_factory=dict)  # with --tta: the same model, no flip

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / "best.pt"


def retrain(experiment: str | Path | None = None, *, storage: str | Path = "results", rank: int | None = None,
            top_k: int | None = None, seeds: int = 1, epochs: int | None = None,
            epoch_factor: float = DEFAULT_EPOCH_FACTOR, time_budget: float | None = None,
            tta: bool | str | None = None, subset: float = 1.0, dataset: str | None = None,
            data_root: str | Path | None = None,
            address: str | None = None, cpus_per_run: float = 1.0, gpus_per_run: float = 0.0,
            device: str | None = None, force: bool = False, progress: bool = True, log=print,
            overrides: dict | None = None, first_seed: int | None = None, screen: int | None = None,
            screen_budget: float | None = None) -> dict:
    """Retrain, test once, write `<experiment>/final/`; returns the metrics written to metrics.json.
    `overrides` (`--set`) change config keys of every retrained config, e.g. {"ema": 0.999};
    `first_seed` replaces the trial's own seed as the first of the `seeds` seeds (so one more seed of
    a recipe can run alone: `--first-seed 1`); `screen` K first trains the K best configs for
    `screen_budget` seconds each (default: a sixth of `time_budget`, else 10 minutes) and retrains
    the one with the best val score."""
    from fer_tune import data as datasets
    from fer_tune.data.prepared import atomic_dir

    t0 = time.time()
    _check_flags(rank, top_k, seeds, epochs, epoch_factor, time_budget, subset, cpus_per_run, gpus_per_run,
                 first_seed, screen, screen_budget)
    if screen:
        screen_budget = screen_budget or (time_budget / 6 if time_budget else DEFAULT_SCREEN_BUDGET)
    overrides = check_overrides(overrides or {}, OWN_FLAGS, "retrain")
    exp = read_experiment(experiment, storage)
    if exp.final_dir.exists() and not force:
        raise UserError(f"{exp.final_dir} already exists; pass --force to replace it (it is replaced only when the "
                        "new retrain has finished)")
    tta = applied_tta(tta)
    ranked = exp.ranked(screen or top_k or rank or 1)
    if rank:
        ranked = ranked[rank - 1:]
    ds = _dataset_of(exp, dataset, data_root, datasets)
    n_epochs, epochs_rule = _epochs(exp, epochs, epoch_factor, time_budget)
    data = TrainData.from_prepared(ds, subset=subset, seed=exp.seed)
    sizes = f"({len(data.train_y)} train / {len(data.val_y)} val images)"
    if screen:
        log(f"screening the {len(ranked)} best configs of {exp.name} on {ds.name} {sizes} for {screen_budget:.0f} s "
            f"each, then retraining the best {seeds} time(s), {epochs_rule}")
    else:
        log(f"retraining {len(ranked)} config(s) x {seeds} seed(s) of {exp.name} on {ds.name} {sizes}, "
            f"{epochs_rule}")
    train_opts = dict(address=address, cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run, storage=str(storage),
                      cloud=remote_experiment(experiment and str(experiment), storage), device=device,
                      progress=progress, log=log)

    # With --force and a transfer/: was it made from one of the models this retrain replaces?
    transfer_source = _transfer_source_hash(exp)
    transfer_goes_stale = transfer_source is not None and transfer_source in _checkpoint_hashes(exp.final_dir)
    with atomic_dir(exp.path, "final") as out:
        try:
            screening = None
            if screen:
                ranked, screening = screen_configs(ranked, data, out / "screen", budget=screen_budget, subset=subset,
                                                   overrides=overrides, first_seed=first_seed, **train_opts)
            specs = plan_runs(ranked, seeds, n_epochs, time_budget or 0.0, subset, overrides, first_seed)
            runs = train_runs(specs, data, out / "runs", **train_opts)
        except RunFailed as exc:  # one run failed: no final model set, so nothing is written
            raise RunFailed(f"{first_line(exc)}; {exp.final_dir} was not written") from None
        # The test split: read once, after every model is final; each model predicts it once.
        test = EvalData.from_prepared(ds, "test")
        # With --tta the same pass also scores each model without it, so both figures come from one
        # evaluation of the final model (nothing is chosen between them).
        probs, plain = {}, {}
        for run in runs:
            without, with_tta = score_on_test(load_checkpoint(run.checkpoint), test.images, tta=tta, device=device)
            probs[run.spec.name] = with_tta if tta else without
            run.test = split_scores(probs[run.spec.name], test.labels, test.classes, test.train_copy)
            if tta:
                plain[run.spec.name] = without
                run.test_without_tta = split_scores(without, test.labels, test.classes, test.train_copy)
        ensembles = _ensembles(runs, probs, test) if len(ranked) > 1 else []
        plain_ensembles = _ensembles(runs, plain, test) if tta and len(ranked) > 1 else []
        metrics = _metrics(exp, ds, ranked, runs, ensembles, test, tta=tta, seeds=seeds, epochs_rule=epochs_rule,
                           overrides=overrides, first_seed=first_seed,
                           subset=subset, seconds=time.time() - t0, plain_ensembles=plain_ensembles,
                           screening=screening)
        write_final_report(out, metrics, runs, ds)
    log(summary_text(metrics, exp.final_dir))
    if transfer_goes_stale:
        log(f"note: {exp.transfer_dir} was made from the model this retrain replaced; redo it with "
            f"fer-tune transfer {exp.name} --to ... --force")
    return metrics


def _checkpoint_hashes(final_dir: Path) -> set[str]:
    return {file_sha256(p) for p in Path(final_dir).glob("runs/*/best.pt")}


def _transfer_source_hash(exp: Experiment) -> str | None:
    """sha256 of the model the experiment's transfer/ started from (None: no readable transfer)."""
    try:
        return json.loads((exp.transfer_dir / "metrics.json").read_text())["source_model_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def score_on_test(state: dict, images: np.ndarray, *, tta: str | None = None,
                  device: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The one place a final model meets the test split, once: its softmax probabilities without
    TTA and, with `tta`, with TTA (else None), both from the same pass."""
    return probs_of_checkpoint_with_and_without_tta(state, images, tta=tta, device=device)


def plan_runs(ranked: list[RankedConfig], seeds: int, epochs: int, time_budget: float, subset: float,
              overrides: dict | None = None, first_seed: int | None = None) -> list[RunSpec]:
    """One run per (config, seed): seeds are `first_seed` (default: the trial's own seed) + 0..seeds-1."""
    specs = []
    for r in ranked:
        for i in range(seeds):
            seed = (r.config.seed if first_seed is None else first_seed) + i
            cfg = TrainConfig.from_dict({**r.config.to_dict(), **(overrides or {}), "epochs": epochs, "seed": seed,
                                         "subset": subset, "time_budget": time_budget},
                                        source=f"--set on trial {r.trial_id}" if overrides else f"trial {r.trial_id}")
            specs.append(RunSpec(name=f"rank{r.rank}-seed{seed}", rank=r.rank, trial_id=r.trial_id, seed=seed,
                                 seed_index=i, config=cfg, search_score=r.score))
    return specs


def screen_configs(ranked: list[RankedConfig], data: TrainData, screen_dir: Path, *, budget: float, subset: float,
                   overrides: dict | None = None, first_seed: int | None = None, log=print,
                   **train_opts) -> tuple[list[RankedConfig], dict]:
    """The last rung of the search, at the retrain's fidelity: each config trains for `budget`
    seconds on the retrain's train split (its first seed, its schedule sized to the budget), and the
    one with the best val score (by its select_metric) goes on to the full retrain. Why: the search
    ranks configs by short trials on a subset, and which one wins an hour-long run can differ
    (README, the CPU-sized search). Val only; the test split is not read. The runs' folders stay
    under `screen_dir` (curves, no checkpoint: they are not final models)."""
    specs = plan_runs(ranked, 1, BUDGET_EPOCH_CAP, budget, subset, overrides, first_seed)
    runs = train_runs(specs, data, screen_dir, log=log, **train_opts)
    metric = runs[0].config.select_metric
    winner = max(runs, key=lambda r: selection_sign(metric) * r.best[metric])  # as the loop picks its best epoch
    rows = []
    for r in runs:
        r.checkpoint.unlink(missing_ok=True)
        rows.append({"rank": r.spec.rank, "trial_id": r.spec.trial_id, "model": r.config.model, "seed": r.spec.seed,
                     "search_score": r.spec.search_score, "epochs_run": r.epochs_run,
                     "best_epoch": r.best.get("epoch"), "seconds": round(r.seconds, 1),
                     "val": {k: v for k, v in r.best.items() if k.startswith("val_")},
                     "folder": f"screen/{r.spec.name}"})
    log("screen: " + ", ".join(f"rank {x['rank']} ({x['model']}) {metric} {x['val'][metric]:.4f} after "
                              f"{x['epochs_run']} epochs" for x in rows) + f"; retraining rank {winner.spec.rank}")
    chosen = next(c for c in ranked if c.rank == winner.spec.rank)
    return [chosen], {"budget_s": budget, "metric": metric, "chosen_rank": chosen.rank, "runs": rows}


# -- training the runs -----------------------------------------------------------------------------

def train_runs(specs: list[RunSpec], data: TrainData, runs_dir: Path, *, address: str | None = None,
               cpus_per_run: float = 1.0, gpus_per_run: float = 0.0, storage: str = "results",
               cloud: str | None = None, device: str | None = None, progress: bool = True,
               log=print) -> list[RunResult]:
    """Train every run: sequentially in this process, or as Ray Train runs with `address`."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    if address:
        return _train_on_ray(specs, data, runs_dir, address, cpus_per_run, gpus_per_run, storage, cloud, log,
                             progress)
    results = []
    for i, spec in enumerate(specs, start=1):
        log(f"[{i}/{len(specs)}] {spec.name}: {spec.config.model}, "
            + (f"as many epochs as fit in {spec.config.time_budget:.0f} s" if spec.config.time_budget else
               f"{spec.config.epochs} epochs"))
        try:
            results.append(run_one(spec, data, runs_dir / spec.name, device=device, progress=progress))
        except RunFailed as exc:
            raise RunFailed(f"retrain run {spec.name} failed: {first_line(exc)}") from None
    return results


def run_one(spec: RunSpec, data: TrainData, run_dir: Path, *, device: str | None = None,
            progress: bool = False, on_epoch=None) -> RunResult:
    """One run into `run_dir`: best.pt (best val epoch), config.yaml, metrics.csv, TensorBoard;
    `on_epoch` gets the run's start line and each epoch's progress line."""
    t0 = time.time()
    result = fit(spec.config, data, RunFolderReporter(run_dir, progress=progress, on_epoch=on_epoch), device=device)
    (run_dir / "last.pt").unlink(missing_ok=True)  # resume state; a finished retrain never resumes
    (run_dir / "config.yaml").write_text(result.config.to_yaml())
    return RunResult(spec=spec, run_dir=run_dir, config=result.config, history=result.history, best=result.best,
                     epochs_run=result.epochs_run, stop_reason=result.stop_reason, seconds=time.time() - t0)


RUN_RECORD = "run.json"  # what a Ray Train run sends back beside its run folder


def _train_worker(config: dict) -> None:
    """Ray Train worker of one retrain run: `run_one` into a temp folder, which goes back to the
    driver as the run's checkpoint (Train uploads it to the run's storage)."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    spec: RunSpec = config["spec"]
    torch.set_num_threads(max(1, config["threads"]))
    device = str(ray.train.torch.get_device()) if config["use_gpu"] else "cpu"
    data = ray.get(config["data"][0])
    lines = config.get("lines")  # the driver's queue for progress lines, when it shows progress
    on_epoch = (lambda line: lines.put(f"{spec.name}: {line.strip()}")) if lines is not None else None
    with tempfile.TemporaryDirectory(prefix="fer-tune-retrain-") as tmp:
        run = run_one(spec, data, Path(tmp) / spec.name, device=device, on_epoch=on_epoch)
        record = {"history": run.history, "best": run.best, "epochs_run": run.epochs_run,
                  "stop_reason": run.stop_reason, "seconds": run.seconds}
        (run.run_dir / RUN_RECORD).write_text(json.dumps(record))
        ray.train.report({"epochs_run": run.epochs_run}, checkpoint=ray.train.Checkpoint.from_directory(run.run_dir))


def _train_run(spec: RunSpec, data_ref: list, storage: str, cpus: float, gpus: float, lines=None) -> dict:
    """Body of the Ray task that drives one retrain run: a one-worker `TorchTrainer` (Ray Train
    V2), whose checkpoint (the run folder) comes back as file contents."""
    import uuid

    import ray.train
    from ray.train.torch import TorchTrainer

    from fer_tune.search.trainable import torch_config, worker_cause, worker_error

    resources = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"spec": spec, "data": data_ref, "threads": int(cpus), "use_gpu": gpus > 0,
                           "lines": lines},
        torch_config=torch_config(1),
        scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=gpus > 0, resources_per_worker=resources),
        run_config=ray.train.RunConfig(name=f"{spec.name}-{uuid.uuid4().hex[:8]}", storage_path=storage,
                                       failure_config=ray.train.FailureConfig(max_failures=0)),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # TrainingFailedError: the worker's own error, readable
        cause = worker_cause(exc)
        if isinstance(cause, UserError):
            raise cause from None
        raise RunFailed(worker_error(exc)) from None
    with result.checkpoint.as_directory() as folder:
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}
    record = json.loads(files.pop(RUN_RECORD))
    config = TrainConfig.from_dict(yaml.safe_load(files["config.yaml"]))
    run = RunResult(spec=spec, run_dir=Path(spec.name), config=config, **record)
    return {"run": run, "files": files}


def _train_on_ray(specs, data, runs_dir, address, cpus, gpus, storage, cloud, log,
                  progress: bool = False) -> list[RunResult]:
    """Each run a Ray Train run (one worker), driven by a zero-CPU Ray task so that as many run at
    once as the cluster holds; the runs' folders come back to this process, and with `progress` each
    epoch's line comes back as it happens (through a zero-CPU Ray queue). Train keeps the runs'
    checkpoints under `<experiment URI>/retrain_runs` for an experiment in cloud storage (`cloud`),
    else in a local folder deleted at the end (refused on a multi-node cluster: its other nodes
    cannot reach it)."""
    import shutil

    import ray
    from ray.util.queue import Queue

    from fer_tune.search import cluster

    started = cluster.connect(None if address == "local" else address, quiet=True)
    local_storage = lines = None
    try:
        capacity = cluster.cluster_capacity()
        cluster.check_fits(capacity, 1, cpus, gpus, None if address == "local" else address,
                           what="one retrain run", flags="--cpus-per-run/--gpus-per-run")
        if cloud:
            train_storage = f"{cloud}/retrain_runs"
        else:
            cluster.check_local_storage(storage, capacity, gpus)
            local_storage = runs_dir.parent / ".ray_train"
            train_storage = str(local_storage.resolve())
        driver = ray.remote(num_cpus=0, max_retries=0)(_train_run)
        data_ref = ray.put(data)
        # Start only what the cluster holds, now or once its autoscaler has added nodes (a Train run
        # whose worker group can never be placed waits and retries without end); at least one.
        most = cluster.autoscaler_max_resources(None if address == "local" else address)
        reach = cluster.reachable_capacity(capacity, most)
        at_once = max(1, cluster.max_concurrency(reach, 1, cpus, gpus))
        queue, pending, results = list(specs), {}, {}
        lines = Queue(actor_options={"num_cpus": 0}) if progress else None
        log(f"{len(specs)} run(s) as Ray Train runs ({cluster.describe(capacity, reach)}; "
            f"{cpus:g} CPU, {gpus:g} GPU per run, {at_once} at a time)")
        while queue or pending:
            while queue and len(pending) < at_once:
                spec = queue.pop(0)
                pending[driver.remote(spec, [data_ref], train_storage, cpus, gpus, lines)] = spec
            # With progress lines, wake up every second to print what the runs have sent.
            done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0 if lines is not None else None)
            if lines is not None:
                for line in lines.get_nowait_batch(lines.qsize()):  # one reader: qsize only grows
                    log(line)
            if not done:
                continue
            spec = pending.pop(done[0])
            try:
                payload = ray.get(done[0])
            except ray.exceptions.RayError as exc:  # the run's error, or its driver's worker or node died
                for ref in pending:
                    ray.cancel(ref, force=True)
                cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                if isinstance(cause, UserError):
                    raise cause from None
                raise RunFailed(f"retrain run {spec.name} failed: {first_line(cause)}") from None
            run: RunResult = payload["run"]
            run.run_dir = runs_dir / spec.name
            for rel, blob in payload["files"].items():
                (run.run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                (run.run_dir / rel).write_bytes(blob)
            results[spec.name] = run
            best = run.best.get(spec.config.select_metric)
            log(f"done {spec.name}: {run.epochs_run} epoch{'s' * (run.epochs_run != 1)}, best {spec.config.select_metric} {best:.4f}")
        return [results[s.name] for s in specs]
    finally:
        if lines is not None:
            lines.shutdown(force=True)  # its actor would outlive us on a cluster we did not start
        if local_storage is not None:
            shutil.rmtree(local_storage, ignore_errors=True)
        cluster.shutdown(started)


# -- metrics ----------------------------------------------------------------------------------------

def _ensembles(runs: list[RunResult], probs: dict, test: EvalData) -> list[dict]:
    """Per seed index: the softmax average of the top-k configs' models."""
    out = []
    for i in sorted({r.spec.seed_index for r in runs}):
        members = [r for r in runs if r.spec.seed_index == i]
        mean = np.mean([probs[r.spec.name] for r in members], axis=0)
        out.append({"name": f"top{len(members)}-seed{i}", "members": [r.spec.name for r in members],
                    "test": split_scores(mean, test.labels, test.classes, test.train_copy)})
    return out


def stats(values: list[float]) -> dict:
    """mean, std (sample std over seeds, 0 for one value) and the values."""
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
            "values": [float(v) for v in arr]}


def summarize(tests: list[dict], classes) -> dict:
    """Mean ± std over final models of accuracy and macro-F1 (full test and no copy in train),
    per-class precision/recall/F1 means, and the pooled confusion matrix."""
    out = {}
    for subset in SUBSETS:
        items = [t[subset] for t in tests if subset in t]
        if not items:
            continue
        cm = np.sum([np.asarray(t["confusion_matrix"]) for t in items], axis=0)
        out[subset] = {
            "accuracy": stats([t["accuracy"] for t in items]),
            "macro_f1": stats([t["macro_f1"] for t in items]),
            "images": items[0]["n"],
            "per_class": {c: {k: stats([t["per_class"][c][k] for t in items]) for k in ("precision", "recall", "f1")}
                          | {"support": items[0]["per_class"][c]["support"]} for c in classes},
            "pooled_confusion_matrix": cm.astype(int).tolist(),
        }
    return out


def trained_counts(counts: dict, subset: float) -> dict:
    """The dataset's images per split and class, with train as the runs had it: under --subset, the
    stratified slice's counts, as split "train (subset F)"."""
    if subset >= 1.0 or "train" not in counts:
        return counts
    from fer_tune.data.splits import stratified_count

    sliced = {c: stratified_count(n, subset) for c, n in counts["train"].items()}
    return {(f"train (subset {subset:g})" if split == "train" else split): (sliced if split == "train" else n)
            for split, n in counts.items()}


def _metrics(exp: Experiment, ds, ranked, runs, ensembles, test: EvalData, *, tta, seeds, epochs_rule, subset,
             seconds, plain_ensembles=(), overrides=None, first_seed=None, screening=None) -> dict:
    final_tests = [e["test"] for e in ensembles] if ensembles else [r.test for r in runs]
    final = {"kind": f"ensemble of the top {len(ranked)} configs (softmax average)" if ensembles else "single model",
             "models": [e["name"] for e in ensembles] or [r.spec.name for r in runs],
             "test": summarize(final_tests, test.classes)}
    if tta:
        plain_tests = [e["test"] for e in plain_ensembles] if plain_ensembles else [r.test_without_tta for r in runs]
        final["test_without_tta"] = summarize(plain_tests, test.classes)
    return {
        "experiment": exp.name,
        "experiment_dir": str(exp.path),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "dataset": {"name": ds.name, "sha256": ds.sha256, "image_shape": list(ds.image_shape),
                    "classes": list(ds.classes), "counts": trained_counts(ds.meta.get("counts", {}), subset),
                    "test_images": int(len(test.labels)),
                    "test_with_train_copy": int(np.sum(test.train_copy)) if test.train_copy is not None else None},
        "protocol": {"selection": f"best val epoch by {runs[0].config.select_metric}", "epochs": epochs_rule,
                     "seeds": seeds, "first_seed": first_seed,  # None: each config's own trial seed
                     "top_k": len(ranked), "tta": tta_description(tta),
                     "train_subset": subset, "test_evaluations_per_model": 1,
                     "search_metric": exp.metric, "search_mode": exp.mode, "overrides": overrides or {},
                     "screen": (f"the top {len(screening['runs'])} configs trained {screening['budget_s']:.0f} s "
                                f"each; rank {screening['chosen_rank']}, best by {screening['metric']}, retrained"
                                if screening else None)},
        "configs": [{"rank": r.rank, "trial_id": r.trial_id, f"search_best_{exp.metric}": r.score,
                     "params": r.params, "config": r.config.to_dict()} for r in ranked],
        "final": final,
        "models": [{"name": r.spec.name, "rank": r.spec.rank, "trial_id": r.spec.trial_id, "seed": r.spec.seed,
                    "checkpoint": f"runs/{r.spec.name}/best.pt", "epochs_run": r.epochs_run,
                    "stop_reason": r.stop_reason, "best_epoch": r.best.get("epoch"), "seconds": round(r.seconds, 1),
                    "val": {k: v for k, v in r.best.items() if k.startswith("val_")}, "config": r.config.to_dict(),
                    "test": r.test} | ({"test_without_tta": r.test_without_tta} if tta else {}) for r in runs],
        "ensembles": ensembles,
        "screen": screening,
        "seconds": round(seconds, 1),
    }


def _tta_short(metrics: dict) -> str:
    """'crops TTA' or 'flip TTA', from the protocol's description of the views (the one record of them)."""
    return f"{tta_mode_described(metrics['protocol']['tta'])} TTA"


def summary_text(metrics: dict, final_dir: Path) -> str:
    test = metrics["final"]["test"]
    lines = [f"final ({metrics['final']['kind']}, {metrics['protocol']['seeds']} seed(s)) on "
             f"{metrics['dataset']['name']} test:"]
    names = {"all": "full test", "no_train_copy": "no copy in train"}
    plain = metrics["final"].get("test_without_tta", {})
    for subset, s in test.items():
        lines.append(f"  {names[subset]:17s} ({s['images']} images): accuracy {rep.pm(s['accuracy'])}, "
                     f"macro-F1 {rep.pm(s['macro_f1'])}" + (f" ({_tta_short(metrics)})" if plain else ""))
        if subset in plain:
            lines.append(f"  {'':17s} without TTA: accuracy {rep.pm(plain[subset]['accuracy'])}, "
                         f"macro-F1 {rep.pm(plain[subset]['macro_f1'])}")
    lines.append(f"written: {final_dir}/ (report.md, metrics.json, runs/*/best.pt)")
    return "\n".join(lines)


# -- report -----------------------------------------------------------------------------------------

def write_final_report(out: Path, metrics: dict, runs: list[RunResult], ds) -> None:
    classes = list(metrics["dataset"]["classes"])
    final = metrics["final"]["test"]
    n_final = len(metrics["final"]["models"])
    plots = {}
    plots["curves"] = rep.plot_learning_curves({r.spec.name: r.history for r in runs}, out / "learning_curves.png",
                                               f"Learning curves ({metrics['experiment']})",
                                               {r.spec.name: r.best.get("epoch") for r in runs}).name
    pooled = f", summed over {n_final} models" if n_final > 1 else ""
    panels = {"full test split": final["all"]["pooled_confusion_matrix"]}
    if "no_train_copy" in final:
        panels["test images with no copy in train"] = final["no_train_copy"]["pooled_confusion_matrix"]
    plots["cm"] = rep.plot_confusions(panels, classes, out / "confusion_matrix.png",
                                      f"{ds.name} test{pooled}").name
    series = {names: {c: (final[k]["per_class"][c]["f1"]["mean"], final[k]["per_class"][c]["f1"]["std"])
                      for c in classes}
              for k, names in (("all", "full test"), ("no_train_copy", "no copy in train")) if k in final}
    plots["f1"] = rep.plot_per_class_f1(series, classes, out / "per_class_f1.png",
                                        "Per-class F1 on test" + (f" (mean ± std over {n_final})" if n_final > 1 else
                                                                  "")).name
    counts = metrics["dataset"]["counts"]
    if counts:
        plots["dist"] = rep.plot_class_distribution(counts, classes, out / "class_distribution.png",
                                                    f"{ds.name} class distribution").name
    rep.write_json(out / "metrics.json", metrics)
    (out / "report.md").write_text(final_markdown(metrics, plots))


def _seeds_text(m: dict) -> str:
    """The seeds each config ran with, where they are the same for every config (else how many)."""
    per_config = {}
    for x in m.get("models", []):
        per_config.setdefault(x.get("rank"), []).append(x.get("seed"))
    lists = {tuple(v) for v in per_config.values()}
    if len(lists) != 1 or None in next(iter(lists)):
        return f"{m['protocol']['seeds']} seed(s) per config"
    seeds = next(iter(lists))
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))}"


def final_markdown(m: dict, plots: dict) -> str:
    p, d, final = m["protocol"], m["dataset"], m["final"]
    test = final["test"]
    classes = d["classes"]
    first = m["configs"][0]
    lines = [f"# Final model of `{m['experiment']}`", ""]
    configs = ", ".join(f"rank {c['rank']} (trial `{c['trial_id']}`, {c['config']['model']})" for c in m["configs"])
    lines += [
        f"{final['kind'].capitalize()} from {configs}, retrained from scratch on "
        + (f"the full `{d['name']}` train split " if p["train_subset"] >= 1 else
           f"a stratified {p['train_subset']:.0%} of the `{d['name']}` train split (--subset) ")
        + f"with {_seeds_text(m)}; epochs: {p['epochs']}. Each run keeps the weights of its {p['selection']}; "
        f"the test split ({d['test_images']} images) was scored once per model, after training. "
        f"Test-time augmentation: {p['tta']}.", ""]
    if m.get("screen"):
        sc = m["screen"]
        lines += ["## Screening", "", f"Before the retrain, the search's {len(sc['runs'])} best configs each trained "
                  f"for {sc['budget_s']:.0f} s on the same train split; the best by {sc['metric']} (rank "
                  f"{sc['chosen_rank']}) was retrained. Curves in `screen/`.", ""]
        rows = [[x["rank"], f"`{x['trial_id']}`", x["model"], x["search_score"], x["epochs_run"], x["best_epoch"],
                 x["val"].get(sc["metric"]), "retrained" if x["rank"] == sc["chosen_rank"] else ""]
                for x in sc["runs"]]
        lines += [rep.md_table(["rank", "trial", "model", f"search {m['protocol']['search_metric']}", "epochs",
                                "best epoch", sc["metric"], ""], rows), ""]
    lines += ["## Test results", ""]
    rows = []
    names = {"all": "full test split", "no_train_copy": "test images with no copy in train"}
    plain = final.get("test_without_tta", {})
    for subset, s in test.items():
        rows.append([names[subset], s["images"], rep.pm(s["accuracy"]), rep.pm(s["macro_f1"])]
                    + ([rep.pm(plain[subset]["accuracy"]), rep.pm(plain[subset]["macro_f1"])] if plain else []))
    head = ["evaluated on", "images", "accuracy", "macro-F1"]
    if plain:
        short = _tta_short(m)
        head = ["evaluated on", "images", f"accuracy ({short})", f"macro-F1 ({short})", "accuracy (no TTA)",
                "macro-F1 (no TTA)"]
    lines += [rep.md_table(head, rows), ""]
    if d.get("test_with_train_copy"):
        lines += [f"{d['test_with_train_copy']} test images have a pixel-identical copy in train; the second row "
                  "leaves them out (the first is comparable with published FER-2013 figures).", ""]
    if p["seeds"] > 1:
        lines += ["± is the sample standard deviation over seeds.", ""]
    lines += ["## Where it confuses classes", "", f"![confusion matrix]({plots['cm']})", ""]
    top = rep.top_confusions(test["all"]["pooled_confusion_matrix"], classes, 5)
    if top:
        models = len(final.get("models") or []) or 1  # the pooled matrix sums every final model's predictions
        kind = "ensembles" if final["kind"].startswith("ensemble") else "models"

        def count(n, share):
            total = round(n / share)
            return f"{n} images" if models == 1 else f"{n} of {total} predictions: {models} {kind} x {total // models} images"

        lines += ["Largest confusions (share of the true class):", ""]
        lines += [f"- **{t}** predicted as **{pr}**: {share * 100:.1f} % ({count(n, share)})" for t, pr, share, n in top]
        lines.append("")
    lines += ["## Per-class scores", "", f"![per-class F1]({plots['f1']})", ""]
    rows = [[c, test["all"]["per_class"][c]["precision"]["mean"], test["all"]["per_class"][c]["recall"]["mean"],
             test["all"]["per_class"][c]["f1"]["mean"], test["all"]["per_class"][c]["support"]] for c in classes]
    lines += [rep.md_table(["class", "precision", "recall", "F1", "support"], rows), ""]
    lines += ["## Models", ""]
    rows = [[x["name"], x["seed"], x["epochs_run"], x["best_epoch"], x["val"].get("val_acc"),
             x["test"]["all"]["accuracy"], x["test"]["all"]["macro_f1"],
             x["test"].get("no_train_copy", {}).get("accuracy"), f"`{x['checkpoint']}`"] for x in m["models"]]
    rows += [[e["name"], "", "", "", "", e["test"]["all"]["accuracy"], e["test"]["all"]["macro_f1"],
              e["test"].get("no_train_copy", {}).get("accuracy"), "ensemble of " + ", ".join(e["members"])]
             for e in m["ensembles"]]
    lines += [rep.md_table(["model", "seed", "epochs", "best epoch", "val acc", "test acc", "test macro-F1",
                            "test acc (no copy)", "checkpoint"], rows), ""]
    lines += ["## Learning curves", "", f"![learning curves]({plots['curves']})", "",
              "TensorBoard: `tensorboard --logdir runs/` (one run per model).", ""]
    if "dist" in plots:
        lines += ["## Data", "", f"![class distribution]({plots['dist']})", ""]
        counts = d["counts"]
        rows = [[s, *(counts[s].get(c, 0) for c in classes), sum(counts[s].values())] for s in counts]
        lines += [rep.md_table(["split", *classes, "total"], rows), ""]
    lines += ["## Configuration", "", f"Rank {first['rank']} (trial `{first['trial_id']}`), as retrained:", "", "```yaml"]
    cfg = dict(m["models"][0]["config"])
    lines += [yaml.safe_dump(cfg, sort_keys=False).rstrip(), "```", ""]
    lines += [f"Made by `fer-tune retrain` in {m['seconds']:.0f} s on {m['created']}; all numbers are in "
              "`metrics.json`.", ""]
    return "\n".join(lines)


# -- checks -----------------------------------------------------------------------------------------

def _check_flags(rank, top_k, seeds, epochs, epoch_factor, time_budget, subset, cpus, gpus, first_seed=None,
                 screen=None, screen_budget=None) -> None:
    if sum(x is not None for x in (rank, top_k, screen)) > 1:
        raise UserError("--rank, --top-k and --screen exclude each other: retrain one config (--rank N), ensemble "
                        "the K best (--top-k K), or retrain the best of the K best after a short run each (--screen K)")
    if screen is not None and screen < 2:
        raise UserError(f"--screen {screen}: must be >= 2 (the number of top configs to compare)")
    if screen_budget is not None and (screen is None or not screen_budget > 0):
        raise UserError(f"--screen-budget {screen_budget}: needs --screen K and a duration > 0, e.g. 10m")
    if rank is not None and rank < 1:
        raise UserError(f"--rank {rank}: must be >= 1 (1 = the best trial)")
    if top_k is not None and top_k < 1:
        raise UserError(f"--top-k {top_k}: must be >= 1")
    if seeds < 1:
        raise UserError(f"--seeds {seeds}: must be >= 1")
    if first_seed is not None and first_seed < 0:
        raise UserError(f"--first-seed {first_seed}: must be >= 0")
    check_epochs_or_budget(epochs, time_budget)
    if not epoch_factor > 0:
        raise UserError(f"--epoch-factor {epoch_factor}: must be > 0")
    if not 0 < subset <= 1:
        raise UserError(f"--subset {subset}: must be a fraction of train in (0, 1]")
    if not cpus > 0 or gpus < 0:
        raise UserError(f"--cpus-per-run {cpus} / --gpus-per-run {gpus}: need > 0 CPUs and >= 0 GPUs")


OWN_FLAGS = {"epochs": "use --epochs or --time-budget", "time_budget": "use --time-budget",
             "seed": "use --seeds or --first-seed", "subset": "use --subset"}


def _dataset_of(exp: Experiment, dataset: str | None, data_root, datasets):
    name = dataset or exp.dataset
    if not name or name == "in-memory":
        raise UserError(f"{exp.path}: search.yaml does not name a prepared dataset "
                        f"({'the search ran on in-memory data' if name else 'no search.yaml'}); pass --dataset NAME")
    ds = datasets.load(name, data_root)
    if dataset is None and exp.dataset_sha256 and ds.sha256 != exp.dataset_sha256:
        raise UserError(f"{ds.path}: prepared from a different source (sha256 {ds.sha256[:12]}...) than the one "
                        f"{exp.name} searched on ({exp.dataset_sha256[:12]}...); prepare the same source again, or "
                        f"pass --dataset {name} to retrain on this one anyway")
    return ds


def _epochs(exp: Experiment, epochs, factor, time_budget) -> tuple[int, str]:
    if epochs:
        return int(epochs), f"{epochs} (--epochs)"
    if time_budget:
        return BUDGET_EPOCH_CAP, f"as many as fit in {time_budget:.0f} s per run (--time-budget)"
    if not exp.max_epochs:
        raise UserError(f"{exp.path}: search.yaml has no max_epochs to scale; pass --epochs N")
    n = max(1, int(round(exp.max_epochs * factor)))
    return n, f"{n} = {factor:g} x the search's max_epochs {exp.max_epochs}"
