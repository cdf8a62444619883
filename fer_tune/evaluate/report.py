"""report.md and its PNG plots: learning curves, normalized confusion matrix, per-class F1, class
distribution, the transfer comparison. Plots use matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
          "#bcbd22", "#17becf"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.spines.top": False,
                         "axes.spines.right": False})
    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_learning_curves(histories: dict[str, list[dict]], path: Path, title: str = "Learning curves",
                         selected: dict[str, int] | None = None) -> Path:
    """Loss and accuracy per epoch (train dashed, val solid, fine-tuning's source val dotted), one
    colour per run; the selected epoch of each run (`selected`, else its best val_acc) is marked."""
    plt = _plt()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    source = False  # any run with the source's val curve (fine-tuning)
    for i, (name, history) in enumerate(histories.items()):
        if not history:
            continue
        color = COLORS[i % len(COLORS)]
        epochs = [h["epoch"] for h in history]
        ax_loss.plot(epochs, [h["train_loss"] for h in history], "--", color=color, alpha=0.8)
        ax_loss.plot(epochs, [h["val_loss"] for h in history], "-", color=color, label=name)
        ax_acc.plot(epochs, [h["train_acc"] for h in history], "--", color=color, alpha=0.8)
        ax_acc.plot(epochs, [h["val_acc"] for h in history], "-", color=color, label=name)
        if "val_source_acc" in history[0]:
            source = True
            ax_acc.plot(epochs, [h["val_source_acc"] for h in history], ":", color=color, linewidth=2)
        chosen = (selected or {}).get(name)
        best = next((h for h in history if h["epoch"] == chosen), None) or max(history, key=lambda h: h["val_acc"])
        ax_acc.plot([best["epoch"]], [best["val_acc"]], "o", color=color, markersize=6)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy (o = selected epoch)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    if len(histories) <= 10:
        ax_acc.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{title}\ntrain dashed, val solid" + (", source val dotted" if source else ""), fontsize=11)
    return _save(fig, path)


def plot_confusions(panels: dict[str, object], classes: Sequence[str], path: Path, title: str | None = None,
                    columns: int = 3) -> Path:
    """Row-normalized confusion matrices side by side (each true class sums to 100 %): the share in
    each cell (empty cells blank), the true class's image count on its label."""
    plt = _plt()
    n = len(classes)
    k = len(panels)
    cols = min(k, columns)
    rows = -(-k // cols)
    side = 0.62 * n + 1.9
    fig, axes = plt.subplots(rows, cols, figsize=(side * cols + 0.9, (0.56 * n + 1.7) * rows + (0.4 if title else 0)),
                             squeeze=False, layout="constrained")
    im = None
    for ax, (name, cm) in zip(axes.flat, panels.items()):
        cm = np.asarray(cm, dtype=np.float64)
        support = cm.sum(1)
        norm = np.divide(cm, support[:, None], out=np.zeros_like(cm), where=support[:, None] > 0)
        im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        for r in range(n):
            for c in range(n):
                if cm[r, c] == 0:
                    continue  # empty cells stay blank: the eye goes to the confusions
                value = norm[r, c]
                text = f"{value * 100:.0f}" if value >= 0.005 else "<1"
                ax.text(c, r, text, ha="center", va="center", fontsize=8.5,
                        color="white" if value > 0.55 else "black")
        ax.set_xticks(range(n), classes, rotation=40, ha="right", fontsize=9)
        ax.set_yticks(range(n), [f"{c} ({int(s)})" for c, s in zip(classes, support)], fontsize=9)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class (images)")
        ax.set_title(f"{name}\n% of each true class", fontsize=10)
        ax.spines[:].set_visible(False)
    for ax in list(axes.flat)[k:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.colorbar(im, ax=axes, shrink=0.8 if rows > 1 else 1.0, aspect=30, pad=0.01,
                 format=lambda v, _: f"{v * 100:.0f}%")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_per_class_f1(series: dict[str, dict[str, tuple[float, float]]], classes: Sequence[str], path: Path,
                      title: str = "Per-class F1") -> Path:
    """Grouped bars: for each series (e.g. full test / no copy in train) the F1 of every class,
    `series[name][class] = (mean, std)` (std drawn as an error bar when > 0)."""
    plt = _plt()
    n, k = len(classes), max(1, len(series))
    width = 0.8 / k
    fig, ax = plt.subplots(figsize=(max(6.5, 1.1 * n + 1.5), 4.4))
    x = np.arange(n)
    for i, (name, values) in enumerate(series.items()):
        means = np.array([values.get(c, (0.0, 0.0))[0] for c in classes])
        stds = np.array([values.get(c, (0.0, 0.0))[1] for c in classes])
        pos = x - 0.4 + width * (i + 0.5)
        yerr = np.vstack([np.minimum(stds, means), np.minimum(stds, 1 - means)]) if stds.any() else None
        bars = ax.bar(pos, means, width, yerr=yerr, capsize=3, error_kw={"ecolor": "#444", "elinewidth": 1},
                      color=COLORS[i % len(COLORS)], label=name)
        for bar, m in zip(bars, means):
            inside = m > 0.15
            ax.text(bar.get_x() + bar.get_width() / 2, m - 0.02 if inside else m + 0.01, f"{m:.2f}", ha="center",
                    va="top" if inside else "bottom", fontsize=8, color="white" if inside else "black",
                    rotation=90 if k > 2 else 0)
    ax.set_xticks(x, classes)
    ax.set_ylim(0, 1.17)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("F1")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    if k > 1:
        ax.legend(fontsize=8, loc="upper center", ncols=min(k, 5), frameon=False)
    return _save(fig, path)


def plot_class_distribution(counts: dict[str, dict[str, int]], classes: Sequence[str], path: Path,
                            title: str = "Class distribution") -> Path:
    """Share of each class per split (grouped bars, % of the split), image counts on the bars."""
    plt = _plt()
    splits = list(counts)
    n, k = len(classes), max(1, len(splits))
    width = 0.8 / k
    fig, ax = plt.subplots(figsize=(max(7, 1.3 * n + 1.5), 4))
    x = np.arange(n)
    for i, split in enumerate(splits):
        total = sum(counts[split].get(c, 0) for c in classes) or 1
        shares = [counts[split].get(c, 0) / total * 100 for c in classes]
        bars = ax.bar(x - 0.4 + width * (i + 0.5), shares, width, color=COLORS[i % len(COLORS)],
                      label=f"{split} ({total:,} images)")
        for bar, c in zip(bars, classes):
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.3, f"{counts[split].get(c, 0):,}",
                    ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_xticks(x, classes)
    ax.set_ylabel("% of the split's images")
    top = max((counts[s].get(c, 0) / (sum(counts[s].values()) or 1) * 100 for s in splits for c in classes),
              default=1)
    ax.set_ylim(0, top * 1.25 + 1)
    ax.set_title(title + " (numbers: image counts)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_transfer(rows: list[dict], path: Path, target: str, source: str) -> Path:
    """Bars per strategy: target test accuracy and source test accuracy (after fine-tuning)."""
    plt = _plt()
    names = [r["strategy"] for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.5, 1.5 * len(rows) + 2), 4))
    for i, (key, label) in enumerate((("target_acc", f"{target} test accuracy"),
                                      ("source_acc", f"{source} test accuracy (forgetting)"))):
        vals = [r.get(key) or 0.0 for r in rows]
        bars = ax.bar(x - 0.2 + 0.4 * i, vals, 0.4, color=COLORS[i], label=label)
        for bar, v in zip(bars, vals):
            ax.text(bar.get_x() + bar.get_width() / 2, v + 0.01, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"Transfer {source} -> {target}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path)


# -- markdown ----------------------------------------------------------------------------------

def md_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    def cell(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.4f}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def pm(stats: dict | None, digits: int = 4) -> str:
    """'0.6512 ± 0.0043 (n=3)' from {"mean", "std", "values"}."""
    if not stats:
        return ""
    n = len(stats.get("values", [])) or 1
    if n == 1:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f} (n={n})"


def per_class_table(scores: dict) -> str:
    rows = [[name, s["precision"], s["recall"], s["f1"], s["support"]] for name, s in scores["per_class"].items()]
    return md_table(["class", "precision", "recall", "F1", "support"], rows)


def top_confusions(cm, classes: Sequence[str], k: int = 3) -> list[tuple[str, str, float, int]]:
    """The k largest off-diagonal shares of a true class: (true, predicted, share, count)."""
    cm = np.asarray(cm, dtype=np.float64)
    support = cm.sum(1)
    out = []
    for r in range(len(classes)):
        for c in range(len(classes)):
            if r != c and support[r] > 0 and cm[r, c] > 0:
                out.append((classes[r], classes[c], cm[r, c] / support[r], int(cm[r, c])))
    return sorted(out, key=lambda t: -t[2])[:k]


def write_json(path: Path, payload: dict) -> Path:
    path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    return path


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
