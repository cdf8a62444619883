"""`fer-tune transfer EXPERIMENT --to rafdb`: how the retrained model carries over to another
dataset, and what fine-tuning on it costs on the original one.

    from fer_tune.evaluate import transfer
    metrics = transfer("cnn-20250101-120000", to="rafdb", strategy="all")

1. zero-shot: the final model of `<experiment>/final/` on the target's test split;
2. fine-tuning on the target's train split, from the final model's weights (`fit(init=...)`, which
   keeps its input normalisation), with a strategy:
   - `full`: every layer trains (lr x 0.1 of the searched lr);
   - `freeze-lower`: the lower half of the feature extractor is frozen (`TrainConfig.freeze="lower"`);
   - `linear-probe`: only the classifier trains (`freeze="backbone"`, lr x 1);
   - `joint`: every layer trains on a mixture of target and source training images, a
     `joint_fraction` of them from the source (default 0.5: equal parts), the usual remedy for
     forgetting; the source images are a stratified sample of its train split;
   every epoch is scored on the target's val split and on the source's (`val_source_acc`: the
   forgetting as it happens); `select` chooses the epoch kept: "target" the best on the target's val
   split by the source model's selection metric (val_acc unless its search chose another), "mean"
   the best mean of target and source val accuracy (`val_mean_acc`: a point of either counts the same);
3. the target's test split after fine-tuning;
4. the source's test split after fine-tuning: the drop from before is what was forgotten.

Both datasets must have the same image shape (prepare both with the same --size/--rgb). Output:
`<experiment>/transfer/` (metrics.json, report.md, plots, one run folder per strategy with its
best.pt, metrics.csv and TensorBoard events), written under a temp name and renamed at the end.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from fer_tune.data.decode import file_sha256
from fer_tune.errors import UserError
from fer_tune.evaluate import report as rep
from fer_tune.evaluate.evaluate import EvalData, probs_of_checkpoint, scores, split_scores
from fer_tune.evaluate.experiment import check_epochs_or_budget, check_overrides, read_experiment
from fer_tune.train.checkpoint import load_checkpoint
from fer_tune.train.config import MEAN_ACC, METRICS, TrainConfig, selection_sign
from fer_tune.train.loop import TrainData, fit
from fer_tune.train.report import RunFolderReporter
from fer_tune.train.runtime import applied_tta, tta_description

STRATEGIES = ("full", "freeze-lower", "linear-probe", "joint")
FREEZE = {"full": "none", "freeze-lower": "lower", "linear-probe": "backbone", "joint": "none"}
# Fine-tuning keeps most of what was learnt: a tenth of the searched lr; a linear probe trains a
# single layer, which the searched lr suits.
LR_FACTOR = {"full": 0.1, "freeze-lower": 0.1, "linear-probe": 1.0, "joint": 0.1}
DEFAULT_JOINT_FRACTION = 0.5
SELECT = ("target", "mean")
# Config keys a transfer sets itself, refused in `--set` with what to use instead.
OWN_FLAGS = {"epochs": "use --epochs or --time-budget", "time_budget": "use --time-budget", "seed": "use --seed",
             "lr": "use --lr-factor", "freeze": "use --strategy", "select_metric": "use --select",
             "subset": "it fine-tunes on all of the target's train split",
             **{k: "the network fine-tuned is the source model's" for k in ("model", "model_kwargs", "pretrained")}}


def transfer(experiment: str | Path | None = None, *, to: str, strategy: str = "full",
             storage: str | Path = "results", checkpoint: str | Path | None = None,
             source_dataset: str | None = None, epochs: int | None = None, lr_factor: float | None = None,
             joint_fraction: float | None = None, select: str = "target", overrides: dict | None = None,
             seed: int | None = None,
             time_budget: float | None = None, tta: bool | str | None = None, data_root: str | Path | None = None,
             device: str | None = None, force: bool = False, progress: bool = True, log=print) -> dict:
    """Zero-shot, fine-tune (one strategy or "all"), forgetting check; writes `<experiment>/transfer/`.
    `overrides` (`--set`) change other config keys of the fine-tuning runs, e.g. {"warmup_epochs": 3}."""
    from fer_tune import data as datasets
    from fer_tune.data.prepared import atomic_dir

    t0 = time.time()
    tta = applied_tta(tta)
    strategies = list(STRATEGIES) if strategy == "all" else [strategy]
    if strategy != "all" and strategy not in STRATEGIES:
        raise UserError(f"--strategy {strategy}: choose one of {', '.join(STRATEGIES)} or all")
    if select not in SELECT:
        raise UserError(f"--select {select}: choose one of {', '.join(SELECT)}")
    if joint_fraction is not None and "joint" not in strategies:
        raise UserError(f"--joint-fraction applies to --strategy joint (or all), not {strategy}")
    joint_fraction = DEFAULT_JOINT_FRACTION if joint_fraction is None else joint_fraction
    if not 0 < joint_fraction < 1:
        raise UserError(f"--joint-fraction {joint_fraction}: must lie strictly between 0 and 1")
    check_epochs_or_budget(epochs, time_budget)
    overrides = check_overrides(overrides or {}, OWN_FLAGS, "transfer")
    if lr_factor is not None and not lr_factor > 0:
        raise UserError(f"--lr-factor {lr_factor}: must be > 0")
    exp = read_experiment(experiment, storage)
    if exp.transfer_dir.exists() and not force:
        raise UserError(f"{exp.transfer_dir} already exists; pass --force to replace it (it is replaced only when "
                        "the new transfer has finished)")
    ckpt_path, final_meta = _source_checkpoint(exp, checkpoint)
    state = load_checkpoint(ckpt_path)
    src_name = source_dataset or (final_meta.get("dataset") or {}).get("name") or exp.dataset
    if not src_name or src_name == "in-memory":
        raise UserError(f"{exp.path}: cannot tell which dataset the model was trained on; pass --source-dataset NAME")
    src = datasets.load(src_name, data_root)
    tgt = datasets.load(to, data_root)
    _check_compatible(src, tgt, state, ckpt_path)
    if src.meta["files"]["images.npy"] == tgt.meta["files"]["images.npy"]:  # the same images, whatever the name
        raise UserError(f"--to {to}: those are the images the model was trained on ({src.name}); transfer measures "
                        "another dataset, e.g. --to rafdb")
    if len(final_meta.get("ensembles") or []) and not checkpoint:
        log(f"note: final/ scores an ensemble of {len({m.get('rank') for m in final_meta['models']})} configs; "
            f"transfer fine-tunes one network, the one with the best val score: {ckpt_path.parent.name}")

    base = TrainConfig.from_dict(state["config"], source=f"{ckpt_path} config")
    if overrides:
        base = TrainConfig.from_dict({**base.to_dict(), **overrides}, source="--set")
    n_epochs = epochs or max(1, round(base.epochs / 2))
    seed = base.seed if seed is None else seed
    selection = {"select": select, "metric": selection_metric(select, base)}
    log(f"transfer {src.name} -> {tgt.name} from {ckpt_path}: strategies {', '.join(strategies)}, "
        + (f"as many epochs as fit in {time_budget:.0f} s each" if time_budget else f"{n_epochs} epochs each"))

    with atomic_dir(exp.path, "transfer") as out:
        src_val = src.arrays("val")
        tgt_data = replace(TrainData.from_prepared(tgt), extra_val={"source": src_val})
        runs = {}
        for name in strategies:
            cfg = base.replace(freeze=FREEZE[name], lr=base.lr * (lr_factor or LR_FACTOR[name]), epochs=n_epochs,
                               seed=seed, subset=1.0, time_budget=time_budget or 0.0,
                               select_metric=selection["metric"])
            data, mix = (joint_data(tgt_data, src, joint_fraction, seed) if name == "joint" else (tgt_data, None))
            log(f"fine-tuning: {name} (freeze {cfg.freeze}, lr {cfg.lr:.3g}, {len(data.train_y)} train images"
                + (f", {mix['source_images']} of them from {src.name}" if mix else "") + ")")
            t_run = time.time()
            result = fit(cfg, data, RunFolderReporter(out / name, progress=progress), device=device,
                         init=state)
            (out / name / "last.pt").unlink(missing_ok=True)
            (out / name / "config.yaml").write_text(result.config.to_yaml())
            runs[name] = {"result": result, "mix": mix, "seconds": time.time() - t_run}

        # Test splits: read once each, after all fine-tuning; each model scores each once.
        src_test, tgt_test = EvalData.from_prepared(src, "test"), EvalData.from_prepared(tgt, "test")
        models = {"zero-shot": state, **{n: load_checkpoint(out / n / "best.pt") for n in runs}}
        zero_shot_val = {}  # the model as it is on both val splits: where the fine-tuning curves start
        for name, (x, y) in (("target", (tgt_data.val_x, tgt_data.val_y)), ("source", src_val)):
            pred = probs_of_checkpoint(state, x, device=device).argmax(1)
            zero_shot_val[name] = scores(y, pred, src.classes)["accuracy"]
        tests = {}
        for name, st in models.items():
            tests[name] = {
                "target": split_scores(score_on_test(st, tgt_test.images, tta=tta, device=device), tgt_test.labels,
                                       tgt_test.classes, tgt_test.train_copy),
                "source": split_scores(score_on_test(st, src_test.images, tta=tta, device=device), src_test.labels,
                                       src_test.classes, src_test.train_copy)}
        metrics = _metrics(exp, ckpt_path, src, tgt, runs, tests, tta=tta, joint_fraction=joint_fraction,
                           selection=selection, overrides=overrides, zero_shot_val=zero_shot_val,
                           seconds=time.time() - t0)
        write_transfer_report(out, metrics, runs)
    log(comparison_table(metrics))
    log(f"written: {exp.transfer_dir}/ (report.md, metrics.json)")
    return metrics


def selection_metric(select: str, base: TrainConfig) -> str:
    """The metric that picks each strategy's epoch: "mean" val_mean_acc; "target" the source model's own
    on the target's val split (a model fine-tuned before may carry val_mean_acc: then val_acc)."""
    if select == "mean":
        return MEAN_ACC
    return base.select_metric if base.select_metric in METRICS else "val_acc"


def score_on_test(state: dict, images: np.ndarray, *, tta: str | None = None, device: str | None = None) -> np.ndarray:
    """Softmax probabilities of a model on a test split (counted by the tests: one call per model and split)."""
    return probs_of_checkpoint(state, images, tta=tta, device=device)


def joint_data(target: TrainData, source, fraction: float, seed: int) -> tuple[TrainData, dict]:
    """Target train + a stratified sample of the source's train split making up `fraction` of the
    mixture (all of the source when it has fewer); val stays the target's."""
    from fer_tune.data import stratified_indices

    sx, sy = source.arrays("train")
    n_tgt = len(target.train_y)
    wanted = int(round(fraction / (1 - fraction) * n_tgt))
    if wanted >= len(sy):
        keep = np.arange(len(sy))
    else:
        keep = stratified_indices(sy, wanted / len(sy), seed)
    x = np.concatenate([target.train_x, sx[keep]])
    y = np.concatenate([np.asarray(target.train_y, np.int64), np.asarray(sy[keep], np.int64)])
    mix = {"target_images": n_tgt, "source_images": int(len(keep)),
           "source_fraction": float(len(keep) / (len(keep) + n_tgt)), "requested_fraction": fraction}
    return replace(target, train_x=x, train_y=y), mix


def _source_checkpoint(exp, checkpoint) -> tuple[Path, dict]:
    """The model to transfer: --checkpoint, else the final model with the best val score listed in
    final/metrics.json (of any config, when final/ is a --top-k ensemble)."""
    meta_path = exp.final_dir / "metrics.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if checkpoint:
        return Path(checkpoint), meta
    if not meta.get("models"):
        raise UserError(f"{exp.final_dir}: no retrained model (metrics.json missing); run `fer-tune retrain "
                        f"{exp.name}` first or pass --checkpoint PATH")
    models = meta["models"]
    select = (models[0].get("config") or {}).get("select_metric", "val_acc")
    sign = selection_sign(select)
    best = max(models, key=lambda m: sign * (m.get("val") or {}).get(select, -sign * np.inf))
    return exp.final_dir / best["checkpoint"], meta


def _check_compatible(src, tgt, state: dict, ckpt: Path) -> None:
    def shape(s):
        return "x".join(map(str, s))

    model_shape = (int(state["in_chans"]), int(state["img_size"]), int(state["img_size"]))
    for ds in (src, tgt):
        if tuple(ds.image_shape) != model_shape:
            other = src if ds is tgt else tgt
            raise UserError(
                f"{ds.name} images are {shape(ds.image_shape)} but the model ({ckpt}) and {other.name} use "
                f"{shape(model_shape)}; prepare {ds.name} with the same size and colour: `fer-tune data prepare "
                f"{ds.meta['source']['kind']} PATH --name {ds.name} --size {model_shape[1]}"
                f"{' --rgb' if model_shape[0] == 3 else ''}` (--size/--rgb)")
    if list(tgt.classes) != list(state["classes"]):
        raise UserError(f"{tgt.name}: classes {', '.join(tgt.classes)} differ from the model's "
                        f"{', '.join(state['classes'])}")


# -- metrics and report ---------------------------------------------------------------------------

def _metrics(exp, ckpt, src, tgt, runs, tests, *, tta, joint_fraction, selection, overrides, zero_shot_val,
             seconds) -> dict:
    before = tests["zero-shot"]["source"]["all"]["accuracy"]
    rows = []
    for name, t in tests.items():
        run = runs.get(name)
        rows.append({
            "strategy": name, "target_acc": t["target"]["all"]["accuracy"],
            "target_macro_f1": t["target"]["all"]["macro_f1"],
            "source_acc": t["source"]["all"]["accuracy"], "source_macro_f1": t["source"]["all"]["macro_f1"],
            "forgetting": before - t["source"]["all"]["accuracy"],
            "target_val_acc": run["result"].best.get("val_acc") if run else zero_shot_val["target"],
            "source_val_acc": run["result"].best.get("val_source_acc") if run else zero_shot_val["source"],
            "epochs_run": run["result"].epochs_run if run else 0,
            "best_epoch": run["result"].best.get("epoch") if run else None,
            "seconds": round(run["seconds"], 1) if run else 0.0})
    return {
        "experiment": exp.name, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "source_model": str(ckpt), "source_model_sha256": file_sha256(ckpt),
        "tta": tta_description(tta),
        "source": {"name": src.name, "sha256": src.sha256, "image_shape": list(src.image_shape),
                   "counts": src.meta.get("counts", {})},
        "target": {"name": tgt.name, "sha256": tgt.sha256, "image_shape": list(tgt.image_shape),
                   "counts": tgt.meta.get("counts", {})},
        "comparison": rows,
        "strategies": {name: {
            "freeze": run["result"].config.freeze, "lr": run["result"].config.lr,
            "epochs_run": run["result"].epochs_run, "stop_reason": run["result"].stop_reason,
            "best_val": {k: v for k, v in run["result"].best.items() if k.startswith("val_")},
            "mixture": run["mix"], "checkpoint": f"{name}/best.pt", "config": run["result"].config.to_dict(),
        } for name, run in runs.items()},
        "joint_fraction": joint_fraction if "joint" in runs else None,
        "overrides": overrides,
        "selection": selection,
        "test": tests,
        "seconds": round(seconds, 1),
    }


def comparison_table(metrics: dict) -> str:
    src, tgt = metrics["source"]["name"], metrics["target"]["name"]
    headers = ["strategy", f"{tgt} acc", f"{tgt} F1", f"{src} acc", "forgot", f"{tgt} val", f"{src} val", "epochs",
               "seconds"]
    rows = [[r["strategy"], f"{r['target_acc']:.4f}", f"{r['target_macro_f1']:.4f}", f"{r['source_acc']:.4f}",
             f"{r['forgetting']:+.4f}", _fraction(r["target_val_acc"]), _fraction(r.get("source_val_acc")),
             str(r["epochs_run"]), f"{r['seconds']:.0f}"] for r in metrics["comparison"]]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths)))]
    lines += ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join(lines)


def _fraction(value) -> str:
    return "" if value is None else f"{value:.4f}"


def write_transfer_report(out: Path, metrics: dict, runs: dict) -> None:
    src, tgt = metrics["source"]["name"], metrics["target"]["name"]
    classes = list(next(iter(metrics["test"].values()))["target"]["all"]["per_class"])
    plots = {"comparison": rep.plot_transfer(metrics["comparison"], out / "transfer_comparison.png", tgt, src).name}
    if runs:
        plots["curves"] = rep.plot_learning_curves({n: r["result"].history for n, r in runs.items()},
                                                   out / "learning_curves.png",
                                                   f"Fine-tuning on {tgt} (val = {tgt} val; source val = {src} val)",
                                                   {n: r["result"].best.get("epoch") for n, r in runs.items()}).name
    panels = {name: t["target"]["all"]["confusion_matrix"] for name, t in metrics["test"].items()}
    plots["cm"] = rep.plot_confusions(panels, classes, out / "confusion_matrices.png", f"{tgt} test").name
    series = {name: {c: (t["target"]["all"]["per_class"][c]["f1"], 0.0) for c in classes}
              for name, t in metrics["test"].items()}
    plots["f1"] = rep.plot_per_class_f1(series, classes, out / "per_class_f1.png", f"Per-class F1 on {tgt} test").name
    counts = {f"{tgt} {s}": c for s, c in metrics["target"]["counts"].items()}
    counts.update({f"{src} train": metrics["source"]["counts"]["train"]} if metrics["source"]["counts"] else {})
    if counts:
        plots["dist"] = rep.plot_class_distribution(counts, classes, out / "class_distribution.png",
                                                    f"{tgt} splits vs {src} train").name
    rep.write_json(out / "metrics.json", metrics)
    (out / "report.md").write_text(transfer_markdown(metrics, plots))


def _selection_words(m: dict, tgt: str, src: str) -> str:
    metric = m["selection"]["metric"]
    if metric == MEAN_ACC:
        return f"the mean of {tgt} val and {src} val accuracy"
    return f"{tgt} val ({metric})"


def transfer_markdown(m: dict, plots: dict) -> str:
    src, tgt = m["source"]["name"], m["target"]["name"]
    lines = [f"# Transfer {src} -> {tgt} (`{m['experiment']}`)", "",
             f"Source model: `{m['source_model']}`. Zero-shot is that model as it is; each strategy fine-tunes it "
             f"on {tgt} train and keeps its best epoch by {_selection_words(m, tgt, src)}. Every model is scored "
             f"once on the {tgt} test "
             f"split and once on the {src} test split; **forgot** is the drop in {src} test accuracy from the "
             f"model before fine-tuning; the val accuracies are the kept epoch's (zero-shot's: the model as it is). "
             f"Test-time augmentation: {m['tta']}.", "",
             "## Comparison", "", f"![comparison]({plots['comparison']})", ""]
    rows = [[r["strategy"], r["target_acc"], r["target_macro_f1"], r["source_acc"], f"{r['forgetting']:+.4f}",
             r["target_val_acc"], r.get("source_val_acc"), r["epochs_run"] or "", f"{r['seconds']:.0f}"]
            for r in m["comparison"]]
    lines += [rep.md_table(["strategy", f"{tgt} test acc", f"{tgt} test macro-F1", f"{src} test acc", "forgot",
                            f"{tgt} val acc", f"{src} val acc", "epochs", "seconds"],
                           rows), ""]
    if m["strategies"]:
        lines += ["## Strategies", ""]
        rows = []
        for name, s in m["strategies"].items():
            mix = s["mixture"]
            rows.append([name, s["freeze"], f"{s['lr']:.3g}", s["epochs_run"], s["stop_reason"],
                         f"{mix['source_images']} {src} + {mix['target_images']} {tgt} "
                         f"({mix['source_fraction']:.0%} {src})" if mix else f"{tgt} train", f"`{s['checkpoint']}`"])
        lines += [rep.md_table(["strategy", "frozen", "lr", "epochs", "stopped", "trained on", "checkpoint"], rows), ""]
    if "curves" in plots:
        lines += ["## Learning curves", "", f"![learning curves]({plots['curves']})", ""]
    lines += ["## Per-class F1 on the target", "", f"![per-class F1]({plots['f1']})", "",
              "## Confusion matrices on the target test split", "", f"![confusion matrices]({plots['cm']})", ""]
    for name, t in m["test"].items():
        top = rep.top_confusions(t["target"]["all"]["confusion_matrix"], list(t["target"]["all"]["per_class"]), 3)
        lines.append(f"- {name}: " + "; ".join(f"**{a}** as **{b}** {s * 100:.0f} % ({n})" for a, b, s, n in top))
    lines.append("")
    if "dist" in plots:
        lines += ["## Data", "", f"![class distribution]({plots['dist']})", ""]
    lines += [f"Made by `fer-tune transfer` in {m['seconds']:.0f} s on {m['created']}; all numbers are in "
              "`metrics.json`.", ""]
    return "\n".join(lines)

