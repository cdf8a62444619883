"""Generic reader: `[prefix/]<split>/<class>/<image>` or `[prefix/]<class>/<image>`, as a zip or folder.

Split folders are train, val|valid|validation and test, case-insensitive; val and test are optional
(prepare() then slices them from train), and a tree of class folders alone is all train. Class
folders may use any name in SYNONYMS. Images of any size and mode are converted to gray (or RGB)
and resized to the stored size.
"""

from collections import Counter

import numpy as np

from fer_tune.data.classes import extra_class
from fer_tune.data.decode import (
    IMAGE_SUFFIXES, RawDataset, class_id, decode_images, find_class_tree, find_tree, open_source,
)
from fer_tune.data.splits import TEST, TRAIN, VAL
from fer_tune.errors import UserError

SPLIT_FOLDERS = {"train": TRAIN, "val": VAL, "valid": VAL, "validation": VAL, "test": TEST}
LAYOUT = ("<split>/<class>/<image> with split folders train, val|valid|validation and test (both optional), "
          "or <class>/<image>")


def read(path, *, size: int, rgb: bool) -> RawDataset:
    """Read an image-folder tree from a zip or folder."""
    with open_source(path, f"a zip or folder laid out as {LAYOUT}") as source:
        tree = find_tree(source, SPLIT_FOLDERS)
        if tree is None:
            classes_only = find_class_tree(source)
            if classes_only is None:
                raise UserError(f"{path}: no image folders found; expected {LAYOUT}")
            images = [(member, "train", folder) for member, folder in classes_only[1]]
            return _read(source, images, size, rgb, layout="class folders, no split folders")
        prefix, images = tree
        depth = prefix.count("/") + 3
        for member in source.members:
            parts = member.split("/")
            if (
                member.startswith(prefix) and len(parts) == depth and member.lower().endswith(IMAGE_SUFFIXES)
                and parts[-3].lower() not in SPLIT_FOLDERS
            ):
                raise UserError(
                    f"{source.where(prefix + parts[-3])}: unknown split folder '{parts[-3]}'; "
                    "expected train, val|valid|validation or test"
                )
        return _read(source, images, size, rgb, layout="image folders")


def _read(source, images: list[tuple[str, str, str]], size: int, rgb: bool, layout: str) -> RawDataset:
    """Decode (member, split folder, class folder) triples; leave out the classes that are not among
    the 7 (a CK+ contempt folder), counting them."""
    left_out = Counter(extra_class(folder) for _, _, folder in images if extra_class(folder))
    images = [image for image in images if not extra_class(image[2])]
    members = [member for member, _, _ in images]
    labels = [class_id(source.where(m.rsplit("/", 1)[0]), folder) for m, _, folder in images]
    split = [SPLIT_FOLDERS[top.lower()] for _, top, _ in images]
    pixels, hashes = decode_images(source, members, size, rgb)
    return RawDataset(
        pixels, np.array(labels, np.int64), np.array(split, np.uint8), hashes,
        layout=layout, source_sha256=source.sha256(),
        val_from="val folder" if VAL in split else None,
        test_from="test folder" if TEST in split else None, left_out=dict(sorted(left_out.items())),
    )
