"""`fer-tune train`: one training run into a run folder."""

from __future__ import annotations

import json
import time
from pathlib import Path

from fer_tune.train.config import TrainConfig
from fer_tune.train.loop import FitResult, TrainData, fit
from fer_tune.train.report import RunFolderReporter


def train_run(cfg: TrainConfig, dataset, out_dir: str | Path, *, device: str | None = None,
              progress: bool = True) -> FitResult:
    """Train on a prepared dataset; write config.yaml, metrics.csv, TensorBoard events, best.pt,
    last.pt and summary.json into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(cfg.to_yaml())
    data = TrainData.from_prepared(dataset, subset=cfg.subset, seed=cfg.seed)
    t0 = time.perf_counter()
    result = fit(cfg, data, RunFolderReporter(out, progress=progress), device=device)
    (out / "config.yaml").write_text(result.config.to_yaml())  # with epochs as sized by a time budget
    summary = {"dataset": dataset.name, "dataset_sha256": dataset.sha256, "epochs_run": result.epochs_run,
               "stop_reason": result.stop_reason, "seconds": round(time.perf_counter() - t0, 1),
               "best": result.best, "last": result.last}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return result


def default_run_dir(results_root: str | Path, model: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(results_root) / "train" / f"{model.replace('/', '-')}-{stamp}"
