"""Optimizers and learning-rate schedules of the training loop.

L2 / weight decay: `weight_decay` is the one L2 knob. For adam, sgd, rmsprop and adagrad it is
classic L2 regularisation (wd * w added to the gradient, so with Adam it is rescaled per weight by
the adaptive denominator); for adamw it is decoupled decay (w <- w - lr * wd * w, Loshchilov &
Hutter), which is why good adamw values are typically 10-100x larger than good adam values.
Biases and normalisation parameters (1-d tensors) are never decayed.
"""

from __future__ import annotations

import math

import torch

from fer_tune.train.config import TrainConfig, selection_sign


# Optimizers with a fused kernel (one pass over all parameters) on these devices. On the CPU the
# default per-tensor loop made AdamW's step 3-4x slower (2.2 ms against 0.7 ms for vgg_fer_s, 9.4
# against 2.1 ms with its 1024-wide head, one thread): a few percent of a training step at batch 64.
FUSED = ("adam", "adamw", "sgd", "adagrad")
FUSED_DEVICES = ("cpu", "cuda")


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    devices = {p.device.type for p in decay + no_decay}
    fused = {"fused": True} if cfg.optimizer in FUSED and devices <= set(FUSED_DEVICES) else {}
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, **fused)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, **fused)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               **fused)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.optimizer == "adagrad":
        return torch.optim.Adagrad(groups, lr=cfg.lr, **fused)
    raise ValueError(cfg.optimizer)


class Schedule:
    """A learning-rate schedule stepped after every batch (`step`) and after every epoch (`epoch_end`)."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
        self.steps_per_epoch = steps_per_epoch
        self.total = max(1, cfg.epochs * steps_per_epoch)
        self.per_step = None
        self.plateau = None
        if cfg.schedule == "cosine":
            warm = min(int(cfg.warmup_epochs * steps_per_epoch), self.total - 1)

            def factor(step: int) -> float:
                if step < warm:
                    return (step + 1) / warm
                progress = (step - warm) / max(1, self.total - warm)
                return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

            self.per_step = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        elif cfg.schedule == "onecycle":
            self.per_step = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=self.total)
        elif cfg.schedule == "plateau":
            mode = "max" if selection_sign(cfg.select_metric) > 0 else "min"
            self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=0.5, patience=2)
        self.optimizer = optimizer

    def resize(self, epochs: int) -> int:
        """Re-plan the run to `epochs` in total (a time budget under changing load); returns the
        epochs the schedule can honour: cosine stretches or shrinks, onecycle can only be cut short."""
        if isinstance(self.per_step, torch.optim.lr_scheduler.OneCycleLR):
            epochs = min(epochs, self.total // self.steps_per_epoch)
        else:
            self.total = max(1, epochs * self.steps_per_epoch)
        return epochs

    def step(self) -> None:
        if self.per_step is not None:
            self.per_step.step()

    def epoch_end(self, metric: float) -> None:
        if self.plateau is not None:
            self.plateau.step(metric)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        inner = self.per_step or self.plateau
        return inner.state_dict() if inner is not None else {}

    def load_state_dict(self, state: dict) -> None:
        inner = self.per_step or self.plateau
        if inner is not None and state:
            inner.load_state_dict(state)
