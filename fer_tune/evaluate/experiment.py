"""Reading a search experiment folder back: the ranked trial configs, the budget, the dataset.

`results/<experiment>/` holds `trials.csv` / `trials.parquet` (one row per trial: the sampled
hyperparameters as columns, `best_<metric>`, `status`, ...), `best.json` (the best trial's row and
its full training config) and `search.yaml` (the resolved space with `max_epochs`, the dataset's
name and sha256, the search's flags). This module reads whatever of that is there and turns the
K best trials into `TrainConfig`s, the same way the search built them (`SearchSpace.trial_config`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fer_tune.errors import UserError
from fer_tune.search.results import load_table, plain_value
from fer_tune.train.config import TrainConfig, fold_model_kwargs, lower_is_better

# Columns of the trial table that are not hyperparameters.
NOT_PARAMS = {"trial_id", "status", "epochs", "wall_s", "startup_s", "failures", "node_ip", "node_id", "error",
              "trial_dir"}
RANKABLE = ("completed", "stopped early", "interrupted", "running")  # a trial with a best metric


@dataclass
class RankedConfig:
    """One trial of the table, best first (`rank` 1 = best), with the config to retrain it."""

    rank: int
    trial_id: str
    score: float | None  # its best value of the search metric
    config: TrainConfig
    params: dict = field(default_factory=dict)  # the sampled hyperparameters, as in the table


@dataclass
class Experiment:
    path: Path
    name: str
    table: Any  # pandas DataFrame (may be empty)
    best: dict  # best.json ({} when absent)
    record: dict  # search.yaml ({} when absent)
    metric: str = "val_acc"
    mode: str = "max"
    max_epochs: int | None = None
    dataset: str | None = None  # the prepared dataset's name ("in-memory" for a TrainData search)
    dataset_sha256: str | None = None
    seed: int = 0

    @property
    def final_dir(self) -> Path:
        return self.path / "final"

    @property
    def transfer_dir(self) -> Path:
        return self.path / "transfer"

    def ranked(self, count: int) -> list[RankedConfig]:
        """The `count` best trials with their training configs (rank 1 first)."""
        return ranked_configs(self, count)


def check_epochs_or_budget(epochs: int | None, time_budget: float | None) -> None:
    """`retrain` and `transfer` (like `train`) take a number of epochs or a time budget, not both: with a
    budget the loop sizes the epochs itself."""
    if epochs is not None and epochs < 1:
        raise UserError(f"--epochs {epochs}: must be >= 1")
    if time_budget is not None and not time_budget > 0:
        raise UserError(f"--time-budget {time_budget}: must be > 0 seconds")
    if epochs is not None and time_budget is not None:
        raise UserError("--epochs and --time-budget exclude each other: give a number of epochs, or a duration "
                        "to train as many as fit in it")


def check_overrides(overrides: dict, own_flags: dict[str, str], command: str) -> dict:
    """`--set KEY=VALUE` keys: config keys (checked like a config file: unknown keys and bad values are
    one line), but not those the command sets itself (`own_flags`: key -> what to use instead)."""
    for key in overrides:
        own = key.split(".")[0]  # model_kwargs.width belongs to model_kwargs
        if own in own_flags:
            raise UserError(f"--set {key}: {command} sets {own} itself; {own_flags[own]}")
    TrainConfig.from_dict(dict(overrides), source="--set")
    return dict(overrides)


def read_experiment(target: str | Path | None, storage: str | Path = "results") -> Experiment:
    """An experiment folder (a path, a name under `storage`, or None for the latest there)."""
    from fer_tune.search.results import find_experiment

    path = find_experiment(str(target) if target is not None else None, storage)
    record = _read_yaml(path / "search.yaml")
    best = _read_json(path / "best.json")
    table = load_table(path, missing_ok=True)
    space = record.get("space") or {}
    dataset = record.get("dataset") or {}
    flags = record.get("flags") or {}
    metric = space.get("metric") or best.get("metric") or "val_acc"
    mode = space.get("mode") or best.get("mode") or ("min" if lower_is_better(metric) else "max")
    max_epochs = space.get("max_epochs")
    if max_epochs is None and len(table) and "epochs" in table.columns:
        max_epochs = int(table["epochs"].max())  # the longest trial: what ASHA let survive
    return Experiment(path=path, name=record.get("name") or path.name, table=table, best=best, record=record,
                      metric=metric, mode=mode, max_epochs=int(max_epochs) if max_epochs else None,
                      dataset=dataset.get("name"), dataset_sha256=dataset.get("sha256"),
                      seed=int(flags.get("seed", 0) or 0))


def ranked_configs(exp: Experiment, count: int) -> list[RankedConfig]:
    """The `count` best trials of the table by the best value of the search metric, failed trials
    and trials without the metric left out. Configs come from best.json for the best trial when it
    is there, else from the table's hyperparameter columns through the space in search.yaml."""
    if count < 1:
        raise UserError(f"--rank/--top-k/--screen {count}: must be >= 1")
    df = exp.table
    key = f"best_{exp.metric}"
    rows: list[dict] = []
    if len(df) and key in df.columns:
        ok = df[df[key].notna()]
        if "status" in ok.columns:
            ok = ok[ok["status"].astype(str).isin(RANKABLE)]
        ok = ok.sort_values(key, ascending=exp.mode == "min", kind="stable")
        rows = [{k: plain_value(v) for k, v in r.items()} for r in ok.to_dict("records")]
    if not rows and exp.best.get("config"):
        rows = [dict(exp.best.get("trial") or {}, trial_id=(exp.best.get("trial") or {}).get("trial_id", "best"))]
    if not rows:
        raise UserError(f"{exp.path}: no finished trial with {key} in trials.csv or best.json; "
                        f"let the search run longer (`fer-tune trials {exp.path}` shows the table)")
    if count > len(rows):
        raise UserError(f"--rank/--top-k/--screen {count}: {exp.path} has only {len(rows)} ranked trial(s)")
    out = []
    for rank, row in enumerate(rows[:count], start=1):
        out.append(RankedConfig(rank=rank, trial_id=str(row.get("trial_id", rank)), score=row.get(key),
                                config=_config_of(exp, row), params=_params_of(row)))
    return out


def _config_of(exp: Experiment, row: dict) -> TrainConfig:
    best_trial = (exp.best.get("trial") or {}).get("trial_id")
    if exp.best.get("config") and str(best_trial) == str(row.get("trial_id")):
        return TrainConfig.from_dict(exp.best["config"], source=f"{exp.path / 'best.json'} config")
    params = _params_of(row)
    space = (exp.record.get("space") or {})
    if space.get("params"):
        from fer_tune.search.space import space_from_record

        parsed = space_from_record({"name": exp.name, **space}, source=str(exp.path / "search.yaml"))
        # Fixed values of the space are not columns of every table version: add them first.
        picked = {name: p.pick(params) for name, p in parsed.params.items()}
        values = {name: b.args for name, b in picked.items() if b is not None and b.fixed}
        values.update({k: parsed.params[k].from_table(v) for k, v in params.items() if k in parsed.params})
        return parsed.trial_config(values, epochs=exp.max_epochs, seed=exp.seed)
    # No space: the table's columns are TrainConfig keys (model_kwargs.X folded in), and a column some
    # rows leave empty is float, so its integers come back whole (vgg_fer_s refuses fc=512.0).
    flat = fold_model_kwargs({"model_kwargs": {}, **{k: _whole(k, v) for k, v in params.items()}})
    known = set(TrainConfig.__dataclass_fields__)
    unknown = sorted(set(flat) - known)
    if unknown:
        raise UserError(f"{exp.path}: trial {row.get('trial_id')} has columns {', '.join(unknown)} that are not "
                        "training config keys, and search.yaml (which would explain them) is missing")
    flat.setdefault("seed", exp.seed)
    if exp.max_epochs:
        flat.setdefault("epochs", exp.max_epochs)
    return TrainConfig.from_dict(flat, source=f"{exp.path / 'trials.csv'} trial {row.get('trial_id')}")


def _whole(key: str, value):
    """A table's 512.0 as 512 where an integer is meant: model knobs (their own types are unknown
    without the space; the models take whole numbers for sizes) and the int fields of TrainConfig."""
    spec = TrainConfig.__dataclass_fields__.get(key)
    wants_int = key.startswith("model_kwargs.") or (spec is not None and spec.type in ("int", int))
    return int(value) if wants_int and isinstance(value, float) and value.is_integer() else value


def _params_of(row: dict) -> dict:
    """The hyperparameter columns of a table row (not metrics, not bookkeeping, not empty);
    list/dict values the table stored as JSON text are decoded."""
    out = {}
    for key, value in row.items():
        if key in NOT_PARAMS or key.startswith(("best_", "last_")) or value is None:
            continue
        if isinstance(value, str) and value[:1] in "[{":
            try:
                value = json.loads(value)
            except ValueError:
                pass
        out[key] = value
    return out


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return value if isinstance(value, dict) else {}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except ValueError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    return value if isinstance(value, dict) else {}
