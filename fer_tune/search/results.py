"""The search's tables: one row per trial, written by one function while the search runs (a Tune
callback) and at the end, and read back by `fer-tune trials`.

`<experiment>/trials.csv` and `trials.parquet`: every hyperparameter, best and last value of every
metric, epochs run, status (completed / stopped early / failed / interrupted / running / pending)
with the error of a failed trial, wall time, startup (trial start to first report, less that
epoch's own time) and node id. `best.json`: the best trial's row and its training config.
"""

from __future__ import annotations

import json
import math
import os
import re
import uuid
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from fer_tune.errors import UserError, first_line
from fer_tune.train.config import lower_is_better
from fer_tune.train.report import METRIC_NAMES

TABLE_METRICS = tuple(m for m in METRIC_NAMES if m != "epoch")
FIRST_COLUMNS = ("trial_id", "status", "epochs")
FORMATS = ("table", "csv", "json", "markdown")


def resume_command(name: str, path: str) -> str:
    """The command that continues the experiment `name` at `path`: with ` --storage PARENT` where it
    is not under the default ./results."""
    parent = path.rsplit("/", 1)[0] if "/" in path else "."
    default = "://" not in parent and Path(parent).resolve() == Path("results").resolve()
    return f"fer-tune search --resume --name {name}" + ("" if default else f" --storage {parent}")


# -- rows from Tune's trials --------------------------------------------------------------------

def trial_row(trial, *, max_epochs: int, finished: set[str], extra: dict | None = None) -> dict:
    """One table row for a `ray.tune.experiment.Trial`. `finished`: ids of the trials Tune itself
    completed or stopped (a TERMINATED trial outside it was cut short by Ctrl-C)."""
    from ray.tune.experiment import Trial

    last = trial.last_result or {}
    analysis = getattr(trial, "metric_analysis", {}) or {}
    epochs = int(last.get("epoch", 0) or 0)
    if trial.status == Trial.ERROR:
        status = "failed"
    elif trial.status == Trial.TERMINATED:
        if epochs >= max_epochs:
            status = "completed"
        else:
            status = "stopped early" if trial.trial_id in finished else "interrupted"
    elif trial.status == Trial.RUNNING:
        status = "running"
    else:
        status = "pending"
    row: dict[str, Any] = {"trial_id": trial.trial_id, "status": status, "epochs": epochs}
    for key, value in (trial.config or {}).items():
        row[key] = _cell(value)
    for metric in TABLE_METRICS:
        stats = analysis.get(metric) or {}
        if stats:
            row[f"best_{metric}"] = stats.get("min" if lower_is_better(metric) else "max")
            row[f"last_{metric}"] = stats.get("last")
    row["wall_s"] = round(float(last.get("time_total_s", 0.0) or 0.0), 2)
    row["failures"] = int(getattr(getattr(trial, "run_metadata", None), "num_failures", 0) or 0)
    row["node_ip"] = last.get("worker_ip", "")  # where the trial trained (see trainable._node)
    row["node_id"] = last.get("node_id", "")
    row["error"] = error_text(trial) if status == "failed" else ""
    row["trial_dir"] = getattr(trial, "path", "") or ""
    row.update(extra or {})
    return row


# "ray.exceptions.ActorDiedError: msg", "ValueError: msg", "RayTaskError(UserError): msg"
EXCEPTION_LINE = re.compile(r"^(?:\w+\.)*(\w*(?:Error|Exception|Exit|Interrupt|Diverged)(?:\(\w+\))?): (.*)$")


def error_text(trial) -> str:
    """The failed trial's error on one line: the last 'Type: message' line of Ray's error file."""
    text = ""
    try:
        error = trial.get_error()
        text = str(error) if error is not None else ""
    except Exception:
        pass
    if not text:
        path = getattr(trial, "error_file", None)
        if path and os.path.isfile(path):
            text = Path(path).read_text(errors="replace")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # Our own errors first: the text after "TrialFailed: " (already "Type: message"), else from
    # "TrainingDiverged: " on.
    for marker, keep_marker in (("TrialFailed: ", False), ("TrainingDiverged: ", True)):
        for line in reversed(lines):
            if marker in line:
                start = line.index(marker) + (0 if keep_marker else len(marker))
                return line[start:][:500]
    for i in range(len(lines) - 1, -1, -1):
        match = EXCEPTION_LINE.match(lines[i])
        if match:
            text = f"{match.group(1)}: {match.group(2)}"
            # Ray's actor errors give the cause on the lines after ("The actor is dead because ...").
            cause = [ln for ln in lines[i + 1:] if ln.startswith("The actor")]
            return " ".join([text, *cause])[:500]
    for line in reversed(lines):
        if ": " in line and not line.startswith(("File ", "^", "During handling")):
            head, rest = line.split(": ", 1)
            if re.fullmatch(r"[\w.]+", head):
                head = head.rsplit(".", 1)[-1]  # fer_tune.errors.UserError -> UserError
            return f"{head}: {rest}"[:500]
    return (lines[-1] if lines else "unknown error")[:500]


def _cell(value: Any) -> Any:
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return value


def _uncell(value: Any) -> Any:
    """A list or dict value back from the JSON text `_cell` stored it as (for JSON output)."""
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except ValueError:
            pass
    return value


# -- the table ----------------------------------------------------------------------------------

def build_table(rows: Iterable[dict], metric: str, mode: str, params: list[str] | None = None) -> pd.DataFrame:
    """Rows -> DataFrame, best first (by the best value of `metric`; trials without it last).
    Columns: trial_id, status, epochs, the hyperparameters (`params` order first), the metrics,
    then the rest."""
    rows = list(rows)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    for col in _whole_number_columns(rows):  # a conditional knob (fc=512 in some trials, absent in
        df[col] = df[col].astype("Int64")    # others) stays 512, not pandas' 512.0, in every format
    key = f"best_{metric}"
    if key in df.columns:
        df = df.sort_values(key, ascending=(mode == "min"), na_position="last", kind="stable")
    first = [c for c in FIRST_COLUMNS if c in df.columns]
    metric_cols = [c for c in df.columns if c.startswith(("best_", "last_"))]
    tail = [c for c in ("wall_s", "startup_s", "failures", "node_ip", "node_id", "error", "trial_dir")
            if c in df.columns]
    hyper = [c for c in df.columns if c not in first + metric_cols + tail]
    order = {p: i for i, p in enumerate(params or [])}
    hyper.sort(key=lambda c: order.get(c, len(order)))
    return df[first + hyper + metric_cols + tail].reset_index(drop=True)


def _whole_number_columns(rows: list[dict]) -> list[str]:
    """Columns whose values are all Python ints where given, and missing in some rows."""
    kinds: dict[str, set] = {}
    for row in rows:
        for key, value in row.items():
            if value is not None:
                kinds.setdefault(key, set()).add(type(value))
    return [key for key, seen in kinds.items()
            if seen == {int} and any(row.get(key) is None for row in rows)]


def write_tables(exp_dir: str | Path, df: pd.DataFrame, *, metric: str, mode: str,
                 configs: dict[str, dict] | None = None) -> None:
    """trials.csv, trials.parquet and best.json, each replaced atomically."""
    exp_dir = Path(exp_dir)
    exp_dir.mkdir(parents=True, exist_ok=True)
    _atomic(exp_dir / "trials.csv", lambda p: df.to_csv(p, index=False))
    _atomic(exp_dir / "trials.parquet", lambda p: _to_parquet(df, p))
    best = best_row(df, metric)
    if best is None:  # e.g. the best trial of an earlier refresh failed since: no stale best.json
        (exp_dir / "best.json").unlink(missing_ok=True)
    else:
        payload = {"metric": metric, "mode": mode, "value": best.get(f"best_{metric}"), "trial": best,
                   "config": (configs or {}).get(best["trial_id"])}
        _atomic(exp_dir / "best.json", lambda p: Path(p).write_text(json.dumps(payload, indent=2, default=str)))


def best_row(df: pd.DataFrame, metric: str) -> dict | None:
    """The first row (the table is sorted best first) with a value of the metric, failed trials left
    out as `retrain` leaves them out: a trial that diverged after good epochs is not the best config."""
    key = f"best_{metric}"
    if df.empty or key not in df.columns:
        return None
    ok = df[df[key].notna() & (df["status"] != "failed" if "status" in df.columns else True)]
    return None if ok.empty else {k: plain_value(v) for k, v in ok.iloc[0].to_dict().items()}


def _to_parquet(df: pd.DataFrame, path: str) -> None:
    # Columns mixing types (a conditional value, None elsewhere) are stored as text.
    out = df.copy()
    for col in out.columns:
        kinds = {type(v) for v in out[col] if not _missing(v)}
        if len(kinds) > 1 and not kinds <= {int, float}:
            out[col] = out[col].map(lambda v: None if _missing(v) else str(v))
    out.to_parquet(path, index=False)


def _atomic(path: Path, write) -> None:
    """`write(temp path)`, then the temp file renamed over `path`; a temp file of its own per call
    (the instance watcher's thread and a Tune callback may write the same table at once), removed
    when the write fails."""
    tmp = str(path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"))  # not mkstemp: its files are 0600
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plain_value(value: Any) -> Any:
    """A table cell as a plain Python value (numpy scalars unwrapped, NaN and NA -> None)."""
    if hasattr(value, "item"):
        value = value.item()
    return None if _missing(value) else value


def _missing(value: Any) -> bool:
    """None, NaN, or pandas' NA (the gap in a whole-number column)."""
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


# -- reading back (`fer-tune trials`) -------------------------------------------------------------

def finished_trials(exp_dir: str | Path) -> dict[str, dict]:
    """From an earlier table: trial id -> how it ended ({"metrics": last values} or {"error": text})
    for the trials that finished (completed, stopped early or failed)."""
    try:
        df = load_table(exp_dir)
    except UserError:
        return {}
    out = {}
    for row in df.to_dict("records"):
        if row.get("status") == "failed":
            out[str(row["trial_id"])] = {"error": str(row.get("error") or "failed")}
        elif row.get("status") in ("completed", "stopped early"):
            metrics = {m: plain_value(row[f"last_{m}"]) for m in TABLE_METRICS if plain_value(row.get(f"last_{m}")) is not None}
            out[str(row["trial_id"])] = {"metrics": {"epoch": int(row["epochs"]), **metrics}}
    return out


def find_experiment(target: str | None, storage: str | Path = "results") -> Path:
    """An experiment folder: a path, a name under `storage`, or (None) the latest one there. An
    experiment in cloud storage (`s3://bucket/prefix/NAME`, or NAME with `--storage s3://...`) is
    fetched into the local cache first (its tables, record and Optuna journal)."""
    from fer_tune.search import storage as storage_mod

    uri = storage_mod.remote_experiment(target, storage)
    if uri:
        return storage_mod.fetch(uri)
    root = Path(str(storage).removeprefix("file://"))
    if target:
        target = target.removeprefix("file://")
        candidates = list(dict.fromkeys((Path(target), root / target)))  # one, for an absolute path
        for candidate in candidates:
            if (candidate / "trials.csv").is_file() or (candidate / "search.yaml").is_file():
                return candidate
        known = ", ".join(list_experiments(root)[-10:]) or "none"
        raise UserError(f"no search experiment {target!r} (looked for trials.csv in "
                        f"{' and '.join(str(c) for c in candidates)}); experiments under {root}: {known}")
    names = list_experiments(root)
    if not names:
        raise UserError(f"no search experiments under {root}; run `fer-tune search --space smoke` first")
    return root / names[-1]


def list_experiments(root: str | Path) -> list[str]:
    """Experiment folders under root (those with our tables or search.yaml), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and ((p / "trials.csv").is_file() or (p / "search.yaml").is_file())]
    return [p.name for p in sorted(found, key=lambda p: _mtime(p))]


def _mtime(path: Path) -> float:
    for name in ("search.yaml", "trials.csv"):
        if (path / name).is_file():
            return (path / name).stat().st_mtime
    return path.stat().st_mtime


def load_table(exp_dir: str | Path, *, missing_ok: bool = False) -> pd.DataFrame:
    """trials.parquet, else trials.csv (a damaged file falls back to the other); with `missing_ok`
    an empty table when neither exists."""
    exp_dir = Path(exp_dir)
    problem = None
    for name, reader in (("trials.parquet", pd.read_parquet), ("trials.csv", pd.read_csv)):
        if (exp_dir / name).is_file():
            try:
                return reader(exp_dir / name)
            except Exception as exc:  # pyarrow/pandas raise many types for a damaged file
                problem = f"{exp_dir / name}: unreadable ({first_line(exc)})"
    if problem:
        raise UserError(f"{problem}; restore it, or re-run `fer-tune search --resume` to rewrite the table")
    if missing_ok:
        return pd.DataFrame()
    raise UserError(f"{exp_dir}: no trials table yet (trials.csv appears when the first trial starts)")


def key_columns(df: pd.DataFrame, params: list[str], metric: str) -> list[str]:
    """The columns `fer-tune trials` shows: status, epochs, the metric's best and last, the
    searched hyperparameters, wall time, and the error of failed trials."""
    cols = ["trial_id", "status", "epochs", f"best_{metric}", f"last_{metric}"]
    if metric != "val_acc":
        cols.append("best_val_acc")
    cols += [p for p in params if p in df.columns]
    cols += ["wall_s"]
    if "error" in df.columns and df["error"].fillna("").astype(str).str.len().any():
        cols.append("error")
    return [c for c in dict.fromkeys(cols) if c in df.columns]


def format_table(df: pd.DataFrame, fmt: str = "table", *, sort: str | None = None, mode: str | None = None,
                 top: int | None = None, columns: list[str] | None = None) -> str:
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if sort:
        col = sort if sort in df.columns else f"best_{sort}"
        if col not in df.columns:
            metrics = sorted({c[5:] for c in df.columns if c.startswith("best_")})
            raise UserError(f"--sort {sort}: no such column; sort by one of {', '.join(metrics)} or a column name")
        df = df.sort_values(col, ascending=sort_ascending(col, mode), na_position="last", kind="stable")
    if top:
        df = df.head(top)
    if columns:
        shown = [c for c in columns if c in df.columns]
        if sort and col not in shown:  # the column the rows are ordered by, after the metric's
            shown.insert(min(5, len(shown)), col)
        df = df[shown]
    df = df.reset_index(drop=True)
    if fmt == "csv":
        return df.to_csv(index=False).rstrip("\n")
    if fmt == "json":
        return json.dumps([{k: _uncell(plain_value(v)) for k, v in r.items()} for r in df.to_dict("records")],
                          indent=2, default=str)
    shown = df.map(_short)
    if fmt == "markdown":
        head = "| " + " | ".join(shown.columns) + " |"
        rule = "|" + "|".join(" --- " for _ in shown.columns) + "|"
        body = ["| " + " | ".join(str(v) for v in r) + " |" for r in shown.itertuples(index=False)]
        return "\n".join([head, rule, *body])
    return shown.to_string(index=False)


def sort_ascending(column: str, mode: str | None = None) -> bool:
    """Whether sorting by `column` (a metric, `best_`/`last_` + metric, or a hyperparameter) lists the
    lowest first: the search's `mode` where given (its own metric), else by the metric's kind."""
    base = column[5:] if column.startswith(("best_", "last_")) else column
    return (mode == "min") if mode else lower_is_better(base)


def _short(value: Any) -> str:
    if _missing(value):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."
