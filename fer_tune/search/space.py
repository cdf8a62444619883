"""Search spaces: YAML files of training-config keys, each a fixed value or a distribution.

    space = load_space("cnn")            # search_spaces/cnn.yaml, or a path to a .yaml file
    params = space.suggest(optuna_trial)   # define-by-run: samples the active parameters
    cfg = space.trial_config(params, epochs=space.max_epochs, seed=0)

A file is one flat mapping (see search_spaces/README.md):

    metric: val_acc                # what ASHA and Optuna optimise, and its mode
    mode: max
    max_epochs: 30                 # the budget: ASHA's max_t, grace period and reduction factor
    grace_period: 3
    reduction_factor: 3
    promotion_window: 0            # ASHA's bar: all results at a rung (0), or the last N
    model: {choice: [simple_cnn, vgg_fer]}
    model_kwargs.width: {choice: [0.5, 1.0], when: {model: vgg_fer}}
    optimizer: {choice: [adamw, sgd]}
    lr:                            # one range per optimizer (alternatives: conditions must not overlap)
      - {loguniform: [1.0e-4, 1.0e-2], when: {optimizer: adamw}}
      - {loguniform: [1.0e-3, 1.0e-1], when: {optimizer: sgd}}
    momentum: {uniform: [0.8, 0.99], when: {optimizer: sgd}}
    label_smoothing: 0.1           # fixed

Everything is checked on load against the model registry and `TrainConfig`, so a typo fails
before Ray starts, with a message that lists what is valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fer_tune.errors import UserError
from fer_tune.train.config import (CLASS_WEIGHTS, MEAN_ACC, METRICS, MODEL_KW, OPTIMIZERS, PRECISIONS, SCHEDULES,
                                    TrainConfig, lower_is_better, read_user_yaml)
from fer_tune.train.report import METRIC_NAMES

# search_spaces/ of the repository (a clone, an editable install); an installed wheel carries the
# same files as fer_tune/search_spaces/ (pyproject.toml maps them there).
SPACES_DIR = next((d for d in (Path(__file__).resolve().parents[2] / "search_spaces",
                               Path(__file__).resolve().parents[1] / "search_spaces") if d.is_dir()),
                  Path(__file__).resolve().parents[2] / "search_spaces")
KINDS = ("choice", "uniform", "loguniform", "int", "quniform", "value")
BUDGET_KEYS = ("max_epochs", "grace_period", "reduction_factor", "promotion_window")
META_KEYS = ("description", "metric", "mode", "trials") + BUDGET_KEYS
RECORD_KEYS = tuple(k for k in META_KEYS if k != "description")  # what search.yaml keeps of a space
# Set by the search itself, never by a space.
RESERVED = {"epochs": "set by max_epochs (ASHA stops trials early)", "time_budget": "ASHA sizes the budget",
            "subset": "use `fer-tune search --subset`"}
CHOICES = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES, "class_weights": CLASS_WEIGHTS, "precision": PRECISIONS}
SEARCH_METRICS = tuple(m for m in METRIC_NAMES if m not in ("epoch", "lr"))


@dataclass
class Param:
    """One key of the space: a distribution (or a fixed `value`), active when `when` holds."""

    name: str
    kind: str  # one of KINDS
    args: Any  # choice: list of values; uniform/loguniform/int: [low, high]; quniform: [low, high, q]; value: the value
    when: dict[str, list] = field(default_factory=dict)  # earlier param -> values that activate this one
    log: bool = False  # int only: sample on a log scale
    label: str = ""  # Optuna's name for it when not `name` (a branch of Alternatives)

    @property
    def fixed(self) -> bool:
        return self.kind == "value"

    def active(self, values: dict[str, Any]) -> bool:
        return all(key in values and values[key] in allowed for key, allowed in self.when.items())

    def pick(self, values: dict[str, Any]) -> "Param | None":
        """The distribution that applies given the keys sampled so far: this one, or None."""
        return self if self.active(values) else None

    def candidates(self) -> list:
        """Values this parameter can take at its edges (for validation and for `when` references)."""
        if self.kind == "choice":
            return list(self.args)
        if self.kind == "value":
            return [self.args]
        return list(self.args[:2])

    def from_table(self, value: Any) -> Any:
        """A value read back from a trials table, in this parameter's own type: a column holding
        several models' keys is float wherever a row is empty, so `fc: 512` comes back as 512.0."""
        if self.kind == "choice":
            return next((c for c in self.args if c == value and type(c) is not bool), value)
        if self.kind == "int" and isinstance(value, float) and value.is_integer():
            return int(value)
        return value

    def suggest(self, trial) -> Any:
        low, high = (self.args[0], self.args[1]) if self.kind not in ("choice", "value") else (None, None)
        if self.kind == "value":
            return self.args
        name = self.label or self.name
        if self.kind == "choice":
            tokens = [_token(v) for v in self.args]
            picked = trial.suggest_categorical(name, tokens)
            return self.args[tokens.index(picked)]
        if self.kind == "uniform":
            return trial.suggest_float(name, low, high)
        if self.kind == "loguniform":
            return trial.suggest_float(name, low, high, log=True)
        if self.kind == "quniform":
            return trial.suggest_float(name, low, high, step=self.args[2])
        return trial.suggest_int(name, low, high, log=self.log)

    def spec(self) -> dict[str, Any]:
        """This parameter as its YAML mapping (search.yaml)."""
        entry: dict[str, Any] = {self.kind: self.args}
        if self.when:
            entry["when"] = self.when
        if self.log:
            entry["log"] = True
        return entry

    def describe(self) -> str:
        text = {"value": f"{self.args!r}", "choice": f"choice {list(self.args)}"}.get(
            self.kind, f"{self.kind} {list(self.args)}")
        if self.when:
            text += " when " + ", ".join(f"{k} in {v}" for k, v in self.when.items())
        return text


@dataclass
class Alternatives:
    """One key with a distribution per condition, e.g. a learning-rate range per optimizer (SGD
    wants 10-30x AdamW's):

        lr:
          - {loguniform: [1.0e-4, 1.0e-2], when: {optimizer: [adam, adamw]}}
          - {loguniform: [5.0e-3, 2.0e-1], when: {optimizer: sgd}}

    The conditions must not overlap, so at most one branch applies to a trial (none: the key keeps
    its TrainConfig default). Each branch samples under its own Optuna name (`lr[optimizer=sgd]`), so
    TPE models each range from the trials it applied to; the trial's config and tables see `lr`."""

    name: str
    branches: list[Param]
    kind = "alternatives"

    @property
    def args(self) -> list[dict[str, Any]]:
        return [b.spec() for b in self.branches]

    @property
    def when(self) -> dict[str, list]:
        """What any branch needs (truthy: the key is conditional)."""
        merged: dict[str, list] = {}
        for b in self.branches:
            for key, allowed in b.when.items():
                merged.setdefault(key, [])
                merged[key] += [v for v in allowed if v not in merged[key]]
        return merged

    @property
    def fixed(self) -> bool:
        return all(b.fixed for b in self.branches)

    def pick(self, values: dict[str, Any]) -> Param | None:
        return next((b for b in self.branches if b.active(values)), None)

    def candidates(self) -> list:
        return [c for b in self.branches for c in b.candidates()]

    def from_table(self, value: Any) -> Any:
        """As the first branch that converts the value (`Param.from_table` returns another object,
        e.g. 512 for 512.0) reads it back; unchanged when none does."""
        for b in self.branches:
            back = b.from_table(value)
            if back is not value:
                return back
        return value

    def spec(self) -> list[dict[str, Any]]:
        return self.args

    def describe(self) -> str:
        return " | ".join(b.describe() for b in self.branches)


@dataclass
class SearchSpace:
    name: str
    params: dict[str, Param | Alternatives]  # in file order; conditions refer to earlier keys
    metric: str = "val_acc"
    mode: str = "max"
    max_epochs: int = 20
    grace_period: int = 2
    reduction_factor: int = 3
    promotion_window: int = 0  # 0: ASHA's cut over all results at a rung; N: over the last N (tuner.RecentASHA)
    trials: int = 20
    description: str = ""
    source: str = ""

    def suggest(self, trial) -> dict[str, Any]:
        """Define-by-run: sample the active parameters in file order; returns every active key
        (fixed ones too), with the real values of list-valued choices."""
        values: dict[str, Any] = {}
        for param in self.params.values():
            picked = param.pick(values)
            if picked is not None:
                values[param.name] = picked.suggest(trial)
        return values

    def startup_points(self, trials: int) -> list[dict[str, Any]]:
        """The first trials of a search, one per architecture ({"model": name}; the other keys are
        sampled). Random start-up draws of a 3-way choice can all land on one model, and TPE then
        never tries the others; this costs nothing when the search has at least two trials per
        model, and is skipped otherwise."""
        model = self.params.get("model")
        if model is None or model.kind != "choice" or model.when or trials < 2 * len(model.args):
            return []
        return [{"model": name} for name in model.args]

    def searched(self) -> list[str]:
        """Names of the sampled (not fixed) parameters."""
        return [p.name for p in self.params.values() if not p.fixed]

    def trial_config(self, values: dict[str, Any], *, epochs: int | None = None, seed: int | None = None,
                     subset: float = 1.0) -> TrainConfig:
        """The TrainConfig of one trial (`model_kwargs.X` keys go into model_kwargs); the metric
        picks the best epoch."""
        flat = dict(values)
        flat["epochs"] = int(epochs or self.max_epochs)
        flat["subset"] = subset
        if seed is not None and "seed" not in values:
            flat["seed"] = seed
        if self.metric in ("val_acc", "val_macro_f1", "val_loss") and "select_metric" not in values:
            flat["select_metric"] = self.metric
        return TrainConfig.from_dict(flat, source=f"search space {self.name}")

    def to_dict(self) -> dict[str, Any]:
        """The resolved space as plain data (written to search.yaml)."""
        out: dict[str, Any] = {"name": self.name, "source": self.source, "metric": self.metric, "mode": self.mode,
                               "max_epochs": self.max_epochs, "grace_period": self.grace_period,
                               "reduction_factor": self.reduction_factor, "promotion_window": self.promotion_window,
                               "trials": self.trials, "params": {}}
        for p in self.params.values():
            out["params"][p.name] = p.spec()
        return out

    def with_budget(self, **changes) -> "SearchSpace":
        """A copy with metric/mode/budget overrides (None = keep); checked like the file."""
        changes = {k: v for k, v in changes.items() if v is not None}
        new = dataclasses.replace(self, **changes)
        if "metric" in changes and "mode" not in changes:
            new.mode = default_mode(new.metric)
        _check_meta(new, f"search space {self.name}")
        return new


# -- loading ----------------------------------------------------------------------------------

def list_spaces(directory: Path = SPACES_DIR) -> list[str]:
    return sorted(p.stem for p in Path(directory).glob("*.yaml"))


def space_path(name_or_path: str | Path, directory: Path = SPACES_DIR) -> Path:
    """search_spaces/<name>.yaml for a name, else the path itself."""
    text = str(name_or_path)
    candidate = Path(text).expanduser()
    if text.endswith((".yaml", ".yml")) or "/" in text or candidate.is_file():
        if not candidate.is_file():
            raise UserError(f"--space {text}: file not found")
        return candidate
    path = Path(directory) / f"{text}.yaml"
    if not path.is_file():
        names = list_spaces(directory)
        close = difflib.get_close_matches(text, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"--space {text}: unknown search space{hint}; available: {', '.join(names) or 'none'} "
                        f"(in {directory}), or give a path to a .yaml file")
    return path


def load_space(name_or_path: str | Path, directory: Path = SPACES_DIR) -> SearchSpace:
    path = space_path(name_or_path, directory)
    return parse_space(read_user_yaml(path), name=path.stem, source=str(path))


def space_from_record(saved: dict, source: str = "") -> SearchSpace:
    """The space a search ran with, from the `space` entry of its search.yaml (SearchSpace.to_dict);
    records written before a key existed get its default."""
    raw = {k: saved[k] for k in RECORD_KEYS if k in saved}
    raw.update(saved["params"])
    return parse_space(raw, name=saved.get("name", "space"), source=source or saved.get("source", ""))


def parse_space(raw: Any, name: str = "space", source: str = "") -> SearchSpace:
    """Build and validate a SearchSpace from the mapping of a YAML file."""
    where = source or f"search space {name}"
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{where}: expected a mapping of training-config keys, got {type(raw).__name__}")
    meta = {k: raw[k] for k in META_KEYS if k in raw}
    space = SearchSpace(name=name, params={}, source=source, **{k: v for k, v in meta.items() if k != "mode"})
    space.mode = meta.get("mode") or default_mode(space.metric)
    _check_meta(space, where)
    valid_keys = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in RESERVED]
    for key, spec in raw.items():
        if key in META_KEYS:
            continue
        key = str(key)
        if key in RESERVED:
            raise UserError(f"{where}: key {key!r} cannot be searched or fixed in a space ({RESERVED[key]})")
        if key not in valid_keys and not key.startswith(MODEL_KW):
            close = difflib.get_close_matches(key, valid_keys + list(META_KEYS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"{where}: unknown key {key!r}{hint}; valid keys: {', '.join(valid_keys)}, "
                            f"model_kwargs.<arg>, {', '.join(META_KEYS)}")
        space.params[key] = _parse_param(key, spec, space.params, where)
        if key == "model":  # now: a misspelt model is reported as such, not by a later key's `when: {model: ...}`
            _check_values(space.params[key], space, where)
    if "model" not in space.params:
        space.params = {"model": Param("model", "value", TrainConfig.model), **space.params}
    for param in space.params.values():
        _check_values(param, space, where)
    return space


def default_mode(metric: str) -> str:
    return "min" if lower_is_better(metric) else "max"


def _check_meta(space: SearchSpace, where: str) -> None:
    if space.metric not in SEARCH_METRICS:
        raise UserError(f"{where}: metric {space.metric!r} is not one of {', '.join(SEARCH_METRICS)}")
    if space.mode not in ("min", "max"):
        raise UserError(f"{where}: mode {space.mode!r} must be min or max")
    for key in BUDGET_KEYS + ("trials",):
        value = getattr(space, key)
        least = 0 if key == "promotion_window" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise UserError(f"{where}: {key} must be a whole number >= {least}, got {value!r}")
    if space.reduction_factor < 2:
        raise UserError(f"{where}: reduction_factor must be >= 2, got {space.reduction_factor}")
    if 0 < space.promotion_window < space.reduction_factor:
        raise UserError(f"{where}: promotion_window ({space.promotion_window}) must be 0 (all results) or at least "
                        f"reduction_factor ({space.reduction_factor}): ASHA keeps the best 1/{space.reduction_factor} "
                        "of the window")
    if space.grace_period > space.max_epochs:
        raise UserError(f"{where}: grace_period ({space.grace_period}) exceeds max_epochs ({space.max_epochs}); "
                        "lower --grace-period or raise --max-epochs (or the space's keys of those names)")


def _parse_param(key: str, spec: Any, earlier: dict[str, Param], where: str) -> Param | Alternatives:
    if isinstance(spec, list) and spec and all(isinstance(s, dict) and set(s) & set(KINDS) for s in spec):
        return _parse_alternatives(key, spec, earlier, where)
    if not isinstance(spec, dict) or (key == "model_kwargs" and not set(spec) & set(KINDS)):
        return Param(key, "value", spec)  # a fixed value (the model_kwargs mapping is a value too)
    kinds = [k for k in spec if k in KINDS]
    extra = sorted(set(spec) - set(KINDS) - {"when", "log"})
    if len(kinds) != 1 or extra:
        raise UserError(f"{where}: {key}: give exactly one of {', '.join(KINDS)} (plus optional when:, log:), "
                        f"got {', '.join(map(str, spec))}")
    kind, args = kinds[0], spec[kinds[0]]
    when = _parse_when(key, spec.get("when"), earlier, where)
    log = spec.get("log", False)
    if log and kind != "int":
        raise UserError(f"{where}: {key}: log: only applies to int (use loguniform for floats)")
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise UserError(f"{where}: {key}: choice needs a non-empty list of values, got {args!r}")
        if len({_token(v) for v in args}) != len(args):
            raise UserError(f"{where}: {key}: choice lists a value twice: {args}")
    elif kind != "value":
        size = 3 if kind == "quniform" else 2
        shape = "[low, high, q]" if kind == "quniform" else "[low, high]"
        if not isinstance(args, list) or len(args) != size or not all(_is_number(a) for a in args):
            hint = " (write floats with a dot: 1.0e-4; YAML reads 1e-4 as text)" if any(
                isinstance(x, str) for x in (args if isinstance(args, list) else [])) else ""
            raise UserError(f"{where}: {key}: {kind} needs {shape} numbers, got {args!r}{hint}")
        low, high = args[0], args[1]
        if not low < high:
            raise UserError(f"{where}: {key}: {kind} needs low < high, got {args}")
        if kind == "loguniform" and low <= 0:
            raise UserError(f"{where}: {key}: loguniform needs low > 0, got {low}")
        if kind == "int" and not all(float(a).is_integer() for a in args):
            raise UserError(f"{where}: {key}: int needs whole-number bounds, got {args}")
        if kind == "int":
            args = [int(a) for a in args]
            if log and args[0] < 1:
                raise UserError(f"{where}: {key}: int with log: true needs low >= 1, got {args[0]}")
        if kind == "quniform" and args[2] <= 0:
            raise UserError(f"{where}: {key}: quniform needs q > 0, got {args[2]}")
        if kind == "quniform" and abs((steps := (high - low) / args[2]) - round(steps)) > 1e-6:
            raise UserError(f"{where}: {key}: quniform's range {high - low:g} is not a whole number of steps of "
                            f"{args[2]:g} (Optuna would cut high to {low + int(steps) * args[2]:g}); adjust high or q")
        args = list(args)
    return Param(key, kind, args, when, bool(log))


def _parse_alternatives(key: str, specs: list, earlier: dict[str, Param], where: str) -> Alternatives:
    branches = []
    for spec in specs:
        if "when" not in spec:
            raise UserError(f"{where}: {key}: each alternative needs a when: (which trials it applies to), "
                            f"got {spec}")
        branch = _parse_param(key, spec, earlier, where)
        branch.label = f"{key}[" + ",".join(f"{k}={'|'.join(map(str, v))}" for k, v in branch.when.items()) + "]"
        for other in branches:
            if _overlap(branch.when, other.when):
                raise UserError(f"{where}: {key}: alternatives {other.describe()!r} and {branch.describe()!r} can "
                                "both apply to one trial; make their when: conditions exclusive")
        branches.append(branch)
    return Alternatives(key, branches)


def _overlap(a: dict[str, list], b: dict[str, list]) -> bool:
    """Whether some trial can meet both conditions: every key both name shares a value."""
    return all(set(map(_token, a[k])) & set(map(_token, b[k])) for k in set(a) & set(b))


def _parse_when(key: str, when: Any, earlier: dict[str, Param], where: str) -> dict[str, list]:
    if when is None:
        return {}
    if not isinstance(when, dict) or not when:
        raise UserError(f"{where}: {key}: when: needs a mapping like {{optimizer: [sgd, rmsprop]}}, got {when!r}")
    out = {}
    for ref, values in when.items():
        if ref not in earlier:
            raise UserError(f"{where}: {key}: when: refers to {ref!r}, which is not a key above it "
                            f"(conditions refer to earlier keys: {', '.join(earlier) or 'none'})")
        values = values if isinstance(values, list) else [values]
        param = earlier[ref]
        if param.kind in ("choice", "value"):
            possible = param.candidates()
            missing = [v for v in values if v not in possible]
            if missing:
                raise UserError(f"{where}: {key}: when: {ref} can never be {missing[0]!r}; "
                                f"{ref} takes {', '.join(map(str, possible))}")
        else:
            raise UserError(f"{where}: {key}: when: can only refer to a choice or a fixed value; {ref} is {param.kind}")
        out[str(ref)] = values
    return out


def _check_values(param: Param, space: SearchSpace, where: str) -> None:
    """Every value a parameter can take must be valid for the loop: a known model, optimizer,
    schedule or class-weight scheme; a number in TrainConfig's range; a model argument that
    each model it applies to accepts."""
    if isinstance(param, Alternatives):
        for branch in param.branches:
            _check_values(branch, space, where)
        return
    name = param.name
    if name == "model":
        for model in param.candidates():
            _check_model(model, where)
        return
    if name in CHOICES:
        for value in param.candidates():
            if value not in CHOICES[name]:
                raise UserError(f"{where}: {name}: unknown {name.replace('_', ' ')} {value!r}; "
                                f"valid: {', '.join(CHOICES[name])}")
    if name.startswith(MODEL_KW) or name == "model_kwargs":
        args = [name[len(MODEL_KW):]] if name.startswith(MODEL_KW) else list(param.args or {})
        if name == "model_kwargs" and not isinstance(param.args, dict):
            raise UserError(f"{where}: model_kwargs must be a mapping of model arguments, got {param.args!r}")
        from fer_tune.models import model_arguments

        for model in _models_for(param, space):
            accepted = model_arguments(model)  # the model names were checked above
            if accepted is None:
                continue  # timm: checked when the model is built
            for arg in args:
                if arg not in accepted:
                    raise UserError(f"{where}: {name}: model {model!r} has no argument {arg!r}; it accepts "
                                    f"{', '.join(accepted) or 'none'} (add when: {{model: [...]}} to limit "
                                    f"{name} to the models that take it)")
        return
    if name == "pretrained":  # a local weights file: missing, every trial would fail on it
        from fer_tune.models.registry import weights_file

        for value in param.candidates():
            if isinstance(value, (str, Path)):
                try:
                    weights_file(value)
                except UserError as exc:
                    raise UserError(f"{where}: pretrained: {exc}") from None
    default = next((f.default for f in dataclasses.fields(TrainConfig) if f.name == name), None)
    whole = isinstance(default, int) and not isinstance(default, bool)
    if whole and (param.kind in ("uniform", "loguniform")
                  or param.kind == "quniform" and not all(float(a).is_integer() for a in (param.args[0], param.args[2]))):
        raise UserError(f"{where}: {name} takes whole numbers, which {param.kind}: {list(param.args)} does not "
                        f"draw; use int: [low, high], or quniform with a whole low and step")
    for value in param.candidates():
        if isinstance(value, str) and isinstance(default, (int, float)) and not isinstance(default, bool):
            # the trial would coerce it, but the tables and records would show the text
            raise UserError(f"{where}: {name}: {value!r} is text, not a number (write floats with a dot: 1.0e-4; "
                            "YAML reads 1e-4 as text)")
        if name == "select_metric" and value == MEAN_ACC:
            raise UserError(f"{where}: select_metric {MEAN_ACC} is for fine-tuning, which scores a second val split "
                            f"(`fer-tune transfer --select mean`); a search trial has one: use {', '.join(METRICS)}")
        try:
            TrainConfig.from_dict({name: value, "model_kwargs": {}}, source=where)
        except UserError as exc:
            detail = str(exc).split(": ", 1)[-1]  # "dropout must be in ...": the key already leads
            raise UserError(f"{where}: {detail if detail.startswith(name) else f'{name}: {detail}'}") from None


def _models_for(param: Param, space: SearchSpace) -> list[str]:
    """The models a parameter can be active with: its own `when: {model: ...}` or every model."""
    if "model" in param.when:
        return list(param.when["model"])
    return space.params["model"].candidates()


def _check_model(model: Any, where: str) -> None:
    from fer_tune.models import list_models

    if not isinstance(model, str):
        raise UserError(f"{where}: model: {model!r} is not a model name")
    if model.startswith("timm/"):
        import timm

        if not timm.is_model(model[len("timm/"):]):
            close = difflib.get_close_matches(model[len("timm/"):], timm.list_models(), n=1)
            hint = f" (did you mean 'timm/{close[0]}'?)" if close else ""
            raise UserError(f"{where}: model: unknown timm model {model!r}{hint}; see timm.list_models()")
        return
    if model not in list_models():
        close = difflib.get_close_matches(model, list_models(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"{where}: model: unknown model {model!r}{hint}; choose from {', '.join(list_models())}, "
                        f"or timm/<name>")


def _token(value: Any) -> Any:
    """Optuna's categorical values must be None, bool, int, float or str: lists and mappings
    (e.g. mlp `hidden` sizes) are sampled as their YAML text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return yaml.safe_dump(value, default_flow_style=True).strip()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
