"""Where the training loop's per-epoch metrics and checkpoints go.

The loop never prints and never writes files itself: it hands each epoch's metrics (and a way to
make a checkpoint) to a `Reporter`. `RunFolderReporter` is the local one used by `fer-tune train`
(metrics.csv, TensorBoard events, best/last checkpoints, a progress bar); the search has a Ray
reporter that forwards to `ray.train.report`.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable

from fer_tune.train.checkpoint import save_checkpoint

METRIC_NAMES = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_macro_f1", "lr",
                "epoch_seconds", "images_per_second")


class Reporter:
    """No-op base: subclasses override what they need."""

    def start(self, info: dict) -> None:
        """Called once before the first epoch with the run's facts (epochs, steps_per_epoch, ...)."""

    def step(self, loss: float | None = None) -> None:
        """Called after every training batch (rank 0 only)."""

    def replan(self, epochs: int) -> None:
        """Called when a time budget changes the planned number of epochs."""

    def report(self, metrics: dict, make_checkpoint: Callable[[], dict], is_best: bool) -> None:
        """Called after every epoch; `make_checkpoint()` builds the checkpoint dict on demand."""

    def should_stop(self) -> bool:
        return False

    def close(self) -> None:
        """Called once at the end, also after an error."""


class MemoryReporter(Reporter):
    """Keeps every epoch's metrics in a list (tests, notebooks)."""

    def __init__(self):
        self.history: list[dict] = []
        self.info: dict = {}

    def start(self, info: dict) -> None:
        self.info = info

    def report(self, metrics, make_checkpoint, is_best) -> None:
        self.history.append(dict(metrics))


def epoch_line(metrics: dict, epochs: int, is_best: bool) -> str:
    """The one line printed per epoch; `*` marks a new best val epoch. Extra val sets show their accuracy."""
    extra = "".join(f"  {k} {v:.4f}" for k, v in metrics.items()
                    if k not in METRIC_NAMES and k.startswith("val_") and k.endswith("_acc"))
    return (f"epoch {int(metrics['epoch']):3d}/{epochs}  train_loss {metrics['train_loss']:.4f}  "
            f"train_acc {metrics['train_acc']:.4f}  val_loss {metrics['val_loss']:.4f}  "
            f"val_acc {metrics['val_acc']:.4f}  val_macro_f1 {metrics['val_macro_f1']:.4f}{extra}  "
            f"{metrics['images_per_second']:.0f} img/s  {metrics['epoch_seconds']:.1f}s" + ("  *" if is_best else ""))


def start_line(info: dict) -> str:
    """The line printed before the first epoch: what trains on what, and in which precision (an epoch
    in fp32 on a CPU without native bf16 takes several times as long as one with it)."""
    from fer_tune.train.runtime import cpu_has_bf16

    note = ""
    if info["device"] == "cpu" and info["precision"] == "fp32" and info["config"].get("precision") == "auto":
        note = " (this CPU has no native bf16)"
    elif info["device"] == "cpu" and info["precision"] == "bf16" and not cpu_has_bf16():
        note = " (emulated: this CPU has no native bf16, so this is many times slower than fp32; use precision auto)"
    return (f"{info['config']['model']}: {info['params'] / 1e6:.2f}M parameters, {info['train_images']} train / "
            f"{info['val_images']} val images, {info['device']} {info['precision']}{note}, "
            f"{info['epochs']} x {info['steps_per_epoch']} batches")


class RunFolderReporter(Reporter):
    """A run folder: metrics.csv, TensorBoard events, best.pt and last.pt, and a progress bar."""

    def __init__(self, run_dir: str | Path, progress: bool = True, tensorboard: bool = True,
                 on_epoch: Callable[[str], None] | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        self.on_epoch = on_epoch  # also gets the start line and each epoch's (a run with no terminal of its own)
        self.tensorboard = tensorboard
        self._bar = None
        self._writer = None
        self._csv_file = None
        self._csv = None
        self.info: dict = {}

    def start(self, info: dict) -> None:
        self.info = info
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir))
        self._csv_file = open(self.run_dir / "metrics.csv", "w", newline="")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=[*METRIC_NAMES, *info.get("extra_metrics", ())],
                                   extrasaction="ignore")
        self._csv.writeheader()
        self._print(start_line(info))
        self._new_bar(1)

    def _print(self, line: str) -> None:
        if self.progress:
            from tqdm import tqdm

            tqdm.write(line)
        if self.on_epoch is not None:
            self.on_epoch(line)

    def _new_bar(self, epoch: int) -> None:
        if not self.progress:
            return
        from tqdm import tqdm

        # disable=None: no bar when stderr is not a terminal (a log file, `nohup`, `ray job`), where every
        # redraw would be written out; the epoch lines are printed either way.
        self._bar = tqdm(total=self.info["steps_per_epoch"], desc=f"epoch {epoch}/{self.info['epochs']}",
                         unit="batch", leave=False, dynamic_ncols=True, disable=None)

    def step(self, loss=None) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def replan(self, epochs: int) -> None:
        self.info["epochs"] = epochs

    def report(self, metrics, make_checkpoint, is_best) -> None:
        epoch = int(metrics["epoch"])
        if self._bar is not None:
            self._bar.close()
        self._print(epoch_line(metrics, self.info["epochs"], is_best))
        self._csv.writerow(metrics)
        self._csv_file.flush()
        if self._writer is not None:
            for name, value in metrics.items():
                if name != "epoch":
                    self._writer.add_scalar(name, value, epoch)
            self._writer.flush()
        state = make_checkpoint()
        save_checkpoint(state, self.run_dir / "last.pt")
        if is_best:
            save_checkpoint(state, self.run_dir / "best.pt")
        if epoch < self.info["epochs"]:
            self._new_bar(epoch + 1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
        if self._csv_file is not None:
            self._csv_file.close()
