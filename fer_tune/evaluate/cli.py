"""`fer-tune retrain`, `transfer`, `evaluate`, `predict`: thin over the library functions."""

from __future__ import annotations

import json
import sys

from fer_tune.errors import UserError


def _duration(text: str) -> float:
    from fer_tune.cli import parse_duration

    return parse_duration(text)


def _assignment(text: str):
    from fer_tune.cli import parse_assignment

    return parse_assignment(text)


def add_commands(sub, data_root_flag) -> None:
    """Add the evaluation commands to the `fer-tune` sub-parsers."""
    from fer_tune.cli import seed_value
    from fer_tune.evaluate.predict import DEFAULT_MARGIN
    from fer_tune.evaluate.retrain import DEFAULT_EPOCH_FACTOR
    from fer_tune.evaluate.transfer import DEFAULT_JOINT_FRACTION, STRATEGIES

    p = sub.add_parser(
        "retrain", help="retrain the best config of a search with the full budget and test it once",
        description="Take the best configuration(s) of a search, train from scratch on the full train split, keep "
                    "each run's best val epoch, then score the test split once per final model. Writes "
                    "<experiment>/final/: checkpoints, metrics.json, TensorBoard events, report.md with plots.")
    p.add_argument("experiment", nargs="?", help="experiment name under --storage or its folder (default: latest)")
    p.add_argument("--storage", default="results", help="where experiments live (default ./results)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--rank", type=int, help="retrain the trial of this rank (1 = best, the default)")
    which.add_argument("--top-k", type=int, help="retrain the K best configs and average their softmax (ensemble)")
    which.add_argument("--screen", type=int, metavar="K",
                       help="train the K best configs for --screen-budget each, then retrain the one with the best "
                            "val score (the search's short trials can rank them otherwise than a long run)")
    p.add_argument("--screen-budget", type=_duration, metavar="DURATION",
                   help="with --screen: training time per config, e.g. 10m (default: a sixth of --time-budget, "
                        "else 10m)")
    p.add_argument("--seeds", type=int, default=1, help="train each config with N seeds; report mean ± std")
    p.add_argument("--first-seed", type=int, metavar="S",
                   help="seeds S..S+N-1 instead of the trial's own seed onwards (one more seed of a recipe alone)")
    p.add_argument("--epochs", type=int, help="epochs per run (default: --epoch-factor x the space's max_epochs)")
    p.add_argument("--epoch-factor", type=float, default=DEFAULT_EPOCH_FACTOR,
                   help="default epochs = this x max_epochs of the search (default 2: ASHA's max_t was chosen to "
                        "rank configs cheaply, not to train them to the end)")
    p.add_argument("--time-budget", type=_duration, help="per run: train as many epochs as fit, e.g. 30m")
    tta_flags(p)
    p.add_argument("--set", action="append", type=_assignment, metavar="KEY=VALUE",
                   help="change a config key of the retrained config(s), e.g. --set ema=0.999 (repeatable; "
                        "recorded in metrics.json under protocol.overrides)")
    p.add_argument("--subset", type=float, default=1.0, help="stratified fraction of train (quick checks only)")
    p.add_argument("--dataset", help="prepared dataset to retrain on (default: the search's, sha256-checked)")
    p.add_argument("--address", help="run every seed as a Ray Train run: auto, ray://host:10001, or local "
                                     "(a local Ray instance); default: sequentially in this process")
    p.add_argument("--cpus-per-run", type=float, default=1.0, help="with --address: CPUs per run (default 1)")
    p.add_argument("--gpus-per-run", type=float, default=0.0, help="with --address: GPUs per run (default 0)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--force", action="store_true", help="replace an existing final/ (once the new one is done)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    data_root_flag(p)
    p.set_defaults(func=cmd_retrain)

    p = sub.add_parser(
        "transfer", help="zero-shot and fine-tuned transfer of the retrained model to another dataset",
        description="(1) the retrained model (final/) on the target's test split; (2) fine-tune on the target's "
                    "train split, scoring every epoch on the target's and the source's val split (--select picks "
                    "the epoch kept); (3) target test after; (4) source test after (forgetting). Writes "
                    "<experiment>/transfer/.")
    p.add_argument("experiment", nargs="?", help="experiment name under --storage or its folder (default: latest)")
    p.add_argument("--to", required=True, help="target prepared dataset (name or folder), e.g. rafdb")
    p.add_argument("--strategy", default="full", choices=[*STRATEGIES, "all"],
                   help="full: all layers; freeze-lower: lower half of the features frozen; linear-probe: only the "
                        "classifier; joint: all layers on target + source images (against forgetting); all: each, "
                        "compared in one table (default full)")
    p.add_argument("--joint-fraction", type=float,
                   help=f"joint (and all): share of source images in the training mixture (default "
                        f"{DEFAULT_JOINT_FRACTION})")
    p.add_argument("--select", choices=("target", "mean"), default="target",
                   help="the epoch each strategy keeps: target = the best on the target's val split (by the "
                        "model's selection metric, val_acc unless its search chose another); mean = the best mean "
                        "of target and source val accuracy, which weighs what is forgotten (default target)")
    p.add_argument("--set", action="append", type=_assignment, metavar="KEY=VALUE",
                   help="change another config key of the fine-tuning runs, e.g. --set warmup_epochs=3 "
                        "(repeatable; recorded in metrics.json under overrides)")
    p.add_argument("--epochs", type=int, help="fine-tuning epochs (default: half of the source model's)")
    p.add_argument("--lr-factor", type=float,
                   help="fine-tuning lr = this x the model's lr (default 0.1; 1 for linear-probe)")
    p.add_argument("--time-budget", type=_duration, help="per strategy: as many epochs as fit, e.g. 10m")
    p.add_argument("--seed", type=seed_value, help="fine-tuning seed (default: the model's)")
    p.add_argument("--checkpoint", help="transfer this checkpoint instead of final/'s network with the best val "
                                        "score (of any config when final/ is a --top-k ensemble)")
    p.add_argument("--source-dataset", help="dataset the model was trained on (default: from final/metrics.json)")
    tta_flags(p)
    p.add_argument("--storage", default="results", help="where experiments live (default ./results)")
    p.add_argument("--device")
    p.add_argument("--force", action="store_true", help="replace an existing transfer/ (once the new one is done)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    data_root_flag(p)
    p.set_defaults(func=cmd_transfer)

    p = sub.add_parser(
        "evaluate", help="score a checkpoint on any dataset or image folder",
        description="Score a checkpoint on a prepared dataset (name or folder) or a raw image folder/zip "
                    "(<class>/<image> or <split>/<class>/<image>). Classes the data lacks or the model lacks are "
                    "left out, with a note; unknown class folders are an error.")
    p.add_argument("model", help="checkpoint file (best.pt)")
    p.add_argument("--data", required=True, help="prepared dataset name or folder, or an image folder/zip")
    p.add_argument("--split", default="test", help="split to score (default test)")
    tta_flags(p)
    p.add_argument("--out", help="also write metrics.json, report.md and plots into this folder")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--device")
    data_root_flag(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "predict", help="emotions of the faces in image files",
        description="Find the face (OpenCV Haar cascade; with several faces the largest is used and the output "
                    "says so), crop it with a margin, and print the top emotions. Images that fail are reported "
                    "and the rest still processed; the exit code is non-zero if any failed.")
    p.add_argument("model", help="checkpoint file (best.pt)")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--no-detect", action="store_true", help="the images are face crops already: no detection")
    p.add_argument("--top", type=int, default=3, help="how many emotions to show (default 3)")
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                   help=f"crop margin around the face, a fraction of its size (default {DEFAULT_MARGIN})")
    tta_flags(p)
    p.add_argument("--json", action="store_true", help="one JSON list of results")
    p.add_argument("--device")
    p.set_defaults(func=cmd_predict)


def tta_flags(p) -> None:
    p.add_argument("--tta", action="store_true", help="test-time augmentation: average each image with its mirror")
    p.add_argument("--tta-crops", action="store_true",
                   help="with (or instead of) --tta: also 1-pixel shifts and 8%% zooms of each image, each with "
                        "its mirror (14 views, warped as training's augmentation warps)")


def tta_of(args) -> str:
    return "crops" if args.tta_crops else "flip" if args.tta else "none"


def cmd_retrain(args) -> None:
    from fer_tune.evaluate.retrain import retrain

    retrain(args.experiment, storage=args.storage, rank=args.rank, top_k=args.top_k, seeds=args.seeds,
            epochs=args.epochs, epoch_factor=args.epoch_factor, time_budget=args.time_budget, tta=tta_of(args),
            subset=args.subset, dataset=args.dataset, data_root=args.data_root, address=args.address,
            cpus_per_run=args.cpus_per_run, gpus_per_run=args.gpus_per_run, device=args.device, force=args.force,
            progress=not args.quiet, overrides=dict(args.set or []), first_seed=args.first_seed,
            screen=args.screen, screen_budget=args.screen_budget)


def cmd_transfer(args) -> None:
    from fer_tune.evaluate.transfer import transfer

    transfer(args.experiment, to=args.to, strategy=args.strategy, storage=args.storage, checkpoint=args.checkpoint,
             source_dataset=args.source_dataset, epochs=args.epochs, lr_factor=args.lr_factor,
             joint_fraction=args.joint_fraction, select=args.select, overrides=dict(args.set or []), seed=args.seed,
             time_budget=args.time_budget,
             tta=tta_of(args),
             data_root=args.data_root, device=args.device, force=args.force, progress=not args.quiet)


def cmd_evaluate(args) -> None:
    from fer_tune.evaluate.evaluate import evaluate_checkpoint, evaluation_text, write_evaluation

    log = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
    metrics = evaluate_checkpoint(args.model, args.data, split=args.split, data_root=args.data_root,
                                  tta=tta_of(args), device=args.device, batch_size=args.batch_size, log=log)
    if args.out:
        write_evaluation(args.out, metrics)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(evaluation_text(metrics))
        if args.out:
            print(f"written: {args.out}/ (report.md, metrics.json)")


def cmd_predict(args) -> None:
    from fer_tune.evaluate.predict import predict_images

    results = predict_images(args.model, args.images, detect=not args.no_detect, top=args.top, margin=args.margin,
                             tta=tta_of(args), device=args.device)
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        for r in results:
            print(r.text(), file=sys.stdout if r.ok else sys.stderr)
    failed = [r for r in results if not r.ok]
    if failed:
        raise UserError(f"predict: {len(failed)} of {len(results)} image(s) failed: "
                        + ", ".join(r.image for r in failed[:5]) + (" ..." if len(failed) > 5 else ""))
