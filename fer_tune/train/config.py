"""The knobs of one training run, with defaults, validation and YAML round trip.

Every search trial, `fer-tune train`, retraining and fine-tuning build a `TrainConfig`; the search
space's keys are exactly these field names.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fer_tune.errors import UserError, first_line

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop", "adagrad")
SCHEDULES = ("cosine", "onecycle", "plateau", "constant")
CLASS_WEIGHTS = ("none", "inverse", "sqrt_inverse", "effective")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
FREEZE = ("none", "lower", "backbone")
METRICS = ("val_acc", "val_macro_f1", "val_loss")
# Selectable only when a run scores extra val sets (`TrainData.extra_val`, e.g. fine-tuning's source
# val): the mean of val_acc and their accuracies.
MEAN_ACC = "val_mean_acc"


class _UniqueKeys(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error (YAML keeps the last one
    without a word, so an earlier search range or value would silently not apply)."""

    def construct_mapping(self, node, deep=False):
        lines: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in lines:
                raise UserError(f"key {key!r} is given twice (lines {lines[key]} and {line}); keep one")
            lines[key] = line
        return super().construct_mapping(node, deep)


def read_user_yaml(path: Path) -> Any:
    """A YAML file a user wrote (a config, a search space): invalid YAML or a repeated key is one
    line naming the file."""
    try:
        return yaml.load(path.read_text(), Loader=_UniqueKeys)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = getattr(exc, "problem", None) or first_line(exc)
        raise UserError(f"{path}: not valid YAML ({where}{what})") from None
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None


def lower_is_better(metric: str) -> bool:
    """Losses and times are better smaller; every other metric (accuracy, F1, images/s) larger."""
    return metric.endswith("_loss") or metric.endswith("_seconds")


def selection_sign(metric: str) -> float:
    """+1 when a larger value of the selection metric is better, -1 when smaller is (val_loss):
    how every run's best epoch, and every choice between runs, is made."""
    return -1.0 if lower_is_better(metric) else 1.0


MODEL_KW = "model_kwargs."  # flat spelling of one model argument: model_kwargs.width


@dataclass
class TrainConfig:
    # model
    model: str = "vgg_fer_s"
    model_kwargs: dict = field(default_factory=dict)  # extra arguments of the model, e.g. {width: 0.5}
    dropout: float = 0.3
    pretrained: str | None = None  # a local weights file for timm models
    freeze: str = "none"  # fine-tuning: "lower" freezes the first half of the backbone, "backbone" all but the classifier
    # budget
    epochs: int = 30
    time_budget: float = 0.0  # seconds for the whole run; > 0 sizes `epochs` to fit (measured)
    batch_size: int = 128
    # optimisation
    optimizer: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 0.05  # L2 knob: coupled (added to the gradient) for adam/sgd/rmsprop/adagrad, decoupled for adamw
    momentum: float = 0.9  # sgd and rmsprop
    nesterov: bool = True  # sgd
    schedule: str = "cosine"
    warmup_epochs: float = 1.0  # linear warm-up for cosine
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    # loss
    label_smoothing: float = 0.1
    class_weights: str = "none"
    cb_beta: float = 0.999  # beta of the effective-number weights (Cui et al. 2019)
    # augmentation
    aug_strength: float = 0.5  # 0 = none, 1 = strong; flip, affine warp, brightness/contrast, erasing
    mixup: float = 0.0  # Beta(alpha, alpha) of mixup; 0 = off
    cutmix: float = 0.0  # Beta(alpha, alpha) of cutmix; 0 = off
    # weight averaging
    ema: float = 0.0  # decay of an exponential moving average of the weights (e.g. 0.999); 0 = off.
    #                   When on, validation, selection, checkpoints and test use the averaged weights.
    # selection and stopping
    select_metric: str = "val_acc"
    early_stop_patience: int = 0  # epochs without improvement of select_metric; 0 = off
    # data
    subset: float = 1.0  # stratified fraction of train to use
    # runtime
    seed: int = 0
    precision: str = "auto"
    channels_last: bool = True
    compile: bool = False
    eval_batch_size: int = 512

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for f in dataclasses.fields(self):  # nan or inf would pass every range check below
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"config: {f.name} must be a finite number, got {value}")
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        _one_of("schedule", self.schedule, SCHEDULES)
        _one_of("class_weights", self.class_weights, CLASS_WEIGHTS)
        _one_of("precision", self.precision, PRECISIONS)
        _one_of("select_metric", self.select_metric, METRICS + (MEAN_ACC,))
        _one_of("freeze", self.freeze, FREEZE)
        _in_range("aug_strength", self.aug_strength, 0.0, 1.0)
        _in_range("dropout", self.dropout, 0.0, 0.95)
        _in_range("label_smoothing", self.label_smoothing, 0.0, 0.5)
        _in_range("subset", self.subset, 1e-6, 1.0)
        _in_range("cb_beta", self.cb_beta, 0.0, 1.0 - 1e-12)
        _in_range("ema", self.ema, 0.0, 1.0 - 1e-12)
        for name in ("mixup", "cutmix", "weight_decay", "grad_clip", "time_budget", "warmup_epochs"):
            _in_range(name, getattr(self, name), 0.0, float("inf"))
        if self.lr <= 0:
            raise UserError(f"config: lr must be > 0, got {self.lr}")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"config: {name} must be >= 1, got {getattr(self, name)}")
        if self.early_stop_patience < 0:
            raise UserError(f"config: early_stop_patience must be >= 0 (0 = off), got {self.early_stop_patience}")
        if not isinstance(self.model_kwargs, dict):
            raise UserError(f"config: model_kwargs must be a mapping, got {self.model_kwargs!r}")

    # -- conversion --------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "TrainConfig":
        """Build from a mapping; unknown keys are an error that lists the valid ones."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        values = fold_model_kwargs(values, source)
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise UserError(f"{source}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(known)}")
        kwargs = {}
        for key, value in values.items():
            default = known[key].default
            if value is not None and isinstance(default, (bool, int, float)):
                kwargs[key] = _coerce(key, value, type(default), source)
            else:
                kwargs[key] = value
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: config file not found")
        values = read_user_yaml(path) or {}
        if not isinstance(values, dict):
            raise UserError(f"{path}: expected a mapping of config keys, got {type(values).__name__}")
        values.update(overrides or {})
        return cls.from_dict(values, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "TrainConfig":
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _one_of(name: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise UserError(f"config: {name} {value!r} is not one of {', '.join(valid)}")


def _in_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= float(value) <= high:
        raise UserError(f"config: {name} must be in [{low}, {high}], got {value}")


def _coerce(key: str, value: Any, kind: type, source: str) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{source}: {key} must be true or false, got {value!r}")
    if isinstance(value, (dict, list)):
        hint = " (a search range belongs in a search space: search_spaces/README.md)" if isinstance(value, dict) else ""
        raise UserError(f"{source}: {key} must be a number, got {value!r}{hint}")
    try:
        converted = kind(value)
    except (TypeError, ValueError):
        raise UserError(f"{source}: {key} must be a {kind.__name__}, got {value!r}") from None
    except OverflowError:  # int(inf)
        raise UserError(f"{source}: {key} must be a finite {kind.__name__}, got {value!r}") from None
    if kind is int and converted != value:
        raise UserError(f"{source}: {key} must be a whole number, got {value!r}")
    return converted


def fold_model_kwargs(values: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """`model_kwargs.width: 0.5` (a search-space key, or `--set model_kwargs.width=0.5`) merged
    into the `model_kwargs` mapping, so a trial's flat parameters work everywhere a config does."""
    dotted = [k for k in values if k.startswith(MODEL_KW)]
    if not dotted:
        return values
    flat = dict(values)
    model_kwargs = flat.get("model_kwargs")
    if model_kwargs is not None and not isinstance(model_kwargs, dict):
        raise UserError(f"{source}: model_kwargs must be a mapping, got {model_kwargs!r}")
    model_kwargs = dict(model_kwargs or {})
    for key in dotted:
        model_kwargs[key[len(MODEL_KW):]] = flat.pop(key)
    flat["model_kwargs"] = model_kwargs
    return flat
