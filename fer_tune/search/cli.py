"""`fer-tune search`, `trials`, `board`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from fer_tune.errors import UserError


# What a search is: --resume continues it as it was started, whatever these flags say.
SEARCH_FLAGS = ("space", "trials", "max_epochs", "grace_period", "reduction_factor", "promotion_window", "metric",
                "mode", "dataset", "subset", "executor", "workers_per_trial", "cpus_per_trial", "gpus_per_trial",
                "seed", "sampler", "no_early_stopping")


STORAGE_HELP = "where the experiments live: a folder or s3://, gs:// URI (default ./results)"


def add_commands(sub, data_root_flag) -> None:
    """Add the search commands to the `fer-tune` sub-parsers."""
    from fer_tune.cli import seed_value

    p = sub.add_parser("search", help="hyperparameter search: Ray Tune + Optuna (TPE) + ASHA, trials via Ray Train",
                       description="Search a space of training configs. Resources are per worker: a trial runs "
                                   "--workers-per-trial workers with --cpus-per-trial CPUs and --gpus-per-trial "
                                   "GPUs each.")
    p.add_argument("--space", help="a search space name (search_spaces/NAME.yaml) or a .yaml path "
                                   "(not needed with --resume)")
    p.add_argument("-n", "--trials", type=int, help="number of trials (default: the space's `trials`)")
    p.add_argument("--max-epochs", type=int, help="epochs of a trial that survives every rung (ASHA max_t)")
    p.add_argument("--grace-period", type=int, help="epochs every trial gets before ASHA may stop it")
    p.add_argument("--reduction-factor", type=int, help="ASHA keeps 1/reduction_factor of the trials at each rung")
    p.add_argument("--promotion-window", type=int,
                   help="ASHA's bar at a rung: the best 1/reduction_factor of the last N trials there (default: the "
                        "space's, 0 = of all trials, Ray's ASHA)")
    p.add_argument("--metric", help="metric to optimise (default: the space's, val_acc)")
    p.add_argument("--mode", choices=["max", "min"], help="default: from the space, or min for losses")
    p.add_argument("--dataset", default="fer2013", help="prepared dataset name or path (default fer2013)")
    p.add_argument("--subset", type=float, default=1.0, help="stratified fraction of train, for quick looks")
    p.add_argument("--name", help="experiment name (default: <space>-<time>); with --resume: which to continue")
    p.add_argument("--storage", default="results", help="local folder or URI (s3://, gs://) for experiments")
    p.add_argument("--address", help="Ray cluster to join: auto, ray://host:10001 (default: start a local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--workers-per-trial", type=int, default=1, help=">1: data-parallel (DDP) trials via Ray Train")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per worker (default 1)")
    p.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs per worker, may be fractional (0.5)")
    p.add_argument("--concurrency", type=int, help="trials at once (default: what the cluster holds)")
    p.add_argument("--executor", choices=["train", "direct"], default="train",
                   help="train: each trial a Ray Train run (default); direct: single-worker trials inside the "
                        "Tune trial itself, for small machines (start-up about 1 s per trial instead of 10-20 s)")
    p.add_argument("--seed", type=seed_value, default=0, help="seed of the sampler and of every trial's training")
    p.add_argument("--sampler", choices=["tpe", "random"], default="tpe", help="Optuna TPE (default) or random search")
    p.add_argument("--no-early-stopping", action="store_true", help="no ASHA: every trial trains max-epochs")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted search (--name, default: the latest) as it was started: its space, "
                        "budget, data, seed and executor; --address, --max-failures and --retry-failed apply")
    p.add_argument("--retry-failed", action="store_true", help="with --resume: run failed trials again")
    p.add_argument("--max-failures", type=int, default=0, help="retries of a failing trial (default 0)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep finished trials' checkpoints")
    p.add_argument("--quiet", action="store_true", help="no live table")
    data_root_flag(p)
    p.set_defaults(func=cmd_search, search_defaults={key: p.get_default(key) for key in SEARCH_FLAGS})

    p = sub.add_parser("trials", help="the trial table of a search, best first")
    p.add_argument("experiment", nargs="?", help="experiment name under --storage or a folder (default: latest)")
    p.add_argument("--storage", default="results", help=STORAGE_HELP)
    p.add_argument("--top", type=int, help="only the K best trials")
    p.add_argument("--sort", help="metric (val_acc, val_loss, ...) or column to sort by (default: the search metric)")
    p.add_argument("--format", default="table", choices=["table", "csv", "json", "markdown"])
    p.add_argument("--all-columns", action="store_true", help="every column, not only the key ones")
    p.add_argument("--importance", action="store_true",
                   help="hyperparameter importances (optuna.importance, fANOVA) from the search's Optuna study")
    p.set_defaults(func=cmd_trials)

    p = sub.add_parser("board", help="TensorBoard on a search: per-trial curves and the HParams view")
    p.add_argument("experiment", nargs="?", help="experiment name or folder (default: latest)")
    p.add_argument("--storage", default="results", help=STORAGE_HELP)
    p.add_argument("--port", type=int, default=6006, help="TensorBoard's port (default 6006)")
    p.add_argument("--print", dest="print_only", action="store_true", help="print the command instead of running it")
    p.set_defaults(func=cmd_board)


def cmd_search(args) -> None:
    from fer_tune.search.space import load_space
    from fer_tune.search.tuner import run_search

    if not args.space and not args.resume:
        from fer_tune.search.space import list_spaces

        raise UserError(f"search: --space is required (one of {', '.join(list_spaces())}, or a .yaml path)")
    given = None  # with --resume: the search flags given, each compared with how the search was started
    if args.resume:
        given = {key: value for key, default in args.search_defaults.items() if (value := getattr(args, key)) != default}
    space = load_space(args.space) if args.space and not args.resume else None  # errors before Ray starts
    summary = run_search(
        space, args.dataset, trials=args.trials, max_epochs=args.max_epochs, grace_period=args.grace_period,
        reduction_factor=args.reduction_factor, promotion_window=args.promotion_window, metric=args.metric,
        mode=args.mode, subset=args.subset, storage=args.storage, name=args.name, address=args.address,
        executor=args.executor, workers_per_trial=args.workers_per_trial, cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial, concurrency=args.concurrency, seed=args.seed, resume=args.resume,
        retry_failed=args.retry_failed, max_failures=args.max_failures, data_root=args.data_root,
        num_cpus=args.num_cpus, progress=not args.quiet, sampler=args.sampler,
        early_stopping=not args.no_early_stopping, keep_checkpoints=args.keep_checkpoints,
        flags={"argv": sys.argv[1:], "dataset": args.dataset}, resume_flags=given)
    print(summary.text())
    if summary.interrupted:
        raise KeyboardInterrupt
    if len(summary.table) and summary.best is None:  # every trial failed: exit 1, naming the first error
        from fer_tune.errors import RunFailed, first_line

        errors = [e for e in summary.table.get("error", []) if isinstance(e, str) and e]
        raise RunFailed(f"search {summary.name}: all {len(summary.table)} trials failed"
                        + (f", the first with {first_line(errors[0])}" if errors else "")
                        + f" (each trial's error: `fer-tune trials {summary.path}`)")


def cmd_trials(args) -> None:
    from fer_tune.search import results

    exp = results.find_experiment(args.experiment, args.storage)
    if args.importance:
        print(importances(exp))
        return
    df = results.load_table(exp)
    meta = _search_meta(exp)
    metric = meta.get("metric", "val_acc")
    mode = meta.get("mode", "max")
    columns = None if args.all_columns else results.key_columns(df, meta.get("params", []), metric)
    sort = args.sort
    if args.top is not None and args.top < 1:
        raise UserError(f"--top {args.top}: must be >= 1")
    text = results.format_table(df, args.format, sort=sort, mode=mode if not sort or sort == metric else None,
                                top=args.top, columns=columns)
    if args.format == "table":
        order = f"best {metric} first"
        if sort and sort != metric:
            order = f"by {sort}, {'lowest' if results.sort_ascending(sort) else 'highest'} first"
        print(f"{exp}  ({len(df)} trials, {order}{_state_note(meta, exp)})")
    print(text)


def _state_note(meta: dict, exp: Path) -> str:
    """What the table's statuses mean: nothing for a finished search; for one search.yaml calls running,
    whether its driver still runs (on this machine) or ended without finishing (killed or crashed)."""
    from fer_tune.search import cluster, results, storage

    state = meta.get("status")
    if state in (None, "finished"):
        return ""
    driver = cluster.driver_state(meta.get("driver")) if state == "running" else None
    if driver == "alive":
        return f"; the search is running (driver pid {meta['driver']['pid']}): statuses as of the table's last refresh"
    if driver == "gone":
        name, where = meta.get("name") or Path(exp).name, meta.get("storage") or ""
        command = results.resume_command(name, f"{where.rstrip('/')}/{name}" if storage.is_uri(where) else str(exp))
        return (f"; its driver (pid {meta['driver']['pid']}) ended without finishing, killed or crashed: trials "
                f"shown running were cut short; continue with `{command}`")
    return f"; the search is {state}, or was killed: statuses as of the table's last refresh"


FEW_FOR_IMPORTANCE = 10  # fANOVA's forest on fewer complete trials ranks little but noise


def importances(exp: Path) -> str:
    """optuna.importance over the trials of the experiment's study (optuna.journal) that ran the whole
    budget: Optuna leaves out the PRUNED ones (stopped early by ASHA), whose scores are at fewer epochs."""
    import warnings

    import optuna

    from fer_tune.search.tuner import JOURNAL, journal_storage

    journal = Path(exp) / JOURNAL
    if not journal.is_file():
        raise UserError(f"{exp}: no {JOURNAL} (the Optuna study of the search)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study_name = _search_meta(exp).get("name") or Path(exp).name
    study = optuna.load_study(study_name=study_name, storage=journal_storage(journal))
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(done) < 2:
        raise UserError(f"{exp}: {len(done)} trial(s) ran the whole budget; importances need at least 2 "
                        "(trials ASHA stopped early do not count)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ranked = optuna.importance.get_param_importances(study)
    width = max(len(k) for k in ranked)
    lines = [f"{len(done)} completed trials (full budget), importance of each hyperparameter for "
             f"{study.direction.name.lower()} {_search_meta(exp).get('metric', 'val_acc')} (fANOVA; sums to 1"
             + ("; from so few trials the figures are rough" if len(done) < FEW_FOR_IMPORTANCE else "") + "):"]
    lines += [f"  {k:<{width}}  {v:.3f}" for k, v in ranked.items()]
    return "\n".join(lines)


def cmd_board(args) -> None:
    from fer_tune.search import results, storage

    # TensorBoard reads s3:// itself (through boto3, pip install boto3); the event files stay there.
    exp = storage.remote_experiment(args.experiment, args.storage) or \
        results.find_experiment(args.experiment, args.storage)
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(exp), "--port", str(args.port)]
    shown = f"tensorboard --logdir {exp} --port {args.port}"
    if args.print_only or not _tensorboard_available():
        print(shown)
        return
    print(f"{shown}   (Ctrl-C to stop)")
    try:
        subprocess.run(command, check=False)
    except KeyboardInterrupt:
        pass


def _tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return shutil.which("tensorboard") is not None
    return True


def _sampled(spec) -> bool:
    """Whether a search.yaml parameter is drawn, not fixed: a distribution, or alternatives (a list
    of them, one per condition) of which any is one."""
    return any(isinstance(s, dict) and "value" not in s for s in (spec if isinstance(spec, list) else [spec]))


def _search_meta(exp: Path) -> dict:
    """metric, mode, searched parameter names and status (running / interrupted / finished) from search.yaml."""
    path = Path(exp) / "search.yaml"
    if not path.is_file():
        return {}
    try:
        record = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return {}
    space = record.get("space", {})
    params = [k for k, v in (space.get("params") or {}).items() if _sampled(v)]
    return {"metric": space.get("metric", "val_acc"), "mode": space.get("mode", "max"), "params": params,
            "name": record.get("name"), "status": record.get("status"), "driver": record.get("driver"),
            "storage": record.get("storage")}

