"""The prepared dataset: `prepare` (decode once, write atomically), `load` (memory-map, verify),
`describe` (the human report), and the duplicate report stored in meta.json.

On disk, `<data_root>/<name>/` holds images.npy (uint8 N,C,H,W), labels.npy (int64 canonical ids),
split.npy (uint8: 0 train, 1 val, 2 test), train_copy.npy (bool: a val/test image with a
pixel-identical copy in train) and meta.json. Images are ordered by split, then by source path.
"""

import difflib
import json
import os
import re
import shlex
import shutil
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from fer_tune.data import fer2013, imagefolder, rafdb
from fer_tune.data.classes import CLASSES, count_images
from fer_tune.data.decode import file_sha256
from fer_tune.data.splits import SPLITS, TEST, TRAIN, VAL, slice_train
from fer_tune.errors import UserError

FORMAT_VERSION = 1
ARRAYS = ("images", "labels", "split", "train_copy")
READERS = {"fer2013": fer2013.read, "rafdb": rafdb.read, "imagefolder": imagefolder.read}
DEFAULT_SIZE = 48
MAX_SIZE = 1024  # a side beyond this is a typo: 35,887 FER images at 1024x1024 take 35 GiB
DEFAULT_VAL_FRACTION, DEFAULT_TEST_FRACTION, DEFAULT_SEED = 0.1, 0.1, 0


def default_data_root(explicit: str | Path | None = None) -> Path:
    """Where prepared datasets live: `explicit`, else $FER_TUNE_DATA, else ./data."""
    return Path(explicit or os.environ.get("FER_TUNE_DATA") or "data").expanduser()


class PreparedDataset:
    """A prepared dataset folder: images memory-mapped, the small arrays loaded, meta.json parsed."""

    def __init__(self, path: str | Path, verify: bool = True):
        self.path = Path(path)
        self.meta = _read_meta(self.path)
        if verify:
            for file, digest in self.meta["files"].items():
                if not (self.path / file).is_file() or file_sha256(self.path / file) != digest:
                    raise UserError(
                        f"{self.path / file}: does not match its sha256 in meta.json (the prepared dataset was "
                        f"altered or damaged); re-run `{_reprepare_command(self.path, self.meta)}`"
                    )
        self.images = self._array("images", mmap_mode="r")
        self.labels = self._array("labels")
        self.split = self._array("split")
        self.train_copy = self._array("train_copy")
        self.name = self.path.name
        self.classes = tuple(self.meta["classes"])
        self.num_classes = len(self.classes)
        self.image_shape = tuple(self.images.shape[1:])
        self.sha256 = self.meta["source"]["sha256"]

    def indices(self, split: str) -> np.ndarray:
        """Indices of the images of one split ("train", "val" or "test")."""
        if split not in SPLITS:
            raise UserError(f"unknown split '{split}'; expected one of {', '.join(SPLITS)}")
        return np.flatnonzero(self.split == SPLITS.index(split))

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(images uint8 N,C,H,W, labels int64) of one split, read into memory."""
        index = self.indices(split)
        return np.asarray(self.images[index]), self.labels[index]

    def __len__(self):
        return len(self.labels)

    def __repr__(self):
        return f"PreparedDataset({str(self.path)!r}, {len(self)} images of {'x'.join(map(str, self.image_shape))})"

    def _array(self, key, mmap_mode=None):
        try:
            return np.load(self.path / f"{key}.npy", mmap_mode=mmap_mode)
        except (OSError, ValueError) as e:
            raise UserError(
                f"{self.path / f'{key}.npy'}: unreadable ({e}); re-run `{_reprepare_command(self.path, self.meta)}`"
            ) from None


def prepare(
    source: str,
    path: str | Path,
    *,
    name: str | None = None,
    data_root: str | Path | None = None,
    size: int | None = None,
    rgb: bool = False,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    seed: int = DEFAULT_SEED,
    log=print,
) -> PreparedDataset:
    """Decode `path` once (a `source` of kind fer2013, rafdb or imagefolder) and write it to
    `<data_root>/<name>/` atomically; logs the report and returns the loaded dataset."""
    start = time.perf_counter()
    if source not in READERS:
        raise UserError(f"unknown source '{source}'; choose one of {', '.join(READERS)}")
    path = Path(path).expanduser()
    name = name or _default_name(source, path)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise UserError(f"--name '{name}': not a valid dataset name; use letters, digits, '.', '_' and '-'")
    if size is not None and not 1 <= size <= MAX_SIZE:
        raise UserError(f"--size {size}: must be 1 to {MAX_SIZE} pixels (faces for these models: 48 to 224)")
    for flag, fraction in (("--val-fraction", val_fraction), ("--test-fraction", test_fraction)):
        if not 0 < fraction < 1:
            raise UserError(f"{flag} {fraction}: must lie strictly between 0 and 1")

    log(f"reading {path} as {source} ...")
    raw = READERS[source](path, size=size or DEFAULT_SIZE, rgb=rgb)
    split, origin, sliced = raw.split, {"val_from": raw.val_from, "test_from": raw.test_from}, []
    # Test first, then val from what is left of train (as when the source brings its own test split).
    for key, split_id, fraction in (("test", TEST, test_fraction), ("val", VAL, val_fraction)):
        if origin[f"{key}_from"] is None:
            split = slice_train(split, raw.labels, fraction, seed, split_id)
            origin |= {f"{key}_from": f"stratified {fraction:.0%} of train (seed {seed})",
                       f"{key}_fraction": fraction, "seed": seed}
            sliced.append(f"--{key}-fraction {fraction}")
    order = np.argsort(split, kind="stable")
    images, labels, split = raw.images[order], raw.labels[order], split[order]
    missing = [name_ for split_id, name_ in enumerate(SPLITS) if not np.any(split == split_id)]
    if missing:
        emptied = sliced and "train" in missing and np.any(raw.split == TRAIN)
        left_out = count_images(raw.left_out)
        raise UserError(f"{path}: no {' or '.join(missing)} images found ({raw.layout}); every split needs images"
                        + (f"; {' and '.join(sliced)} left none for train: lower {'them' if len(sliced) > 1 else 'it'}"
                           if emptied else "")
                        + (f" (left out, not among the 7 classes: {left_out})" if left_out else ""))
    if sliced:  # a class too small to slice from (at least one image each goes to test and val) loses train
        had = np.bincount(raw.labels[raw.split == TRAIN], minlength=len(CLASSES))
        has = np.bincount(labels[split == TRAIN], minlength=len(CLASSES))
        lost = [f"{c} ({had[k]} image{'s' * int(had[k] != 1)})" for k, c in enumerate(CLASSES) if had[k] and not has[k]]
        if lost:
            raise UserError(f"{path}: {', '.join(lost)}: too few to slice test and val from and keep some for train; "
                            "add images, or give the source test/ and val/ folders")
    train_copy, duplicates = duplicate_report([raw.pixel_hash[i] for i in order], labels, split)

    meta = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "source": {"kind": source, "layout": raw.layout, "path": str(path.resolve()), "sha256": raw.source_sha256},
        "classes": list(CLASSES),
        "image_shape": list(images.shape[1:]),
        "counts": {s: {c: int(np.sum((split == i) & (labels == k))) for k, c in enumerate(CLASSES)}
                   for i, s in enumerate(SPLITS)},
        **origin,
        **({"left_out": raw.left_out} if raw.left_out else {}),
        "duplicates": duplicates,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    root = default_data_root(data_root)
    arrays = {"images": images, "labels": labels, "split": split, "train_copy": train_copy}
    replaced = _source_of(root / name)
    try:
        with atomic_dir(root, name) as tmp:
            for key in ARRAYS:
                np.save(tmp / f"{key}.npy", arrays[key])
            meta["files"] = {f"{key}.npy": file_sha256(tmp / f"{key}.npy") for key in ARRAYS}
            meta["prepare_seconds"] = round(time.perf_counter() - start, 2)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    except OSError as e:
        raise UserError(
            f"{root}: cannot write the prepared dataset ({e}); check free space and permissions, or pass --data-root"
        ) from None
    log(describe(meta))
    if replaced is not None:
        log(f"replaced the earlier {name} (prepared from {replaced})")
    return PreparedDataset(root / name, verify=False)


def _source_of(folder: Path) -> str | None:
    """Where an existing prepared dataset came from ("?" when its meta.json is unreadable), None when absent."""
    if not folder.exists():
        return None
    try:
        return json.loads((folder / "meta.json").read_text())["source"]["path"]
    except (OSError, ValueError, KeyError, TypeError):
        return "?"


def load(name_or_path: str | Path, data_root: str | Path | None = None, verify: bool = True) -> PreparedDataset:
    """A prepared dataset by name (under the data root) or by the path of its folder."""
    root = default_data_root(data_root)
    for candidate in (root / str(name_or_path), Path(name_or_path).expanduser()):
        if (candidate / "meta.json").is_file():
            return PreparedDataset(candidate, verify=verify)
    prepared = list_prepared(root)
    holds = f"prepared there: {', '.join(prepared)}" if prepared else "nothing is prepared there"
    command = (
        f"fer-tune data prepare {name_or_path} PATH/TO/{name_or_path}.zip" if str(name_or_path) in ("fer2013", "rafdb")
        else f"fer-tune data prepare imagefolder PATH/TO/ZIP_OR_FOLDER --name {name_or_path}"
    )
    if data_root is not None:
        command += f" --data-root {shlex.quote(str(data_root))}"
    close = difflib.get_close_matches(str(name_or_path), prepared, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise UserError(f"no prepared dataset '{name_or_path}' in {root}{hint} ({holds}); run `{command}`")


def list_prepared(data_root: str | Path | None = None) -> list[str]:
    """Names of the prepared datasets under the data root."""
    root = default_data_root(data_root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and (p / "meta.json").is_file())


def duplicate_report(hashes: list[bytes], labels: np.ndarray, split: np.ndarray) -> tuple[np.ndarray, dict]:
    """Groups of pixel-identical images: (train_copy flags, the report stored in meta.json)."""
    by_hash = defaultdict(list)
    for i, h in enumerate(hashes):
        by_hash[h].append(i)
    groups = [np.array(g) for g in by_hash.values() if len(g) > 1]
    in_train = {hashes[i] for i in np.flatnonzero(split == TRAIN)}
    train_copy = np.array([s != TRAIN and h in in_train for h, s in zip(hashes, split)], dtype=bool)

    within = dict.fromkeys(SPLITS, 0)
    across = dict.fromkeys(("train+val", "train+test", "val+test", "train+val+test"), 0)
    conflicting = 0
    for g in groups:
        names = [SPLITS[s] for s in np.unique(split[g])]
        if len(names) == 1:
            within[names[0]] += 1
        else:
            across["+".join(names)] += 1
        conflicting += len(np.unique(labels[g])) > 1
    files = sum(len(g) for g in groups)
    return train_copy, {
        "method": "identical decoded pixels, before resizing",
        "groups": len(groups),
        "files": files,
        "redundant_copies": files - len(groups),
        "groups_within_split": within,
        "groups_across_splits": across,
        "conflicting_label_groups": int(conflicting),
        "copies_in_train": {"val": int(train_copy[split == VAL].sum()), "test": int(train_copy[split == TEST].sum())},
    }


def describe(meta: dict) -> str:
    """The human report of a prepared dataset: source, counts per split and class, duplicates."""
    classes, counts = meta["classes"], meta["counts"]
    channels, height, width = meta["image_shape"]
    totals = {s: sum(counts[s].values()) for s in SPLITS}
    src = meta["source"]
    lines = [
        f"{meta['name']}: {sum(totals.values()):,} images of {channels}x{height}x{width} uint8 "
        f"({'RGB' if channels == 3 else 'gray'}), from {src['path']} ({src['layout']})",
        f"source sha256 {src['sha256']}",
        f"val: {meta['val_from']}",
    ]
    if meta.get("test_from"):  # not in datasets prepared before it was recorded
        lines.append(f"test: {meta['test_from']}")
    if meta.get("left_out"):
        lines.append(f"left out, not among the {len(classes)} classes: {count_images(meta['left_out'])}")
    header = ["split", *classes, "total"]
    rows = [[s, *(counts[s][c] for c in classes), totals[s]] for s in SPLITS]
    rows.append(["all", *(sum(counts[s][c] for s in SPLITS) for c in classes), sum(totals.values())])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [str(row[0]).ljust(widths[0])] + [str(v).rjust(w) for v, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells))
    d = meta["duplicates"]
    within = ", ".join(f"{s} {n}" for s, n in d["groups_within_split"].items())
    across = ", ".join(f"{s} {n}" for s, n in d["groups_across_splits"].items())
    copies = ", ".join(f"{s} {n} of {totals[s]}" for s, n in d["copies_in_train"].items())
    lines += [
        f"duplicates ({d['method']}): {d['groups']} groups, {d['files']} files, "
        f"{d['redundant_copies']} redundant copies",
        f"  groups within one split: {within}; across splits: {across}",
        f"  groups with conflicting labels: {d['conflicting_label_groups']}",
        f"  val/test images with a copy in train (train_copy): {copies}",
        f"prepared in {meta['prepare_seconds']:.1f} s at {meta['created']}",
    ]
    return "\n".join(lines)


@contextmanager
def atomic_dir(root: Path, name: str):
    """A temp folder inside `root` that becomes `root/name` when the block succeeds (replacing an
    existing one only then); on any failure, including KeyboardInterrupt, it is removed."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    tmp.chmod(0o755)  # mkdtemp makes it private; a prepared dataset is ordinary shared data
    try:
        yield tmp
        final = root / name
        if final.exists():
            old = root / f".old{tmp.name}"  # unique, like tmp
            final.rename(old)
            try:
                tmp.rename(final)
            except BaseException:
                old.rename(final)
                raise
            shutil.rmtree(old)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(
            f"{path / 'meta.json'}: unreadable ({e}); prepare the dataset again with `fer-tune data prepare`"
        ) from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{path}: prepared with format version {meta.get('format_version')}, this fer-tune reads "
            f"{FORMAT_VERSION}; re-run `{_reprepare_command(path, meta)}`"
        )
    return meta


def _default_name(source: str, path: Path) -> str:
    if source != "imagefolder":
        return source
    return path.name if path.is_dir() else path.stem


def _reprepare_command(path: Path, meta: dict) -> str:
    """The `fer-tune data prepare` command that rebuilds the dataset at `path` as it was made."""
    src = meta.get("source", {})
    kind, source_path = src.get("kind", "SOURCE"), Path(src.get("path", "PATH"))
    words = ["fer-tune", "data", "prepare", kind, shlex.quote(str(source_path))]
    if path.name != _default_name(kind, source_path):
        words += ["--name", path.name]
    channels, size, _ = meta.get("image_shape", (1, DEFAULT_SIZE, DEFAULT_SIZE))
    if size != DEFAULT_SIZE:
        words += ["--size", str(size)]
    if channels == 3:
        words.append("--rgb")
    if meta.get("val_fraction", DEFAULT_VAL_FRACTION) != DEFAULT_VAL_FRACTION:
        words += ["--val-fraction", str(meta["val_fraction"])]
    if meta.get("test_fraction", DEFAULT_TEST_FRACTION) != DEFAULT_TEST_FRACTION:
        words += ["--test-fraction", str(meta["test_fraction"])]
    if meta.get("seed", DEFAULT_SEED) != DEFAULT_SEED:
        words += ["--seed", str(meta["seed"])]
    if path.parent.resolve() != default_data_root().resolve():
        words += ["--data-root", shlex.quote(str(path.parent))]
    return " ".join(words)

