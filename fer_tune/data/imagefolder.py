"""Generic reader: `[prefix/]<split>/<class>/<image>` or `[prefix/]<class>/<image>`, as a zip or folder.

Split folders are train, val|valid|validation and test, case-insensitive; val and test are optional
(prepare() then slices them from train), and a tree of class folders alone is all train. Class
folders may use any name in SYNONYMS. Images of any size and mode are converted to gray (or RGB)
and resized to the stored size.
"""

from collections import Counter

import numpy as np

from fer_tune.data.classes import canonical_class, extra_class
from fer_tune.data.decode import (
    IMAGE_SUFFIXES, RawDataset, Source, class_ids, decode_images, find_tree, one_tree, open_source,
)
from fer_tune.data.splits import TEST, TRAIN, VAL
from fer_tune.errors import UserError

SPLIT_FOLDERS = {"train": TRAIN, "training": TRAIN, "val": VAL, "valid": VAL, "validation": VAL,
                 "test": TEST, "testing": TEST}
SPLIT_NAMES = "train|training, val|valid|validation and test|testing"
LAYOUT = f"<split>/<class>/<image> with split folders {SPLIT_NAMES} (val and test optional), or <class>/<image>"


def read(path, *, size: int, rgb: bool) -> RawDataset:
    """Read an image-folder tree from a zip or folder."""
    with open_source(path, f"a zip or folder laid out as {LAYOUT}") as source:
        images, split_level = find_images(source)
        layout = "image folders" if split_level else "class folders, no split folders"
        return _read(source, images, size, rgb, layout=layout)


def find_images(source) -> tuple[list[tuple[str, str, str]], bool]:
    """The images of an image-folder tree as (member, split folder, class folder), and whether the
    tree has split folders (a tree of class folders alone gets split folder "train"). Used by
    `fer-tune evaluate` too. No tree, or an image outside the tree's layout, is a UserError."""
    tree = find_tree(source, SPLIT_FOLDERS)
    if tree is not None:
        prefix, images = tree
    else:
        classes_only = _find_class_tree(source)
        if classes_only is None:
            raise UserError(f"{source.path}: no image folders found; expected {LAYOUT}")
        prefix, images = classes_only[0], [(member, "train", folder) for member, folder in classes_only[1]]
    _refuse_strays(source, prefix, images, split_level=tree is not None)
    return images, tree is not None


def _find_class_tree(source: Source) -> tuple[str, list[tuple[str, str]]] | None:
    """Image members shaped `[prefix/]<class>/<file>`, where some class folder has the name of a class
    (of the 7 or of EXTRA_CLASSES): (prefix, [(member, class folder)]) with every image folder beside
    it, or None."""
    found = {}
    for member in source.members:
        parts = member.split("/")
        if len(parts) >= 2 and (canonical_class(parts[-2]) or extra_class(parts[-2])) \
                and member.lower().endswith(IMAGE_SUFFIXES):
            found.setdefault("".join(p + "/" for p in parts[:-2]), [])
    tree = one_tree(source, found)
    if tree is None:
        return None
    prefix = tree[0]
    depth = prefix.count("/") + 2
    return prefix, [
        (member, member.split("/")[-2]) for member in source.members
        if member.startswith(prefix) and member.count("/") + 1 == depth and member.lower().endswith(IMAGE_SUFFIXES)
    ]


def _refuse_strays(source, prefix: str, images: list[tuple[str, str, str]], split_level: bool) -> None:
    """No image under the tree's folder is silently left out: one outside the layout (in a subfolder
    of a class folder, an unknown split folder, beside the class folders) is a UserError."""
    chosen = {member for member, _, _ in images}
    strays = [m for m in source.members
              if m.startswith(prefix) and m.lower().endswith(IMAGE_SUFFIXES) and m not in chosen]
    if not strays:
        return
    if split_level:
        for member in strays:
            top = member[len(prefix):].split("/")
            if len(top) == 3:
                raise UserError(f"{source.where(prefix + top[0])}: unknown split folder '{top[0]}'; "
                                f"expected {SPLIT_NAMES}")
    shape = "<split>/<class>/<image>" if split_level else "<class>/<image>"
    raise UserError(f"{source.where(strays[0])}: not laid out as {shape} ({len(strays)} image(s) like it); move them "
                    "into class folders or out of the dataset's folder")


def _read(source, images: list[tuple[str, str, str]], size: int, rgb: bool, layout: str) -> RawDataset:
    """Decode (member, split folder, class folder) triples; leave out the classes that are not among
    the 7 (a CK+ contempt folder), counting them."""
    extra = [extra_class(folder) for _, _, folder in images]
    left_out = Counter(e for e in extra if e)
    images = [image for image, e in zip(images, extra) if not e]
    members = [member for member, _, _ in images]
    labels = class_ids(source, members)
    split = [SPLIT_FOLDERS[top.lower()] for _, top, _ in images]
    pixels, hashes = decode_images(source, members, size, rgb)
    return RawDataset(
        pixels, np.array(labels, np.int64), np.array(split, np.uint8), hashes,
        layout=layout, source_sha256=source.sha256(),
        val_from="val folder" if VAL in split else None,
        test_from="test folder" if TEST in split else None, left_out=dict(sorted(left_out.items())),
    )
