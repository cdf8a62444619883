"""The one training loop: `fit(config, data, reporter)`.

Used by `fer-tune train`, by every search trial (inside a Ray Train worker or directly in a Tune
trainable), by retraining and by fine-tuning. It reads top to bottom:

1. put the whole train and val splits on the device as uint8 tensors;
2. build the model, optimizer, schedule and loss from the config;
3. per epoch: a seeded permutation, batches indexed from the resident tensor, batched on-device
   augmentation, autocast forward/backward, one optimizer and schedule step per batch;
4. evaluate on val, hand metrics and a checkpoint maker to the reporter, keep the best weights.

With `torch.distributed` initialised (Ray Train with several workers) the model is wrapped in DDP
and every worker trains on its own shard of each epoch's permutation.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from fer_tune.errors import RunFailed, UserError
from fer_tune.models import create_model
from fer_tune.train.augment import augment, mix_batch
from fer_tune.train.config import MEAN_ACC, TrainConfig, selection_sign
from fer_tune.train.losses import class_weights
from fer_tune.train.metrics import scores_from_confusion, confusion_matrix
from fer_tune.train.optim import Schedule, make_optimizer
from fer_tune.train.report import Reporter
from fer_tune.train.runtime import autocast, normalize, pick_device, predict_logits, resolve_precision


class TrainingDiverged(RunFailed):
    """The training loss became NaN or infinite."""


@dataclass
class TrainData:
    """The arrays one run trains on: uint8 images (N, C, H, W) and int64 labels per split."""

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    classes: tuple[str, ...]
    # Other labelled sets scored after every epoch as val_<name>_loss/_acc/_macro_f1, never trained
    # on; e.g. the source dataset's val split while fine-tuning (what is being forgotten). With any,
    # val_mean_acc (the mean of val_acc and every val_<name>_acc) is reported and may select the epoch.
    extra_val: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @classmethod
    def from_prepared(cls, dataset, subset: float = 1.0, seed: int = 0) -> "TrainData":
        """Train and val arrays of a prepared dataset; `subset` < 1 keeps a stratified slice of train."""
        (train_x, train_y), (val_x, val_y) = dataset.arrays("train"), dataset.arrays("val")
        return cls(train_x, train_y, val_x, val_y, tuple(dataset.classes)).train_subset(subset, seed)

    def train_subset(self, fraction: float, seed: int) -> "TrainData":
        """The same data with a seeded, stratified `fraction` of train (all of it at 1); val unchanged."""
        if fraction >= 1.0:
            return self
        from fer_tune.data import stratified_indices

        keep = stratified_indices(self.train_y, fraction, seed)
        return replace(self, train_x=self.train_x[keep], train_y=self.train_y[keep])


@dataclass
class FitResult:
    config: TrainConfig  # as run (epochs resolved when a time budget sized them)
    history: list[dict]
    best: dict  # metrics of the epoch selected by config.select_metric
    epochs_run: int
    stop_reason: str  # "completed", "early_stopped" or "stopped" (by the reporter, e.g. ASHA)
    # Model weights of the best epoch, on the CPU. A resumed run's checkpoint holds its last weights
    # only: if no later epoch beats the checkpoint's best, these are the weights it resumed from
    # (the reporters' best.pt, written when the best epoch ran, is the best one either way).
    best_state: dict = field(repr=False)
    norm: tuple[float, float] = (0.5, 0.25)

    @property
    def last(self) -> dict:
        return self.history[-1]


def pixel_stats(images: np.ndarray) -> tuple[float, float]:
    """Mean and std of uint8 pixels in [0, 1] units, from a histogram (no float copy of the data)."""
    hist = np.bincount(np.asarray(images).reshape(-1), minlength=256).astype(np.float64)
    values = np.arange(256) / 255.0
    mean = float((hist * values).sum() / hist.sum())
    std = float(math.sqrt((hist * (values - mean) ** 2).sum() / hist.sum()))
    return mean, max(std, 1e-3)


def fit(cfg: TrainConfig, data: TrainData, reporter: Reporter | None = None, *,
        device: str | torch.device | None = None, resume: dict | None = None,
        init: dict | None = None) -> FitResult:
    """Train one model as `cfg` says and return its history and best weights.

    `resume` (a checkpoint dict) continues an interrupted run exactly; `init` (a checkpoint dict, or
    any dict with its `model` weights and `norm`) starts a new run from trained weights, as
    fine-tuning does, with the input normalisation those weights were trained with.
    """
    if "mean" in data.extra_val:
        raise ValueError(f"TrainData.extra_val: the name 'mean' is taken ({MEAN_ACC}); call the set something else")
    if cfg.select_metric == MEAN_ACC and not data.extra_val:
        raise UserError(f"select_metric {MEAN_ACC} averages val_acc with other val sets' accuracy, and this run "
                        "has none; use val_acc (fine-tuning adds its source's val: `fer-tune transfer --select mean`)")
    run_start = time.perf_counter()
    reporter = reporter or Reporter()
    device = pick_device(device)
    precision = resolve_precision(cfg.precision, device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    torch.manual_seed(cfg.seed)
    order_gen = torch.Generator().manual_seed(cfg.seed)  # same on every worker: one permutation to shard
    aug_gen = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank + 1)

    # 1. The data, resident on the device.
    train_x = torch.as_tensor(np.ascontiguousarray(data.train_x)).to(device)
    train_y = torch.as_tensor(np.asarray(data.train_y, dtype=np.int64)).to(device)
    val_x = torch.as_tensor(np.ascontiguousarray(data.val_x)).to(device)
    val_y = torch.as_tensor(np.asarray(data.val_y, dtype=np.int64)).to(device)
    extra_val = {name: (torch.as_tensor(np.ascontiguousarray(x)).to(device),
                        torch.as_tensor(np.asarray(y, dtype=np.int64)).to(device))
                 for name, (x, y) in data.extra_val.items()}
    num_classes = len(data.classes)
    in_chans, img_size = train_x.shape[1], train_x.shape[-1]
    start = resume or init
    mean, std = tuple(start["norm"]) if start else pixel_stats(data.train_x)
    shard = len(train_x) // world
    steps_per_epoch = max(1, shard // cfg.batch_size)
    batch = min(cfg.batch_size, shard)

    # 2. Model, optimizer, loss, schedule.
    model = create_model(cfg.model, num_classes=num_classes, in_chans=in_chans, dropout=cfg.dropout,
                         img_size=img_size, pretrained=cfg.pretrained, **cfg.model_kwargs).to(device)
    if init is not None:
        model.load_state_dict(init["model"])
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    frozen = freeze_modules(model, cfg.freeze)
    optimizer = make_optimizer(model, cfg)
    counts = np.bincount(np.asarray(data.train_y), minlength=num_classes)
    weights = class_weights(counts, cfg.class_weights, cfg.cb_beta)
    weights = None if weights is None else torch.tensor(weights, dtype=torch.float32, device=device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if cfg.compile:
        net = torch.compile(net)
    ema = new_ema(model, cfg)
    ema_steps = 0

    def train_step(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, opt, sched) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal ema_steps
        x = augment(x.float().div_(255.0), cfg.aug_strength, gen)
        targets = F.one_hot(y, num_classes).float()
        x, targets = mix_batch(x, targets, cfg.mixup, cfg.cutmix, gen)
        x = normalize(x, mean, std, cfg.channels_last)
        with autocast(device, precision):
            logits = net(x)
        loss = F.cross_entropy(logits.float(), targets, weight=weights, label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        if sched is not None:
            sched.step()
        if ema is not None:
            ema_steps += 1
            ema.update(model, step=ema_steps)
        return loss.detach(), logits.detach()

    if cfg.time_budget > 0 and resume is None:
        n_val = len(val_x) + sum(len(x) for x, _ in extra_val.values())  # every val set is scored each epoch
        cfg = cfg.replace(epochs=_epochs_for_budget(cfg, model, optimizer, train_step, train_x, train_y, val_x, n_val,
                                                   steps_per_epoch, batch, precision, mean, std, world))
        ema, ema_steps = new_ema(model, cfg), 0  # the timing steps moved it
    schedule = Schedule(optimizer, cfg, steps_per_epoch)
    # The weights that are evaluated, selected and saved: the moving average when there is one.
    scored = ema.module if ema is not None else model

    def scores_on(x: torch.Tensor, y: torch.Tensor, prefix: str) -> dict:
        logits = predict_logits(scored, x, mean=mean, std=std, batch_size=cfg.eval_batch_size,
                                precision=precision, channels_last=cfg.channels_last)
        scores = scores_from_confusion(confusion_matrix(y, logits.argmax(1), num_classes))
        return {f"{prefix}_loss": float(F.cross_entropy(logits, y)), f"{prefix}_acc": scores["accuracy"],
                f"{prefix}_macro_f1": scores["macro_f1"]}

    def evaluate() -> dict:
        metrics = scores_on(val_x, val_y, "val")
        for name, (x, y) in extra_val.items():
            metrics.update(scores_on(x, y, f"val_{name}"))
        if extra_val:
            metrics[MEAN_ACC] = float(np.mean([metrics["val_acc"], *(metrics[f"val_{n}_acc"] for n in extra_val)]))
        return metrics

    sign = selection_sign(cfg.select_metric)
    history: list[dict] = []
    best: dict = {}
    best_state: dict = {}
    start_epoch, since_best = 1, 0
    if resume:
        model.load_state_dict(resume.get("train_model", resume["model"]))
        if ema is not None:
            ema.module.load_state_dict(resume["model"])
            ema_steps = int(resume.get("ema_steps", 0))
        optimizer.load_state_dict(resume["optimizer"])
        schedule.load_state_dict(resume["schedule"])
        order_gen.set_state(resume["rng"]["order"])
        aug_gen.set_state(resume["rng"]["aug"])
        torch.set_rng_state(resume["rng"]["torch"])
        history = list(resume.get("history", []))
        best = dict(resume.get("best", {}))
        best_state = cpu_state(scored, clone=True)
        start_epoch = int(resume["epoch"]) + 1

    def make_checkpoint(epoch: int) -> dict:
        state = {
            "model": cpu_state(scored),
            "config": cfg.to_dict(), "classes": list(data.classes), "in_chans": int(in_chans),
            "img_size": int(img_size), "norm": [mean, std], "epoch": epoch, "history": history,
            "best": best, "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
            "rng": {"order": order_gen.get_state(), "aug": aug_gen.get_state().cpu(), "torch": torch.get_rng_state()},
        }
        if ema is not None:  # "model" holds the averaged weights; resuming also needs the trained ones
            state["train_model"] = cpu_state(model)
            state["ema_steps"] = ema_steps
        return state

    reporter.start({"epochs": cfg.epochs, "steps_per_epoch": steps_per_epoch, "precision": precision,
                    "device": str(device), "params": sum(p.numel() for p in model.parameters()),
                    "train_images": len(train_x), "val_images": len(val_x), "world_size": world,
                    "extra_metrics": extra_metric_names(extra_val), "config": cfg.to_dict()})
    stop_reason = "completed"
    try:
        # 3. Epochs.
        epoch = start_epoch - 1
        while epoch < cfg.epochs:
            epoch += 1
            t0 = time.perf_counter()
            model.train()
            for module in frozen:
                module.eval()  # frozen BatchNorm keeps its statistics
            order = torch.randperm(len(train_x), generator=order_gen)[rank::world][: steps_per_epoch * batch].to(device)
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device)
            for step in range(steps_per_epoch):
                idx = order[step * batch:(step + 1) * batch]
                y = train_y[idx]
                loss, logits = train_step(train_x[idx], y, aug_gen, optimizer, schedule)
                loss_sum += loss * len(idx)
                correct += (logits.argmax(1) == y).sum()
                reporter.step()
            totals = torch.stack([loss_sum, correct.float()])
            if world > 1:
                dist.all_reduce(totals)
            seen = steps_per_epoch * batch * world
            train_loss, train_acc = float(totals[0]) / seen, float(totals[1]) / seen
            if not math.isfinite(train_loss):
                raise TrainingDiverged(f"training loss became {train_loss} in epoch {epoch} (lr {schedule.lr:.3g})")
            train_seconds = time.perf_counter() - t0

            # 4. Validation, reporting, selection.
            metrics = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, **evaluate(),
                       "lr": schedule.lr, "epoch_seconds": time.perf_counter() - t0,
                       "images_per_second": seen / train_seconds}
            schedule.epoch_end(metrics[cfg.select_metric])
            history.append(metrics)
            is_best = not best or sign * metrics[cfg.select_metric] > sign * best[cfg.select_metric]
            if is_best:
                best = dict(metrics)
                best_state = cpu_state(scored, clone=True)
                since_best = 0
            else:
                since_best += 1
            reporter.report(metrics, lambda: make_checkpoint(epoch), is_best)
            if reporter.should_stop():
                stop_reason = "stopped"
                break
            if cfg.early_stop_patience and since_best >= cfg.early_stop_patience:
                stop_reason = "early_stopped"
                break
            # Re-plan while epochs are left: the last planned epoch has annealed the schedule to its
            # end, and stretching it then would restart the learning rate from ~0 (a warm restart).
            if cfg.time_budget > 0 and resume is None and epoch < cfg.epochs:
                planned = _replan_for_budget(cfg, history, run_start, schedule, world, device)
                if planned != cfg.epochs:
                    cfg = cfg.replace(epochs=planned)
                    reporter.replan(planned)
    finally:
        reporter.close()
    return FitResult(config=cfg, history=history, best=best, epochs_run=len(history), stop_reason=stop_reason,
                     best_state=best_state, norm=(mean, std))


def extra_metric_names(extra_val) -> list[str]:
    """The per-epoch metric names that extra val sets add, in the order the loop reports them."""
    names = [f"val_{name}_{m}" for name in extra_val for m in ("loss", "acc", "macro_f1")]
    return names + [MEAN_ACC] if names else []


def cpu_state(module: torch.nn.Module, clone: bool = False) -> dict:
    """The module's state dict on the CPU; clone=True when the weights keep training on the CPU
    (a snapshot that later steps must not change)."""
    return {k: (v.detach().cpu().clone() if clone else v.detach().cpu()) for k, v in module.state_dict().items()}


def new_ema(model: torch.nn.Module, cfg: TrainConfig):
    """timm's moving average of the weights and buffers (BatchNorm statistics too), or None when
    cfg.ema is 0. Its decay warms up from 0 (1 - (1 + step)^-3/4, timm's choice for short runs: 0.98
    after 200 steps, 0.999 after 10k) to cfg.ema, so early epochs are not averaged with the random
    initial weights."""
    if not cfg.ema:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=cfg.ema, use_warmup=True, warmup_power=3 / 4)


def _replan_for_budget(cfg: TrainConfig, history: list[dict], run_start: float, schedule: Schedule,
                       world: int = 1, device: torch.device | str = "cpu") -> int:
    """Epochs that still fit in the time budget at the recent pace (the machine's load may have
    changed since the first estimate); the schedule is stretched or shrunk to match.

    The pace is the median of the last three epochs after the first: the first pays one-off set-up
    (kernel selection, allocations), and one slow epoch should not collapse the schedule. Data-parallel
    workers time themselves a little differently, so they agree on the smallest plan: one that ran an
    epoch more than the others would wait for them forever in its first all-reduce.
    """
    recent = sorted(h["epoch_seconds"] for h in history[1:][-3:])
    if not recent:
        return cfg.epochs
    pace = recent[len(recent) // 2]
    remaining = cfg.time_budget - (time.perf_counter() - run_start)
    planned = int(history[-1]["epoch"]) + max(0, int(remaining / pace))
    if world > 1:
        agreed = torch.tensor([planned], dtype=torch.int64, device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        planned = int(agreed)
    return schedule.resize(planned)


def classifier_of(model: torch.nn.Module) -> torch.nn.Module:
    """The final classification layer: timm's `get_classifier()`, else the last nn.Linear."""
    if hasattr(model, "get_classifier"):
        return model.get_classifier()
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]


def freeze_modules(model: torch.nn.Module, how: str) -> list[torch.nn.Module]:
    """Freeze parameters for fine-tuning and return the modules left wholly frozen.

    "backbone": everything but the classifier (a linear probe). "lower": the first half of the
    parameter tensors below the classifier in definition order (input side first), i.e. the lower
    half of the layers of the feature extractor.
    """
    if how == "none":
        return []
    head = {id(p) for p in classifier_of(model).parameters()}
    body = [p for p in model.parameters() if id(p) not in head]
    if how == "lower":
        body = body[: len(body) // 2]
    for p in body:
        p.requires_grad_(False)
    return [m for m in model.modules()
            if list(m.parameters(recurse=False)) and not any(p.requires_grad for p in m.parameters(recurse=False))]


def _epochs_for_budget(cfg, model, optimizer, train_step, train_x, train_y, val_x, n_val, steps_per_epoch, batch,
                       precision, mean, std, world) -> int:
    """How many epochs fit in cfg.time_budget: time a few real training steps and an eval pass over
    part of val (scaled to the `n_val` images scored per epoch), then restore the model and
    optimizer to their initial state."""
    t_start = time.perf_counter()
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(optimizer.state_dict())
    gen = torch.Generator(device=train_x.device).manual_seed(12345)
    idx = torch.arange(batch, device=train_x.device)
    warmup, timed = 3, 10
    for i in range(warmup + timed):
        if i == warmup:
            t0 = time.perf_counter()
        train_step(train_x[idx], train_y[idx], gen, optimizer, None)
    step_seconds = (time.perf_counter() - t0) / timed
    model.load_state_dict(saved_model)
    optimizer.load_state_dict(saved_opt)
    probe = val_x[: cfg.eval_batch_size * 2]
    t0 = time.perf_counter()
    predict_logits(model, probe, mean=mean, std=std, batch_size=cfg.eval_batch_size, precision=precision,
                   channels_last=cfg.channels_last)
    eval_seconds = (time.perf_counter() - t0) * n_val / max(1, len(probe))
    epoch_seconds = torch.tensor([steps_per_epoch * step_seconds + eval_seconds], device=train_x.device)
    if world > 1:
        dist.all_reduce(epoch_seconds, op=dist.ReduceOp.MAX)
    remaining = cfg.time_budget - (time.perf_counter() - t_start)
    return max(1, int(remaining / (float(epoch_seconds) * 1.05)))
