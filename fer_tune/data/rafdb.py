"""RAF-DB (basic) reader: the official layout and the Kaggle layout, as zip or folder.

Official: `[prefix/]Image/aligned/<name>_aligned.jpg` + `[prefix/]EmoLabel/list_patition_label.txt`
(lines `train_00001.jpg 5`; the names lack `_aligned`). Kaggle: `[prefix/]DATASET/{train,test}/[1..7/]*.jpg`
with labels from the 1..7 folders and/or `[prefix/]{train,test}_labels.csv` (image,label).
Labels 1..7 are remapped to the canonical order; val is sliced from train by prepare().
"""

import numpy as np

from fer_tune.data.classes import RAFDB_TO_CANONICAL
from fer_tune.data.decode import IMAGE_SUFFIXES, RawDataset, csv_rows, decode_images, open_source, parse_label
from fer_tune.data.splits import TEST, TRAIN
from fer_tune.errors import UserError

LABEL_FILE = "EmoLabel/list_patition_label.txt"
SPLIT_IDS = {"train": TRAIN, "test": TEST}
CLASS_FOLDERS = {str(label) for label in RAFDB_TO_CANONICAL}
LAYOUTS = (
    "the official layout Image/aligned/*_aligned.jpg + EmoLabel/list_patition_label.txt "
    "(optionally under basic/), or the Kaggle layout DATASET/{train,test}/{1..7}/*.jpg "
    "with train_labels.csv/test_labels.csv"
)


def read(path, *, size: int, rgb: bool) -> RawDataset:
    """Read RAF-DB basic from a zip or folder in the official or the Kaggle layout."""
    with open_source(path, "the RAF-DB basic zip or folder") as source:
        label_files = [m for m in source.members if m == LABEL_FILE or m.endswith("/" + LABEL_FILE)]
        if len(label_files) > 1:
            raise UserError(
                f"{path}: holds several {LABEL_FILE} files ({', '.join(label_files)}); pass the folder of one"
            )
        if label_files:
            members, labels, split, layout = _official(source, label_files[0])
        else:
            members, labels, split, layout = _kaggle(source)
        images, hashes = decode_images(source, members, size, rgb)
        return RawDataset(
            images, np.array(labels, np.int64), np.array(split, np.uint8), hashes,
            layout=layout, source_sha256=source.sha256(), val_from=None, test_from="RAF-DB test",
        )


def _official(source, label_file):
    prefix = label_file[: -len(LABEL_FILE)]
    present = set(source.members)
    try:
        text = source.read(label_file).decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{source.where(label_file)}: not a text file ({e}); download RAF-DB again") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source.where(label_file)} line {number}"
        fields = line.split()
        if len(fields) != 2 or fields[0].split("_", 1)[0] not in SPLIT_IDS:
            raise UserError(f"{where}: expected '<train_NNNNN.jpg|test_NNNN.jpg> <label 1..7>', got '{line.strip()}'")
        name, label = fields
        stem, dot, ext = name.rpartition(".")
        member = f"{prefix}Image/aligned/{stem}_aligned{dot}{ext}"
        if member not in present:
            raise UserError(f"{where}: lists {name}, but {source.where(member)} is missing; the archive is incomplete")
        rows.append((member, RAFDB_TO_CANONICAL[parse_label(label, where, 1, 7)], SPLIT_IDS[name.split("_", 1)[0]]))
    listed = {r[0] for r in rows}
    unlisted = sorted(m for m in present if m.startswith(f"{prefix}Image/aligned/") and m not in listed
                      and m.lower().endswith(IMAGE_SUFFIXES))
    if unlisted:
        raise UserError(f"{source.where(unlisted[0])}: not in {source.where(label_file)}"
                        + (f" (nor {len(unlisted) - 1} other image(s) of Image/aligned)" if len(unlisted) > 1 else "")
                        + "; an image without a label cannot be used: add its line or remove it")
    rows.sort()
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], "RAF-DB official"


def _kaggle(source):
    """(members, labels, splits) of the Kaggle layout; raises when the source has neither layout."""
    images = {}  # member -> (prefix, split name, folder label or None)
    for member in source.members:
        parts = member.split("/")
        k = next((k for k in range(len(parts) - 2) if parts[k].lower() == "dataset"), None)
        if k is None or parts[k + 1].lower() not in SPLIT_IDS or not member.lower().endswith(IMAGE_SUFFIXES):
            continue
        folders = parts[k + 2:-1]
        if len(folders) > 1 or (folders and folders[0] not in CLASS_FOLDERS):
            raise UserError(
                f"{source.where('/'.join(parts[:-1]))}: unknown class folder '{'/'.join(folders)}'; "
                "RAF-DB class folders are 1..7"
            )
        prefix = "".join(p + "/" for p in parts[:k])
        images[member] = (prefix, parts[k + 1].lower(), int(folders[0]) if folders else None)
    if not images:
        raise UserError(f"{source.path}: not a RAF-DB source; expected {LAYOUTS}")
    prefixes = {p for p, _, _ in images.values()}
    if len(prefixes) > 1:
        raise UserError(f"{source.path}: holds several RAF-DB DATASET folders; pass the folder of just one")
    prefix = prefixes.pop()
    csv_labels = {s: _csv_labels(source, f"{prefix}{s}_labels.csv") for s in SPLIT_IDS}

    members, labels, split = [], [], []
    for member, (_, split_name, label) in sorted(images.items()):
        name = member.split("/")[-1]
        listed = csv_labels[split_name].pop(name, None)
        if listed is not None and label is not None and listed[0] != label:
            raise UserError(
                f"{listed[1]}: label {listed[0]} for {name} disagrees with its folder {source.where(member)}; "
                "fix the CSV or move the file"
            )
        if listed is not None:
            label = listed[0]
        if label is None:
            raise UserError(
                f"{source.where(member)}: no label; put it in a 1..7 class folder or list it in {split_name}_labels.csv"
            )
        members.append(member)
        labels.append(RAFDB_TO_CANONICAL[label])
        split.append(SPLIT_IDS[split_name])
    for split_name, leftover in csv_labels.items():
        if leftover:
            name, (_, where) = next(iter(leftover.items()))
            raise UserError(
                f"{where}: lists {name}, which is not under DATASET/{split_name}/; the archive is incomplete"
            )
    return members, labels, split, "RAF-DB Kaggle"


def _csv_labels(source, member) -> dict[str, tuple[int, str]]:
    """{image name: (label 1..7, where it was read)} from a Kaggle labels CSV; empty when absent."""
    if member not in source.members:
        return {}
    labels = {}
    for line, row in csv_rows(source, member, ("image", "label")):
        where = f"{source.where(member)} line {line}"
        labels[row["image"].strip()] = (parse_label(row["label"], where, 1, 7), where)
    return labels
