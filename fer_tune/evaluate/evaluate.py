"""Scoring trained models on a split: probabilities, the full metric set, and `evaluate_checkpoint`
for `fer-tune evaluate` (any prepared dataset or a raw image folder, on the classes it shares
with the model).

Every metric comes from `fer_tune.train.metrics` (confusion matrix -> accuracy, macro-F1,
per-class precision/recall/F1/support). On a split with `train_copy` flags (FER-2013's test has
568 images with a pixel-identical copy in train) the scores are given twice: on the full split,
for comparison with the literature, and on the images with no copy in train.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from fer_tune.data.classes import (
    CLASSES, EXTRA_CLASSES, accepted_names, canonical_class, count_images, extra_class,
)
from fer_tune.errors import UserError
from fer_tune.train.checkpoint import load_checkpoint, model_from_checkpoint
from fer_tune.train.metrics import confusion_matrix, scores_from_confusion
from fer_tune.train.runtime import pick_device, predict_views, tta_description, tta_mode, tta_mode_described


@dataclass
class EvalData:
    """Images (uint8 N,C,H,W) and labels (indices into `classes`) of one split to score."""

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    train_copy: np.ndarray | None = None  # bool per image: a pixel-identical copy is in train
    name: str = ""
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_prepared(cls, dataset, split: str = "test") -> "EvalData":
        x, y = dataset.arrays(split)
        # train_copy flags val/test images; on train itself "no copy in train" would be every image
        copies = None if split == "train" else dataset.train_copy[dataset.indices(split)]
        return cls(x, y, tuple(dataset.classes), copies, name=f"{dataset.name} {split}")


def predict_probs(model: torch.nn.Module, images: np.ndarray, norm: Sequence[float], *,
                  tta: bool | str | None = None, channels_last: bool = True, batch_size: int = 512,
                  device=None) -> np.ndarray:
    """Softmax probabilities (N, num_classes) of uint8 images, in fp32 (evaluation is not timed);
    with `tta` ("flip", "crops"; True = "flip") of the logits averaged over each image's views."""
    plain, averaged = predict_probs_with_and_without_tta(model, images, norm, tta=tta, channels_last=channels_last,
                                                         batch_size=batch_size, device=device)
    return plain if averaged is None else averaged


def predict_probs_with_and_without_tta(model: torch.nn.Module, images: np.ndarray, norm: Sequence[float], *,
                                       tta: bool | str | None = "flip", channels_last: bool = True,
                                       batch_size: int = 512, device=None) -> tuple[np.ndarray, np.ndarray | None]:
    """(probabilities without TTA, probabilities with TTA or None): both from one pass over the
    images, so a model scored both ways has still seen each test image once (and each view once)."""
    device = pick_device(device) if device is not None else next(model.parameters()).device
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    plain, averaged = [], []
    for start in range(0, len(images), batch_size * 8):  # bounded device memory for big splits
        x = torch.as_tensor(np.ascontiguousarray(images[start:start + batch_size * 8])).to(device)
        logits, mean_logits = predict_views(model, x, mean=float(norm[0]), std=float(norm[1]), batch_size=batch_size,
                                            precision="fp32", channels_last=channels_last, tta=tta)
        plain.append(torch.softmax(logits, 1).cpu().numpy())
        if mean_logits is not None:
            averaged.append(torch.softmax(mean_logits, 1).cpu().numpy())
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)  # noqa: E731
    return cat(plain), (cat(averaged) if tta_mode(tta) != "none" else None)


def probs_of_checkpoint(state: dict, images: np.ndarray, *, tta: bool | str | None = None, device=None,
                        batch_size: int = 512) -> np.ndarray:
    plain, averaged = probs_of_checkpoint_with_and_without_tta(state, images, tta=tta, device=device,
                                                               batch_size=batch_size)
    return plain if averaged is None else averaged


def probs_of_checkpoint_with_and_without_tta(state: dict, images: np.ndarray, *, tta: bool | str | None = "flip",
                                             device=None, batch_size: int = 512
                                             ) -> tuple[np.ndarray, np.ndarray | None]:
    model, cfg = model_from_checkpoint(state, device=pick_device(device))
    return predict_probs_with_and_without_tta(model, images, state["norm"], tta=tta,
                                              channels_last=cfg.channels_last, batch_size=batch_size)


def split_scores(probs: np.ndarray, labels: np.ndarray, classes: Sequence[str],
                 train_copy: np.ndarray | None = None) -> dict:
    """{"all": scores, "no_train_copy": scores} of predicted probabilities against labels;
    `no_train_copy` only when `train_copy` flags are given."""
    pred = np.asarray(probs).argmax(1)
    out = {"all": scores(labels, pred, classes)}
    if train_copy is not None:
        keep = ~np.asarray(train_copy, dtype=bool)
        out["no_train_copy"] = scores(np.asarray(labels)[keep], pred[keep], classes)
        out["no_train_copy"]["dropped_copies"] = int((~keep).sum())
    return out


def scores(labels, pred, classes: Sequence[str]) -> dict:
    return scores_from_confusion(confusion_matrix(labels, pred, len(classes)), classes)


# -- fer-tune evaluate -------------------------------------------------------------------------

def evaluate_checkpoint(model_path: str | Path, data: str | Path, *, split: str = "test",
                        data_root: str | Path | None = None, tta: bool | str | None = None, device: str | None = None,
                        batch_size: int = 512, log=print) -> dict:
    """Score a checkpoint on a prepared dataset (name or folder) or a raw image folder/zip
    (`<class>/<img>` or `<split>/<class>/<img>`), on the classes the data and the model share.
    Returns the metrics dict (see `evaluation_metrics`)."""
    state = load_checkpoint(model_path)
    model_classes = tuple(state["classes"])
    evaldata = load_eval_data(data, split=split, data_root=data_root, img_size=int(state["img_size"]),
                              in_chans=int(state["in_chans"]), log=log)
    shape = tuple(evaldata.images.shape[1:])
    want = (int(state["in_chans"]), int(state["img_size"]), int(state["img_size"]))
    if shape != want:
        raise UserError(f"{data}: images are {'x'.join(map(str, shape))} but the model {model_path} takes "
                        f"{'x'.join(map(str, want))}; prepare the data with matching --size/--rgb "
                        f"(`fer-tune data prepare ... --size {want[1]}{' --rgb' if want[0] == 3 else ''}`)")
    probs = probs_of_checkpoint(state, evaldata.images, tta=tta, device=device, batch_size=batch_size)
    return {"model": str(model_path), "split": split, "tta": tta_description(tta),
            **evaluation_metrics(probs, evaldata, model_classes)}


def evaluation_text(m: dict) -> str:
    """The console summary of `evaluate_checkpoint`'s metrics."""
    mode = tta_mode_described(m["tta"])
    tta = f", {mode} TTA" if mode != "none" else ""
    lines = [f"{m['model']} on {m['data']} ({m['images']} images, {len(m['classes'])} classes{tta}):"]
    names = {"all": "all images", "no_train_copy": "no copy in train"}
    for key in ("all", "no_train_copy"):
        if key in m:
            s = m[key]
            lines.append(f"  {names[key]:17s} ({s['n']} images): accuracy {s['accuracy']:.4f}, "
                         f"macro-F1 {s['macro_f1']:.4f}")
    if "accuracy_unrestricted" in m:
        lines.append(f"  accuracy with predictions of every model class: {m['accuracy_unrestricted']:.4f}")
    lines.append("  class        precision  recall     F1  support")
    for c, s in m["all"]["per_class"].items():
        lines.append(f"  {c:11s} {s['precision']:10.4f} {s['recall']:7.4f} {s['f1']:6.4f} {s['support']:8d}")
    lines += [f"note: {n}" for n in m["notes"]]
    return "\n".join(lines)


def write_evaluation(out: str | Path, m: dict) -> Path:
    """metrics.json, report.md, confusion_matrix.png and per_class_f1.png into `out` (atomically)."""
    from fer_tune.data.prepared import atomic_dir
    from fer_tune.evaluate import report as rep

    out = Path(out).expanduser()
    classes = m["classes"]
    with atomic_dir(out.parent, out.name) as tmp:
        panels = {"all images": m["all"]["confusion_matrix"]}
        if "no_train_copy" in m:
            panels["no copy in train"] = m["no_train_copy"]["confusion_matrix"]
        rep.plot_confusions(panels, classes, tmp / "confusion_matrix.png", f"{m['data']}")
        series = {"all images": {c: (s["f1"], 0.0) for c, s in m["all"]["per_class"].items()}}
        if "no_train_copy" in m:
            series["no copy in train"] = {c: (s["f1"], 0.0) for c, s in m["no_train_copy"]["per_class"].items()}
        rep.plot_per_class_f1(series, classes, tmp / "per_class_f1.png", f"Per-class F1, {m['data']}")
        rep.write_json(tmp / "metrics.json", m)
        rows = [[k, m[k]["n"], m[k]["accuracy"], m[k]["macro_f1"]] for k in ("all", "no_train_copy") if k in m]
        top = rep.top_confusions(m["all"]["confusion_matrix"], classes, 5)
        text = [f"# `{Path(m['model']).name}` on {m['data']}", "", f"Model: `{m['model']}`; test-time augmentation: "
                f"{m['tta']}.", "", *[f"- note: {n}" for n in m["notes"]], "",
                rep.md_table(["images", "n", "accuracy", "macro-F1"], rows), "",
                *([f"Accuracy with predictions of every model class (not only the shared ones): "
                   f"{m['accuracy_unrestricted']:.4f}.", ""] if "accuracy_unrestricted" in m else []),
                "![confusion matrix](confusion_matrix.png)", "",
                *[f"- **{t}** predicted as **{p}**: {s * 100:.1f} % ({n} images)" for t, p, s, n in top], "",
                "![per-class F1](per_class_f1.png)", "", rep.per_class_table(m["all"]), ""]
        (tmp / "report.md").write_text("\n".join(text))
    return out


def evaluation_metrics(probs: np.ndarray, data: EvalData, model_classes: Sequence[str]) -> dict:
    """Metrics of model probabilities on `data`, restricted to the classes both have.

    Images of classes the model lacks are dropped; classes the data has no image of are left out,
    and predictions are restricted to the shared classes (the argmax over them); the accuracy with
    unrestricted predictions is given as `accuracy_unrestricted`.
    """
    model_classes = tuple(model_classes)
    present = [c for i, c in enumerate(data.classes) if np.any(data.labels == i)]
    shared = [c for c in model_classes if c in present]
    notes = list(data.notes)
    if not shared:
        raise UserError(f"{data.name}: no class in common with the model (data: {', '.join(present) or 'none'}; "
                        f"model: {', '.join(model_classes)})")
    data_only = [c for c in present if c not in model_classes]
    model_only = [c for c in model_classes if c not in present]
    keep = np.isin(data.labels, [data.classes.index(c) for c in shared])
    if data_only:
        counts = {c: int(np.sum(data.labels == data.classes.index(c))) for c in data_only}
        notes.append(f"dropped {count_images(counts)}"
                     + ": the model has no such class")
    if model_only:
        notes.append(f"the data has no images of {', '.join(model_only)}: evaluated on the {len(shared)} shared "
                     "classes, predictions restricted to them")
    # Labels and probabilities in the shared-class index space.
    cols = [model_classes.index(c) for c in shared]
    label_map = {data.classes.index(c): i for i, c in enumerate(shared)}
    labels = np.array([label_map[int(v)] for v in data.labels[keep]], dtype=np.int64)
    p = np.asarray(probs)[keep]
    train_copy = None if data.train_copy is None else np.asarray(data.train_copy)[keep]
    out = {"data": data.name, "images": int(keep.sum()), "classes": list(shared),
           "model_classes": list(model_classes), "notes": notes,
           **split_scores(p[:, cols], labels, shared, train_copy)}
    if model_only:
        unrestricted = np.asarray(model_classes)[p.argmax(1)]
        hits = unrestricted == np.asarray(shared)[labels]
        out["accuracy_unrestricted"] = float(np.mean(hits)) if len(labels) else 0.0
    return out


def load_eval_data(data: str | Path, *, split: str = "test", data_root=None, img_size: int = 48, in_chans: int = 1,
                   log=print) -> EvalData:
    """A prepared dataset by name or folder, else a raw image folder or zip decoded like training."""
    from fer_tune import data as datasets
    from fer_tune.data.prepared import default_data_root

    path = Path(data).expanduser()
    if (default_data_root(data_root) / str(data) / "meta.json").is_file() or (path / "meta.json").is_file():
        dataset = datasets.load(data, data_root)
        return EvalData.from_prepared(dataset, split)
    if not path.exists():
        datasets.load(data, data_root)  # raises the "no prepared dataset ... run `fer-tune data prepare`" error
    return read_image_folder(path, split=split, img_size=img_size, rgb=in_chans == 3, log=log)


def read_image_folder(path: Path, *, split: str = "test", img_size: int = 48, rgb: bool = False,
                      log=print) -> EvalData:
    """`<root>/<class>/<image>` or `<root>/<split>/<class>/<image>` (folder or zip), decoded and
    resized as `fer-tune data prepare` does. Class folders: any accepted spelling of the 7 classes,
    plus known extra emotions (contempt, ...) that are kept as their own class to be dropped."""
    from fer_tune.data.decode import decode_images, open_source
    from fer_tune.data.imagefolder import SPLIT_FOLDERS, find_images

    layouts = "<class>/<image> or <split>/<class>/<image>"
    with open_source(path, f"a prepared dataset, or an image folder laid out as {layouts}") as source:
        images, split_level = find_images(source)  # the layouts `fer-tune data prepare imagefolder` reads
        if split_level:
            wanted = {k for k, v in SPLIT_FOLDERS.items() if v == SPLIT_FOLDERS.get(split, -1)}
            picked = [member for member, top, _ in images if top.lower() in wanted]
            if not picked:
                found = sorted({top for _, top, _ in images})
                raise UserError(f"{path}: no '{split}' split folder (found {', '.join(found)}); pass --split with "
                                "one of them")
        else:
            if split != "test":  # the default; a folder of class folders is scored whole
                raise UserError(f"--split {split}: {path} has no split folders (<class>/<image>), so all of its "
                                "images are scored; leave --split out")
            picked = [member for member, _, _ in images]
        folders = sorted({m.split("/")[-2] for m in picked})
        unknown = [f for f in folders if canonical_class(f) is None and extra_class(f) is None]
        if unknown:
            several = len(unknown) > 1
            raise UserError(f"{path}: unknown class folder{'s' * several} {', '.join(repr(f) for f in unknown)}; "
                            f"rename {'them' if several else 'it'} to one of: "
                            f"{accepted_names()} (or {', '.join(sorted(set(EXTRA_CLASSES.values())))}, "
                            "which are dropped)")
        extra = sorted({extra_class(f) for f in folders if canonical_class(f) is None})
        classes = tuple(CLASSES) + tuple(extra)

        def label(folder: str) -> int:
            name = canonical_class(folder) or extra_class(folder)
            return classes.index(name)

        labels = np.array([label(m.split("/")[-2]) for m in picked], dtype=np.int64)
        log(f"decoding {len(picked)} images from {path} ...")
        pixels, _ = decode_images(source, picked, img_size, rgb)
    where = f"{path}" + (f" {split}" if split_level else "")
    return EvalData(pixels, labels, classes, None, name=where,
                    notes=["no train_copy scores for a raw image folder (they need a prepared dataset's record of "
                           "which test images have a copy in train)"])
