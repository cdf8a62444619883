"""FER-2013 reader: the Kaggle image-folder layout (zip or folder) and the original fer2013.csv.

Splits follow the standard protocol: train = Training, val = PublicTest, test = PrivateTest.
In the Kaggle layout the usage is the file name's prefix and the class is the folder; two file
names occur in two class folders, so images are keyed by their full path.
"""

import numpy as np
from PIL import Image

from fer_tune.data.decode import (
    RawDataset, class_ids, csv_rows, decode_images, find_tree, open_source, parse_label, parse_pixels,
    pixel_digest, to_stored,
)
from fer_tune.data.splits import TEST, TRAIN, VAL
from fer_tune.errors import UserError

SIDE = 48
USAGES = {"Training": TRAIN, "PublicTest": VAL, "PrivateTest": TEST}
LAYOUTS = (
    "the Kaggle layout train/<emotion>/Training_*.jpg + test/<emotion>/{PublicTest,PrivateTest}_*.jpg "
    "(zip or extracted folder) or the original fer2013.csv (emotion,pixels,Usage)"
)


def read(path, *, size: int, rgb: bool) -> RawDataset:
    """Read FER-2013 from a Kaggle zip, its extracted folder, or fer2013.csv (alone or inside either)."""
    with open_source(path, "the FER-2013 Kaggle zip, its extracted folder, or fer2013.csv") as source:
        tree = find_tree(source, {"train", "test"})
        if tree:
            return _read_kaggle(source, tree[1], size, rgb)
        csvs = [m for m in source.members if m.lower().endswith(".csv")]
        csvs = csvs if len(source.members) == 1 else [m for m in csvs if m.split("/")[-1].lower() == "fer2013.csv"]
        if csvs:
            return _read_csv(source, csvs[0], size, rgb)
    raise UserError(f"{path}: not a FER-2013 source; expected {LAYOUTS}")


def _read_kaggle(source, tree, size, rgb):
    members, split = [], []
    for member, top, _ in tree:
        name = member.split("/")[-1]
        usage = name.split("_", 1)[0]
        if usage not in USAGES:
            raise UserError(
                f"{source.where(member)}: the file name does not start with Training_, PublicTest_ or PrivateTest_, "
                "so its split is unknown; for other FER-2013 copies use `fer-tune data prepare imagefolder`"
            )
        if (usage == "Training") != (top.lower() == "train"):
            raise UserError(
                f"{source.where(member)}: a {usage} image under {top}/; the Kaggle layout keeps Training_ files "
                "in train/ and PublicTest_/PrivateTest_ files in test/ (re-download the original archive)"
            )
        members.append(member)
        split.append(USAGES[usage])
    labels = class_ids(source, members)
    images, hashes = decode_images(source, members, size, rgb, required=("FER-2013", SIDE))
    return RawDataset(
        images, np.array(labels, np.int64), np.array(split, np.uint8), hashes,
        layout="FER-2013 Kaggle folders", source_sha256=source.sha256(),
        val_from="PublicTest", test_from="PrivateTest",
    )


def _read_csv(source, member, size, rgb):
    images, labels, split, hashes = [], [], [], []
    for line, row in csv_rows(source, member, ("emotion", "pixels", "Usage")):
        where = f"{source.where(member)} line {line}"
        usage = row["Usage"].strip()
        if usage not in USAGES:
            raise UserError(f"{where}: unknown Usage '{usage}'; expected Training, PublicTest or PrivateTest")
        pixels = parse_pixels(row["pixels"], where, SIDE)
        labels.append(parse_label(row["emotion"], where, 0, 6))
        split.append(USAGES[usage])
        im = Image.fromarray(pixels)
        hashes.append(pixel_digest(im))
        images.append(to_stored(im, size, rgb))
    if not images:
        raise UserError(f"{source.where(member)}: the CSV has no rows; download fer2013.csv again")
    return RawDataset(
        np.stack(images), np.array(labels, np.int64), np.array(split, np.uint8), hashes,
        layout="fer2013.csv", source_sha256=source.sha256(), val_from="PublicTest", test_from="PrivateTest",
    )
