"""The `fer-tune` command: a thin layer over the library (tests call the library directly)."""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import sys
import threading
from pathlib import Path

import yaml

from fer_tune.errors import RunFailed, UserError, first_line


def parse_duration(text: str) -> float:
    """'900', '900s', '15m', '1.5h' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    text = str(text).strip().lower()
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 900, 15m, 1.5h)") from None


MAX_SEED = 2**32 - 1  # numpy's RandomState (Optuna's samplers) takes no negative seed and none above this


def seed_value(text: str) -> int:
    """A --seed: a whole number from 0 to MAX_SEED."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value <= MAX_SEED:
        shown = repr(text) if value is None else value
        raise argparse.ArgumentTypeError(f"invalid seed: {shown} (a whole number from 0 to {MAX_SEED})")
    return value


SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")  # 3e-4: a number YAML 1.1 reads as text


def parse_assignment(text: str) -> tuple[str, object]:
    """'key=value' with a YAML value: lr=3e-4, model_kwargs={width: 0.5}, nesterov=false."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set expects key=value, got {text!r}")
    key, value = text.split("=", 1)
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"--set {key}: value {value!r} is not valid YAML") from None
    if isinstance(parsed, str) and SCIENTIFIC.fullmatch(parsed.strip()):
        parsed = float(parsed)  # YAML 1.1 reads 3e-4 (no dot) as text; records would keep the string
    return key.strip(), parsed


# -- data -------------------------------------------------------------------------------------

def cmd_data_prepare(args) -> None:
    from fer_tune import data

    data.prepare(args.source, args.path, name=args.name, data_root=args.data_root, size=args.size,
                 rgb=args.rgb, val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed)


def cmd_data_info(args) -> None:
    from fer_tune import data

    print(data.describe(data.load(args.name, args.data_root, verify=True).meta))


def cmd_data_list(args) -> None:
    from fer_tune import data

    names = data.list_prepared(args.data_root)
    root = data.default_data_root(args.data_root)
    if not names:
        print(f"no prepared datasets under {root}; run: fer-tune data prepare fer2013 PATH")
    for name in names:
        print(name)


# -- models -----------------------------------------------------------------------------------

def cmd_models(args) -> None:
    from fer_tune.models import describe_models

    print(describe_models(img_size=args.img_size))


# -- train ------------------------------------------------------------------------------------

TRAIN_FLAGS = ("model", "epochs", "time_budget", "batch_size", "lr", "optimizer", "seed", "subset",
               "aug_strength", "precision")


def cmd_train(args) -> None:
    from fer_tune import data
    from fer_tune.train import TrainConfig, TrainingDiverged
    from fer_tune.train.run import default_run_dir, train_run
    from fer_tune.train.runtime import pick_device

    overrides = dict(args.set or [])
    overrides.update({k: getattr(args, k) for k in TRAIN_FLAGS if getattr(args, k) is not None})
    if args.config:
        cfg = TrainConfig.from_yaml(args.config, overrides)
    else:
        cfg = TrainConfig.from_dict(overrides, source="--set")  # the named flags are typed by argparse
    device = pick_device(args.device)
    dataset = data.load(args.dataset, args.data_root)
    out = Path(args.out) if args.out else default_run_dir(args.results, cfg.model)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: already exists{'' if out.is_dir() else ' (a file)'}; a run writes into "
                        "a new folder: give another --out, or remove that one")
    print(f"training {cfg.model} on {dataset.name} -> {out}")
    existed = out.exists()  # an empty folder the user made: emptied, not removed, on failure

    def discard() -> None:
        for path in (out.iterdir() if existed else [out]):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    try:
        result = train_run(cfg, dataset, out, device=device, progress=not args.quiet)
    except TrainingDiverged as exc:
        discard()
        raise RunFailed(f"{exc}; lower lr (or set grad_clip) and run again; nothing was kept in {out}") from None
    except BaseException:  # Ctrl-C, or e.g. an unknown model argument found when the model is built
        if (out / "best.pt").is_file():  # a finished epoch: keep what it made
            print(f"fer-tune: stopped; kept {out} (best.pt, last.pt and metrics.csv of the epochs that ran)",
                  file=sys.stderr)
        else:
            discard()
        raise
    best = result.best
    print(f"done: {result.epochs_run} epoch{'s' * (result.epochs_run != 1)} ({result.stop_reason}); best epoch {best['epoch']}: "
          f"val_acc {best['val_acc']:.4f}, val_macro_f1 {best['val_macro_f1']:.4f}; checkpoint {out / 'best.pt'}")


# -- parser -----------------------------------------------------------------------------------

class _Version(argparse.Action):
    """--version, looked up only when asked: importlib.metadata scans the installed distributions,
    about 35 ms that every command would otherwise pay at start-up."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, **kwargs):
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0,
                         help="print fer-tune's version and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib.metadata import PackageNotFoundError, version

        try:
            installed = version("fer-tune")
        except PackageNotFoundError:  # run from a source tree without installing
            installed = "unknown"
        print(f"fer-tune {installed}")
        parser.exit()


class Parser(argparse.ArgumentParser):
    """argparse with the project's error format: a bad flag is one line naming the command, what was
    wrong and where the flags are listed, not argparse's usage block (subcommands inherit it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the flags)\n")

    def parse_args(self, args=None, namespace=None):
        # Unknown flags are found by the top parser, after the command's: name the command in the error.
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            command = [getattr(parsed, key) for key in ("command", "data_command") if getattr(parsed, key, None)]
            prog = " ".join([self.prog, *command])
            self.exit(2, f"{prog}: error: unrecognized arguments: {' '.join(extra)} "
                         f"(`{prog} --help` lists the flags)\n")
        return parsed


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="fer-tune",
        description="Hyperparameter search for facial expression recognition (Ray Tune + Optuna + ASHA).",
        epilog="Start with: fer-tune data prepare fer2013 PATH/TO/fer2013.zip; then fer-tune search --space cnn "
               "on a GPU cluster, or fer-tune search --space cpu --subset 0.5 --executor direct on one CPU machine")
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def data_root_flag(p):
        p.add_argument("--data-root", help="where prepared datasets live (default: $FER_TUNE_DATA or ./data)")

    p_data = sub.add_parser("data", help="prepare and inspect datasets")
    data_sub = p_data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = data_sub.add_parser("prepare", help="decode a dataset once into the prepared format")
    p.add_argument("source", choices=["fer2013", "rafdb", "imagefolder"])
    p.add_argument("path", help="zip archive, extracted folder, or fer2013.csv")
    p.add_argument("--name", help="name of the prepared dataset (default: the source name)")
    p.add_argument("--size", type=int, help="image side in pixels (default 48)")
    p.add_argument("--rgb", action="store_true", help="keep colour (default: grayscale)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="stratified val slice of train where the source has no val split (default 0.1)")
    p.add_argument("--test-fraction", type=float, default=0.1,
                   help="stratified test slice of train where the source has no test split: image folders "
                        "without test/ (default 0.1, taken before val)")
    p.add_argument("--seed", type=seed_value, default=0, help="seed of the val and test slices (default 0)")
    data_root_flag(p)
    p.set_defaults(func=cmd_data_prepare)
    p = data_sub.add_parser("info", help="counts, shape and duplicate report of a prepared dataset")
    p.add_argument("name")
    data_root_flag(p)
    p.set_defaults(func=cmd_data_info)
    p = data_sub.add_parser("list", help="prepared datasets")
    data_root_flag(p)
    p.set_defaults(func=cmd_data_list)

    p = sub.add_parser("models", help="model names with parameter counts and forward cost")
    p.add_argument("--img-size", type=int, default=48, help="input side for the forward cost (default 48)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("train", help="train one model (the same loop every search trial runs)")
    p.add_argument("--model", help="a registry name (see `fer-tune models`) or timm/<name>")
    p.add_argument("--config", help="YAML file of training config keys (flags override it)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=int, help="epochs to train (default: the config's, 30)")
    budget.add_argument("--time-budget", type=parse_duration,
                        help="train as many epochs as fit, the schedule sized to them, e.g. 15m")
    p.add_argument("--batch-size", type=int, help="images per step (default 128)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 2e-3)")
    p.add_argument("--optimizer", help="adam, adamw (default), sgd, rmsprop or adagrad")
    p.add_argument("--aug-strength", type=float, help="augmentation strength in [0, 1] (default 0.5)")
    p.add_argument("--subset", type=float, help="stratified fraction of train")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--seed", type=seed_value, help="seeds weights, batch order and augmentation (default 0)")
    p.add_argument("--set", action="append", type=parse_assignment, metavar="KEY=VALUE",
                   help="any other config key, e.g. --set label_smoothing=0.05 (repeatable)")
    p.add_argument("--dataset", default="fer2013", help="prepared dataset name or path (default fer2013)")
    p.add_argument("--results", default="results", help="results root (default ./results)")
    p.add_argument("--out", help="run folder (default results/train/<model>-<time>)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    data_root_flag(p)
    p.set_defaults(func=cmd_train)

    from fer_tune.search.cli import add_commands as add_search_commands

    add_search_commands(sub, data_root_flag)

    from fer_tune.evaluate.cli import add_commands as add_evaluate_commands

    add_evaluate_commands(sub, data_root_flag)
    return parser


def _stop_like_ctrl_c(signum, frame) -> None:
    """SIGTERM (`kill PID`, `timeout`, `docker stop`, a job scheduler) ends a command as Ctrl-C does:
    through the SIGINT handler in force (Tune's graceful stop during a search, else KeyboardInterrupt),
    so half-written output is removed and an interrupted search writes its tables. Python's default
    SIGTERM exits at once and would leave them behind."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):  # Python's default_int_handler raises KeyboardInterrupt
        handler(signal.SIGINT, frame)
    else:  # SIG_IGN or SIG_DFL, e.g. a background job of a non-interactive shell ignores SIGINT
        raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()  # where signal handlers can be set
    previous = signal.signal(signal.SIGTERM, _stop_like_ctrl_c) if in_main_thread else None
    try:
        args.func(args)
    except UserError as exc:
        print(f"fer-tune: error: {exc}", file=sys.stderr)
        return 2
    except RunFailed as exc:
        print(f"fer-tune: error: {first_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fer-tune: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
