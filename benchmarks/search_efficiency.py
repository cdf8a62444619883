"""How much a search saves, and what it costs. Prints figures; not a test.

On a stratified subset of a prepared dataset (FER-2013 by default), the same number of trials and
the same max epochs:

  1. Optuna TPE + ASHA        (what `fer-tune search` does)
  2. random search, no early stopping (every trial trains max_epochs)
  3. random search + ASHA
  4. (with --promotion-window N) Optuna TPE + ASHA whose bar at a rung is the last N trials there

For each: epochs spent, wall time, best val_acc, and the epochs spent (in report order, over all
trials) until some trial first reached (2)'s best val_acc; and, from (2)'s full learning curves, how
well each ASHA rung ranks the trials (Spearman rho against their final best). Then the overheads:
per-trial time from trial start to its first report (less that epoch's own time) for both
executors; Ray Train's own floor (the train executor's trials with a worker that reports at once
instead of training, one trial at a time); and search (1) against the same trainings (same configs,
same epochs each) in a plain in-process loop.

    python benchmarks/search_efficiency.py                               # cnn space, 12 trials x 6 epochs, 10 %
    python benchmarks/search_efficiency.py --space smoke --subset 0.02 --trials 4 --max-epochs 2   # a quick check
    python benchmarks/search_efficiency.py --space cpu --overhead-only      # the start-up figures alone
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from fer_tune import data as datasets
from fer_tune.search import cluster
from fer_tune.search.space import load_space
from fer_tune.search.tuner import run_search
from fer_tune.train import MemoryReporter, TrainData, fit


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", default="cnn")
    ap.add_argument("--dataset", default="fer2013")
    ap.add_argument("--data-root")
    ap.add_argument("--subset", type=float, default=0.1)
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--max-epochs", type=int, default=6)
    ap.add_argument("--grace-period", type=int, default=1)
    ap.add_argument("--reduction-factor", type=int, default=2)
    ap.add_argument("--promotion-window", type=int, default=0,
                    help="N > 0: add search (4), TPE + ASHA with its bar over the last N results at a rung")
    ap.add_argument("--searches", default="",
                    help="comma-separated subset of tpe_asha,random_full,random_asha,tpe_recent (default: all; "
                         "random_full is always run: its best is the target)")
    ap.add_argument("--executor", default="direct", choices=["train", "direct"], help="for the three searches")
    ap.add_argument("--concurrency", type=int)
    ap.add_argument("--num-cpus", type=int)
    ap.add_argument("--seed", type=int, default=0, help="subset seed, and the first search seed")
    ap.add_argument("--seeds", type=int, default=1,
                    help="run the three searches with N search seeds (seed, seed+1, ...; same subset) and print "
                         "medians: one search of 16 trials is one noisy sample")
    ap.add_argument("--overhead-trials", type=int, default=4, help="trials per executor for the startup figure")
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--overhead-only", action="store_true",
                    help="measure the per-trial start-up alone (no searches, no plain-loop comparison)")
    ap.add_argument("--storage", help="where the experiments go (default: a temporary folder)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error(f"--seeds {args.seeds}: must be >= 1")
    if args.overhead_only and args.skip_overhead:
        ap.error("--overhead-only and --skip-overhead exclude each other")
    keys = [key for key, *_ in SEARCHES if key != "tpe_recent" or args.promotion_window]
    if args.searches:
        unknown = sorted(set(args.searches.split(",")) - set(keys))
        if unknown:
            ap.error(f"--searches: unknown {', '.join(unknown)}; choose from {', '.join(keys)}")
        keys = [key for key in keys if key in args.searches.split(",") or key == "random_full"]

    dataset = datasets.load(args.dataset, args.data_root)
    data = TrainData.from_prepared(dataset, subset=args.subset, seed=args.seed)
    space = load_space(args.space).with_budget(max_epochs=args.max_epochs, grace_period=args.grace_period,
                                               reduction_factor=args.reduction_factor)
    storage = Path(args.storage or tempfile.mkdtemp(prefix="fer-tune-bench-"))
    print(f"{dataset.name}: {len(data.train_y)} train / {len(data.val_y)} val images (subset {args.subset}); "
          f"space {space.name}, {args.trials} trials x {args.max_epochs} epochs, executor {args.executor}; "
          f"experiments in {storage}", flush=True)

    started = cluster.connect(None, num_cpus=args.num_cpus)
    figures: dict = {"setup": vars(args)}
    try:
        common = dict(trials=args.trials, storage=storage, executor=args.executor, concurrency=args.concurrency,
                      seed=args.seed, progress=False)
        seeds = [] if args.overhead_only else [args.seed + i for i in range(args.seeds)]
        per_seed = {}
        for seed in seeds:
            if len(seeds) > 1:
                print(f"\nsearch seed {seed}:", flush=True)
            per_seed[seed] = compare_searches(space, data, storage, {**common, "seed": seed}, keys,
                                              args.promotion_window)
            figures[f"seed_{seed}"] = {key: fig for key, (_, _, fig) in per_seed[seed].items()}
        if len(seeds) > 1:
            figures["summary"] = summarize(per_seed)
        runs = {key: (summary, wall) for key, (summary, wall, _) in per_seed[seeds[0]].items()} if seeds else {}

        if not args.skip_overhead:
            print("\nper-trial overhead (trial start -> first report, less that epoch), median of "
                  f"{args.overhead_trials} one-epoch trials:")
            for executor in ("direct", "train"):
                summary = run_search(space.with_budget(max_epochs=1, grace_period=1), data,
                                     name=f"overhead-{executor}-{int(time.time())}",
                                     **{**common, "trials": args.overhead_trials, "executor": executor})
                startup = summary.table["startup_s"].dropna().tolist()
                med = statistics.median(startup) if startup else float("nan")
                print(f"  {executor:<7} {med:6.1f} s   (each: {', '.join(f'{s:.1f}' for s in startup)})", flush=True)
                figures[f"startup_{executor}_s"] = med
            floors = train_floor(args.overhead_trials, storage)
            for name, floor in floors.items():
                print(f"  Ray Train's floor, {name} (empty train function, one trial at a time) "
                      f"{statistics.median(floor):.1f} s   (each: {', '.join(f'{s:.1f}' for s in floor)})", flush=True)
            figures["startup_train_floor_s"] = statistics.median(floors["no process group"])
            figures["startup_train_floor_gloo_s"] = statistics.median(floors["gloo process group"])
            if not runs:
                return finish(args, figures)

            summary, wall = runs.get("tpe_asha") or runs["random_full"]
            plain = plain_loop(space, summary, data, args.seed)
            conc = int(summary_concurrency(storage / summary.name)) or 1
            ideal = plain / conc
            print(f"\nsearch (1) against the same {len(summary.table)} trainings in a plain loop:")
            print(f"  search wall {wall:.0f} s with {conc} trials at a time; plain loop {plain:.0f} s sequential "
                  f"(= {ideal:.0f} s at {conc} at a time); overhead {wall - ideal:.0f} s "
                  f"({(wall - ideal) / max(1, len(summary.table)) * conc:.1f} s per trial slot)")
            figures["plain_loop_s"] = round(plain, 1)
            figures["search_overhead_s"] = round(wall - ideal, 1)
    finally:
        cluster.shutdown(started)
    return finish(args, figures)


def finish(args, figures: dict) -> int:
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str))
    return 0


SEARCHES = (("tpe_asha", "(1) Optuna TPE + ASHA", "tpe", True),
            ("random_full", "(2) random, no early stop", "random", False),
            ("random_asha", "(3) random + ASHA", "random", True),
            ("tpe_recent", "(4) TPE + recent-N ASHA", "tpe", True))


def compare_searches(space, data: TrainData, storage: Path, common: dict, keys=None, window: int = 0) -> dict:
    """The searches (`keys`, default (1)-(3)) with one search seed: {key: (summary, wall_s, figures)},
    and their table. (4) is (1) with `promotion_window=window`."""
    keys = keys or [key for key, *_ in SEARCHES[:3]]
    runs = {}
    for key, _, sampler, asha in SEARCHES:
        if key not in keys:
            continue
        t0 = time.time()
        summary = run_search(space, data, name=f"{key}-s{common['seed']}-{int(t0)}", sampler=sampler,
                             early_stopping=asha, promotion_window=window if key == "tpe_recent" else None,
                             **common)
        runs[key] = (summary, time.time() - t0)
        print(f"  {key}: {summary.epochs_spent} epochs, {runs[key][1]:.0f} s, best val_acc "
              f"{summary.best.get('best_val_acc') if summary.best else float('nan'):.4f}", flush=True)
    target = runs["random_full"][0].best["best_val_acc"]
    print(f"\n{'search':<26}{'epochs':>8}{'wall s':>9}{'best val_acc':>14}{'epochs to reach ' + format(target, '.4f'):>26}")
    out = {}
    for key, label, _, _ in SEARCHES:
        if key not in runs:
            continue
        summary, wall = runs[key]
        reach = epochs_to_reach(summary.table, target)
        best = summary.best["best_val_acc"] if summary.best else float("nan")
        print(f"{label:<26}{summary.epochs_spent:>8}{wall:>9.0f}{best:>14.4f}{str(reach or 'never'):>26}")
        out[key] = (summary, wall, {"epochs": summary.epochs_spent, "wall_s": round(wall, 1), "best_val_acc": best,
                                    "epochs_to_reach_random_full_best": reach, "counts": summary.counts})
    fidelity = rung_fidelity(curves(runs["random_full"][0].table),
                             rungs(space.max_epochs, space.grace_period, space.reduction_factor))
    out["random_full"][2]["rungs"] = fidelity
    print("how well ASHA's rungs rank (2)'s trials (Spearman rho of val_acc so far against the final best; "
          f"where (2)'s best trial stood, ASHA keeps the top 1/{space.reduction_factor}):")
    for f in fidelity:
        print(f"  epoch {f['epoch']:>3}: rho {f['rho']:.2f}, (2)'s best ranked {f['best_rank']} of {f['trials']}")
    return out


def rungs(max_t: int, grace: int, rf: int) -> list[int]:
    """ASHA's rung epochs below max_t: grace, grace * rf, ..."""
    out, t = [], grace
    while t < max_t:
        out.append(t)
        t *= rf
    return out


def trial_reports(table: pd.DataFrame) -> list[list[dict]]:
    """Each trial's epoch reports (those with epoch and val_acc), from its result.json."""
    out = []
    for trial_dir in table["trial_dir"]:
        path = Path(trial_dir) / "result.json"
        if path.is_file():
            reports = (json.loads(line) for line in path.read_text().splitlines())
            out.append([r for r in reports if "epoch" in r and "val_acc" in r])
    return out


def curves(table: pd.DataFrame) -> list[list[float]]:
    """Each trial's val_acc per epoch (replayed reports left out)."""
    return [[r["val_acc"] for r in sorted(reports, key=lambda r: r["epoch"]) if not r.get("replayed")]
            for reports in trial_reports(table)]


def rung_fidelity(trial_curves: list[list[float]], rung_epochs: list[int]) -> list[dict]:
    """For trials that ran every epoch (search (2)): at each rung epoch, the Spearman correlation
    between the best val_acc so far and the final best, and the rank there of the finally best trial.
    A rung whose rho is near 0 stops trials on noise."""
    longest = max(map(len, trial_curves), default=0)
    full = [c for c in trial_curves if c and len(c) == longest]
    final = pd.Series([max(c) for c in full])
    best = int(final.idxmax()) if full else 0
    out = []
    for epoch in rung_epochs:
        if not full or epoch > longest:
            continue
        so_far = pd.Series([max(c[:epoch]) for c in full])
        out.append({"epoch": epoch, "trials": len(full), "rho": float(so_far.rank().corr(final.rank())),
                    "best_rank": int((so_far > so_far[best]).sum()) + 1})
    return out


def summarize(per_seed: dict, goal: float = 0.4) -> dict:
    """Medians over search seeds; `reach` is counted against each seed's own (2), as a share of (2)'s epochs
    (never reached counts as infinitely many, so a median can be 'never')."""
    print(f"\nover {len(per_seed)} search seeds ({', '.join(map(str, per_seed))}), medians:")
    print(f"{'search':<26}{'epochs':>8}{'wall s':>9}{'best val_acc':>14}{'reached (2)':>13}{'share of (2) epochs':>21}")
    out = {}
    for key, label, _, _ in SEARCHES:
        if key not in next(iter(per_seed.values())):
            continue
        figs = [runs[key][2] for runs in per_seed.values()]
        full = [runs["random_full"][2]["epochs"] for runs in per_seed.values()]
        shares = [f["epochs_to_reach_random_full_best"] / n if f["epochs_to_reach_random_full_best"] else float("inf")
                  for f, n in zip(figs, full)]
        med_share = statistics.median(shares)
        out[key] = {"epochs": statistics.median(f["epochs"] for f in figs),
                    "wall_s": statistics.median(f["wall_s"] for f in figs),
                    "best_val_acc": statistics.median(f["best_val_acc"] for f in figs),
                    "reached": sum(s != float("inf") for s in shares),
                    "within_goal": sum(s <= goal for s in shares),
                    "share_of_random_full_epochs": shares}
        share = "never" if med_share == float("inf") else f"{med_share:.0%}"
        print(f"{label:<26}{out[key]['epochs']:>8g}{out[key]['wall_s']:>9.0f}{out[key]['best_val_acc']:>14.4f}"
              f"{out[key]['reached']:>9}/{len(figs):<3}{share:>21}")
    labels = {key: label.split()[0] for key, label, _, _ in SEARCHES}
    within = ", ".join(f"{labels[key]} in {fig['within_goal']}" for key, fig in out.items() if key != "random_full")
    print(f"goal: reach (2)'s best with <= {goal:.0%} of (2)'s epochs: {within} of {len(per_seed)} seeds")
    return out


def epochs_to_reach(table: pd.DataFrame, target: float) -> int | None:
    """Epochs spent over all trials, in the order they were reported, until one reached `target`."""
    reports = [(r.get("timestamp", 0), r.get("time_total_s", 0), r["val_acc"])
               for trial in trial_reports(table) for r in trial]
    for count, (_, _, acc) in enumerate(sorted(reports), start=1):
        if acc >= target - 1e-12:
            return count
    return None


def plain_loop(space, summary, data: TrainData, seed: int) -> float:
    """The search's trainings (each trial's config and the epochs it ran) one after another."""
    import torch

    torch.set_num_threads(1)
    configs = {}
    for trial_dir in summary.table["trial_dir"]:
        params = json.loads((Path(trial_dir) / "params.json").read_text())
        configs[Path(trial_dir).name] = params
    t0 = time.time()
    for row in summary.table.itertuples():
        params = configs.get(Path(row.trial_dir).name)
        if params is None or not row.epochs:
            continue
        cfg = space.trial_config(params, seed=seed)  # max_epochs' schedule, stopped where ASHA stopped it
        fit(cfg, data, StopAfter(int(row.epochs)), device="cpu")
    return time.time() - t0


class StopAfter(MemoryReporter):
    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = epochs

    def should_stop(self) -> bool:
        return len(self.history) >= self.epochs


def train_floor(trials: int, storage: Path) -> dict[str, list[float]]:
    """Seconds from trial start to first report for trials of the train executor itself
    (`train_trial`: a driver trial with no CPU of its own running a 1-worker TorchTrainer) whose
    worker reports at once instead of training: what Ray Train costs before any of our code runs.
    One trial at a time, alternating the product's one-worker set-up (no torch.distributed process
    group) with TorchTrainer's default (a gloo process group, as before commit 816f2f8), so both
    meet the same machine."""
    import ray.train
    from ray import tune
    from ray.train.torch import TorchConfig

    from fer_tune.search.trainable import TrialSetup, train_trial

    setup = TrialSetup(space=None, epochs=1, seed=0, train_storage=str(storage / "floor-train"))

    def empty(config):
        import torch  # noqa: F401  (every real worker imports it; without a process group nothing else does)

        ray.train.report({"epoch": 1})

    class FirstReport(tune.Callback):
        def __init__(self):
            self.started, self.startup = {}, []

        def on_trial_start(self, iteration, trials, trial, **info):
            self.started[trial.trial_id] = time.time()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.startup.append(time.time() - self.started.pop(trial.trial_id))

    variants = {"no process group": None, "gloo process group": TorchConfig()}
    startup = {name: [] for name in variants}
    for i in range(trials):
        for name, group in variants.items():
            def trial(config, group=group):
                train_trial(config, setup, [None], worker=empty, process_group=group)

            timer = FirstReport()
            with cluster.env(RAY_AIR_NEW_OUTPUT="0"):  # no configuration box
                tune.Tuner(tune.with_resources(trial, {"cpu": 0, "memory": 64 * 2**20}),  # as the train executor's trials
                           tune_config=tune.TuneConfig(num_samples=1),
                           run_config=tune.RunConfig(name=f"floor-{i}-{int(time.time())}", storage_path=str(storage),
                                                     callbacks=[timer], verbose=0)).fit()
            startup[name] += timer.startup
    return startup


def summary_concurrency(exp: Path) -> float:
    import yaml

    record = yaml.safe_load((exp / "search.yaml").read_text())
    return record["flags"]["concurrency"]


if __name__ == "__main__":
    sys.exit(main())
