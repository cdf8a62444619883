"""The data layer on small archives built here: every source layout, the prepared format, errors."""

import hashlib
import io
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fer_tune.data.prepared as prepared_module
from fer_tune.data import (
    CLASSES, PreparedDataset, default_data_root, describe, list_prepared, load, prepare, stratified_indices,
)
from fer_tune.data.classes import RAFDB_TO_CANONICAL
from fer_tune.errors import UserError

TRAIN, VAL, TEST = 0, 1, 2


# ---------------------------------------------------------------------------------------------
# Building sources


def noise(seed: int, side: int = 48, mode: str = "L") -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (side, side) if mode == "L" else (side, side, 3)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def encode(im: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, quality=95) if fmt == "JPEG" else im.save(buf, fmt)
    return buf.getvalue()


def jpeg(seed: int, side: int = 48, mode: str = "L") -> bytes:
    return encode(noise(seed, side, mode))


def gray(data: bytes) -> np.ndarray:
    """How a 48x48 file must come out: decoded by PIL, converted to L, shaped (1, 48, 48)."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"))[None]


def write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def write_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for rel, data in files.items():
            z.writestr(rel, data)
    return path


def content_digest(files: dict[str, bytes]) -> str:
    lines = "".join(f"{hashlib.sha256(files[rel]).hexdigest()}  {rel}\n" for rel in sorted(files))
    return hashlib.sha256(lines.encode()).hexdigest()


def fer_files() -> dict[str, bytes]:
    """A tiny FER-2013 Kaggle tree: per class 3 Training, 2 PublicTest, 2 PrivateTest images, plus
    the quirks: one name in two class folders, a duplicate pair in train, a test copy of a train
    image, and a val copy of a train image under another label."""
    files, seed = {}, 0
    for c in CLASSES:
        for usage, top, n in (("Training", "train", 3), ("PublicTest", "test", 2), ("PrivateTest", "test", 2)):
            for i in range(n):
                files[f"{top}/{c}/{usage}_{c}{i}.jpg"] = jpeg(seed := seed + 1)
    files["train/neutral/Training_same.jpg"] = jpeg(1000)
    files["train/surprise/Training_same.jpg"] = jpeg(1001)
    files["train/fear/Training_zdup.jpg"] = files["train/fear/Training_fear0.jpg"]
    files["test/happy/PrivateTest_copy.jpg"] = files["train/happy/Training_happy0.jpg"]
    files["test/sad/PublicTest_conflict.jpg"] = files["train/angry/Training_angry0.jpg"]
    return files


def fer_expected(files: dict[str, bytes], prefix: str = ""):
    """{split id: (images, labels, members)} in the documented order: by split, then by path."""
    usage_split = {"Training": TRAIN, "PublicTest": VAL, "PrivateTest": TEST}
    out = {}
    for s in (TRAIN, VAL, TEST):
        members = sorted(m for m in files if usage_split[m.split("/")[-1].split("_")[0]] == s)
        images = np.stack([gray(files[m]) for m in members])
        labels = np.array([CLASSES.index(m.split("/")[-2]) for m in members])
        out[s] = images, labels, [prefix + m for m in members]
    return out


def raf_label_names(n_train=70, n_test=21):
    """Official RAF-DB names with labels 1..7, balanced: [(name without _aligned, label)]."""
    rows = [(f"train_{i:05d}.jpg", i % 7 + 1) for i in range(1, n_train + 1)]
    return rows + [(f"test_{i:04d}.jpg", i % 7 + 1) for i in range(1, n_test + 1)]


def raf_official_files(prefix: str = "") -> tuple[dict[str, bytes], dict[str, int]]:
    """(files, {image bytes-as-stored: raw label}) of an official layout with 48x48 RGB JPEGs;
    the label file ends without a newline, like the real one."""
    files, label_of = {}, {}
    rows = raf_label_names()
    for seed, (name, label) in enumerate(rows):
        data = jpeg(seed, mode="RGB")
        files[f"{prefix}Image/aligned/{name[:-4]}_aligned.jpg"] = data
        label_of[gray(data).tobytes()] = label
    files[f"{prefix}EmoLabel/list_patition_label.txt"] = "\n".join(f"{n} {l}" for n, l in rows).encode()
    return files, label_of


def check_raf(ds: PreparedDataset, label_of: dict[bytes, int], n_train=70, n_test=21):
    """Every stored image has its file's canonical label; train/val/test sizes are right."""
    assert len(ds) == n_train + n_test
    assert len(ds.indices("train")) + len(ds.indices("val")) == n_train
    assert len(ds.indices("test")) == n_test
    for image, label in zip(ds.images, ds.labels):
        assert label == RAFDB_TO_CANONICAL[label_of[image.tobytes()]]


def assert_clean(root: Path):
    assert not root.exists() or not any(root.iterdir()), list(root.iterdir())


def user_error(root: Path, *fragments: str, call) -> str:
    """Run `call`, expect a one-line UserError containing all fragments, and a clean data root."""
    with pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert_clean(root)
    return message


@pytest.fixture
def root(tmp_path):
    return tmp_path / "data"


@pytest.fixture
def fer_zip(tmp_path):
    return write_zip(tmp_path / "fer2013.zip", fer_files())


# ---------------------------------------------------------------------------------------------
# FER-2013


def test_fer2013_zip_round_trip(fer_zip, root):
    logs = []
    ds = prepare("fer2013", fer_zip, data_root=root, log=logs.append)

    expected = fer_expected(fer_files())
    for s, split in enumerate(("train", "val", "test")):
        images, labels = ds.arrays(split)
        assert np.array_equal(images, expected[s][0])
        assert np.array_equal(labels, expected[s][1])
        assert images.dtype == np.uint8 and labels.dtype == np.int64
    assert (len(ds.indices("train")), len(ds.indices("val")), len(ds.indices("test"))) == (24, 15, 15)
    assert ds.image_shape == (1, 48, 48) and ds.num_classes == 7 and ds.classes == CLASSES
    assert ds.sha256 == hashlib.sha256(fer_zip.read_bytes()).hexdigest()

    # Both Training_same.jpg files are kept, under their own class.
    same = [i for i, m in enumerate(expected[TRAIN][2]) if m.endswith("Training_same.jpg")]
    assert sorted(ds.labels[same]) == sorted([CLASSES.index("surprise"), CLASSES.index("neutral")])

    # train_copy: exactly the planted val and test copies.
    flagged = [m for m, f in zip(sum((expected[s][2] for s in (0, 1, 2)), []), ds.train_copy) if f]
    assert flagged == ["test/sad/PublicTest_conflict.jpg", "test/happy/PrivateTest_copy.jpg"]

    duplicates = ds.meta["duplicates"]
    assert duplicates["groups"] == 3 and duplicates["files"] == 6 and duplicates["redundant_copies"] == 3
    assert duplicates["groups_within_split"] == {"train": 1, "val": 0, "test": 0}
    assert duplicates["groups_across_splits"] == {"train+val": 1, "train+test": 1, "val+test": 0, "train+val+test": 0}
    assert duplicates["conflicting_label_groups"] == 1
    assert duplicates["copies_in_train"] == {"val": 1, "test": 1}

    assert ds.meta["counts"]["val"]["sad"] == 3 and ds.meta["counts"]["train"]["fear"] == 4
    assert ds.meta["val_from"] == "PublicTest" and "val_fraction" not in ds.meta
    assert ds.meta["test_from"] == "PrivateTest" and "test_fraction" not in ds.meta
    report = "\n".join(logs)
    assert "train" in report and "24" in report and "3 groups" in report and "conflicting labels: 1" in report

    assert sorted(p.name for p in (root / "fer2013").iterdir()) == [
        "images.npy", "labels.npy", "meta.json", "split.npy", "train_copy.npy"]
    again = load("fer2013", data_root=root)
    assert np.array_equal(again.images, ds.images) and np.array_equal(again.train_copy, ds.train_copy)
    assert isinstance(again.images, np.memmap)


def test_fer2013_folder_with_leading_level_matches_zip(fer_zip, tmp_path, root):
    files = {f"fer2013/{rel}": data for rel, data in fer_files().items()}
    folder = write_folder(tmp_path / "extracted", files)
    from_folder = prepare("fer2013", folder, name="fer-folder", data_root=root, log=lambda _: None)
    from_zip = prepare("fer2013", fer_zip, data_root=root, log=lambda _: None)
    assert np.array_equal(from_folder.images, from_zip.images)
    assert np.array_equal(from_folder.labels, from_zip.labels)
    assert np.array_equal(from_folder.split, from_zip.split)
    assert from_folder.sha256 == content_digest(files)
    assert list_prepared(root) == ["fer-folder", "fer2013"]


def fer_csv_text(rows) -> str:
    return "emotion,pixels,Usage\n" + "".join(f"{e},{' '.join(map(str, p.ravel()))},{u}\n" for e, p, u in rows)


def test_fer2013_csv_keeps_exact_pixels(tmp_path, root):
    rng = np.random.default_rng(0)
    rows = [(k % 7, rng.integers(0, 256, (48, 48)), u)
            for u in ("Training", "PublicTest", "PrivateTest") for k in range(9)]
    rows.append((3, rows[0][1], "PrivateTest"))  # a test copy of the first train image
    csv_path = tmp_path / "fer2013.csv"
    csv_path.write_text(fer_csv_text(rows))

    ds = prepare("fer2013", csv_path, data_root=root, log=lambda _: None)
    for s, usage in enumerate(("Training", "PublicTest", "PrivateTest")):
        images, labels = ds.arrays(("train", "val", "test")[s])
        chosen = [r for r in rows if r[2] == usage]
        assert np.array_equal(images[:, 0], np.stack([p for _, p, _ in chosen]).astype(np.uint8))
        assert list(labels) == [e for e, _, _ in chosen]
    assert ds.train_copy.sum() == 1 and ds.train_copy[-1]
    assert ds.meta["duplicates"]["conflicting_label_groups"] == 1
    assert ds.sha256 == hashlib.sha256(csv_path.read_bytes()).hexdigest()
    assert ds.meta["source"]["layout"] == "fer2013.csv"


# ---------------------------------------------------------------------------------------------
# RAF-DB


@pytest.mark.parametrize("form, prefix", [("folder", ""), ("folder", "basic/"), ("zip", "basic/"), ("zip", "")])
def test_rafdb_official_layouts(tmp_path, root, form, prefix):
    files, label_of = raf_official_files(prefix)
    path = write_zip(tmp_path / "rafdb.zip", files) if form == "zip" else write_folder(tmp_path / "raf", files)
    ds = prepare("rafdb", path, data_root=root, val_fraction=0.2, log=lambda _: None)
    check_raf(ds, label_of)
    assert ds.meta["val_fraction"] == 0.2 and ds.meta["seed"] == 0 and "test_fraction" not in ds.meta
    # Stratified: 10 train images per class, 2 of each go to val.
    assert all(n == 2 for n in ds.meta["counts"]["val"].values())
    expected_sha = hashlib.sha256(path.read_bytes()).hexdigest() if form == "zip" else content_digest(files)
    assert ds.sha256 == expected_sha


def test_rafdb_val_slice_is_seeded(tmp_path, root):
    files, _ = raf_official_files()
    path = write_zip(tmp_path / "rafdb.zip", files)
    first = prepare("rafdb", path, name="a", data_root=root, val_fraction=0.2, seed=7, log=lambda _: None)
    same = prepare("rafdb", path, name="b", data_root=root, val_fraction=0.2, seed=7, log=lambda _: None)
    other = prepare("rafdb", path, name="c", data_root=root, val_fraction=0.2, seed=8, log=lambda _: None)
    assert np.array_equal(first.arrays("val")[0], same.arrays("val")[0])
    assert not np.array_equal(first.arrays("val")[0], other.arrays("val")[0])
    assert np.array_equal(np.sort(first.labels), np.sort(other.labels))


@pytest.mark.parametrize("with_folders, with_csv", [(True, True), (True, False), (False, True)])
def test_rafdb_kaggle_layout(tmp_path, root, with_folders, with_csv):
    files, label_of = {}, {}
    csv_lines = {"train": ["image,label"], "test": ["image,label"]}
    for seed, (name, label) in enumerate(raf_label_names()):
        split = name.split("_")[0]
        image = name[:-4] + "_aligned.jpg"
        data = jpeg(seed, mode="RGB")
        folder = f"{label}/" if with_folders else ""
        files[f"DATASET/{split}/{folder}{image}"] = data
        csv_lines[split].append(f"{image},{label}")
        label_of[gray(data).tobytes()] = label
    if with_csv:
        for split, lines in csv_lines.items():
            files[f"{split}_labels.csv"] = ("\n".join(lines) + "\n").encode()
    path = write_zip(tmp_path / "raf-kaggle.zip", {f"archive/{k}": v for k, v in files.items()})
    ds = prepare("rafdb", path, data_root=root, log=lambda _: None)
    check_raf(ds, label_of)
    assert ds.meta["source"]["layout"] == "RAF-DB Kaggle"


def test_rafdb_size_and_rgb(tmp_path, root):
    """100x100 red images: stored at the asked size, RGB keeps the channel order, gray is luma."""
    red = encode(Image.new("RGB", (100, 100), (255, 0, 0)))
    files, _ = raf_official_files("basic/")
    files = {m: (red if m.endswith("train_00001_aligned.jpg") else data) for m, data in files.items()}
    path = write_folder(tmp_path / "raf", files)

    color = prepare("rafdb", path, name="color", data_root=root, size=32, rgb=True, log=lambda _: None)
    assert color.image_shape == (3, 32, 32) and color.images.shape == (91, 3, 32, 32)
    reds = [img for img in color.images if img[0].min() > 240 and img[1:].max() < 15]
    assert len(reds) == 1

    small = prepare("rafdb", path, name="gray", data_root=root, size=24, log=lambda _: None)
    assert small.image_shape == (1, 24, 24)
    assert sum(abs(int(img.mean()) - 76) <= 2 and img.std() < 2 for img in small.images) == 1  # 0.299 * 255
    assert "3x32x32" in describe(color.meta) and "RGB" in describe(color.meta)


# ---------------------------------------------------------------------------------------------
# Image folders


def imagefolder_files(splits=("Train", "TEST")) -> dict[str, bytes]:
    """Synonym class folders, odd sizes and modes; 4 images per class and split."""
    names = ["Anger", "disgusted", "scared", "Happiness", "sadness", "Surprised", "calm"]
    files, seed = {}, 0
    for split in splits:
        for k, name in enumerate(names):
            for i in range(4):
                im = noise(seed := seed + 1, side=30 + 10 * (i % 3), mode="RGB" if i % 2 else "L")
                files[f"faces/{split}/{name}/img{i}.png"] = encode(im, "PNG")
    files["faces/README.txt"] = b"not an image"
    return files


def test_imagefolder_synonyms_and_sliced_val(tmp_path, root):
    path = write_zip(tmp_path / "myfaces.zip", imagefolder_files())
    ds = prepare("imagefolder", path, data_root=root, val_fraction=0.25, log=lambda _: None)
    assert ds.name == "myfaces" and ds.image_shape == (1, 48, 48)
    assert ds.meta["val_fraction"] == 0.25
    counts = ds.meta["counts"]
    assert all(counts["train"][c] == 3 and counts["val"][c] == 1 and counts["test"][c] == 4 for c in CLASSES)


def test_imagefolder_with_validation_folder(tmp_path, root):
    path = write_folder(tmp_path / "faces-src", imagefolder_files(("train", "Validation", "test")))
    ds = prepare("imagefolder", path, data_root=root, size=40, rgb=True, log=lambda _: None)
    assert ds.name == "faces-src" and ds.image_shape == (3, 40, 40)
    assert ds.meta["val_from"] == "val folder" and "val_fraction" not in ds.meta
    assert all(ds.meta["counts"][s][c] == 4 for s in ("train", "val", "test") for c in CLASSES)
    # Within a split, images are ordered by path: the first test image is Anger/img0.png (30x30, upscaled).
    first_test = Image.open(io.BytesIO(imagefolder_files(("train", "Validation", "test"))["faces/test/Anger/img0.png"]))
    assert ds.labels[ds.indices("test")[0]] == CLASSES.index("angry")
    expected = np.asarray(first_test.convert("RGB").resize((40, 40), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    assert np.abs(ds.arrays("test")[0][0].astype(int) - expected).max() <= 1


# ---------------------------------------------------------------------------------------------
# Splits, roots, listing


def test_stratified_indices():
    labels = np.array([0] * 50 + [1] * 5 + [3] * 1 + [0] * 50)
    picked = stratified_indices(labels, 0.1, seed=3)
    assert np.array_equal(picked, np.sort(picked))
    assert np.bincount(labels[picked], minlength=4).tolist() == [10, 1, 0, 1]
    assert np.array_equal(picked, stratified_indices(labels, 0.1, seed=3))
    assert not np.array_equal(picked, stratified_indices(labels, 0.1, seed=4))
    assert len(stratified_indices(np.array([], dtype=np.int64), 0.1, 0)) == 0


def test_default_data_root(monkeypatch, tmp_path):
    monkeypatch.delenv("FER_TUNE_DATA", raising=False)
    assert default_data_root() == Path("data")
    monkeypatch.setenv("FER_TUNE_DATA", str(tmp_path / "env"))
    assert default_data_root() == tmp_path / "env"
    assert default_data_root(tmp_path / "flag") == tmp_path / "flag"


def test_load_by_path_and_missing_name(fer_zip, root):
    prepare("fer2013", fer_zip, name="mine", data_root=root, log=lambda _: None)
    assert load(root / "mine").name == "mine"
    with pytest.raises(UserError) as info:
        load("fer2013", data_root=root)
    message = str(info.value)
    assert f"no prepared dataset 'fer2013' in {root} (prepared there: mine)" in message
    assert f"`fer-tune data prepare fer2013 PATH/TO/fer2013.zip --data-root {root}`" in message
    with pytest.raises(UserError, match=f"no prepared dataset 'mnie' in {root} \\(did you mean 'mine'\\?\\) "):
        load("mnie", data_root=root)


# ---------------------------------------------------------------------------------------------
# Bad input: one clear line naming the file, nothing left in the data root


def test_missing_path(tmp_path, root):
    user_error(root, str(tmp_path / "nope.zip"), "no such file or folder",
               call=lambda: prepare("fer2013", tmp_path / "nope.zip", data_root=root))


@pytest.mark.parametrize("source, fragment", [
    ("fer2013", "not a FER-2013 source; expected the Kaggle layout"),
    ("rafdb", "not a RAF-DB source; expected the official layout"),
    ("imagefolder", "no image folders found; expected <split>/<class>/<image>"),
])
def test_unknown_layout(tmp_path, root, source, fragment):
    path = write_zip(tmp_path / "odd.zip", {"photos/a.jpg": jpeg(1), "notes.txt": b"hello"})
    user_error(root, str(path), fragment, call=lambda: prepare(source, path, data_root=root))


def test_unknown_class_folder(tmp_path, root):
    files = fer_files()
    files["train/angri/Training_x.jpg"] = jpeg(5)
    path = write_zip(tmp_path / "fer2013.zip", files)
    user_error(root, f"{path}/train/angri", "unknown class folder 'angri'", "angry/anger/mad", "neutral/calm",
               call=lambda: prepare("fer2013", path, data_root=root))


def test_unknown_class_folder_rafdb_kaggle(tmp_path, root):
    path = write_folder(tmp_path / "raf", {"DATASET/train/8/train_00001_aligned.jpg": jpeg(1),
                                           "DATASET/test/1/test_0001_aligned.jpg": jpeg(2)})
    user_error(root, "DATASET/train/8", "unknown class folder '8'", "1..7",
               call=lambda: prepare("rafdb", path, data_root=root))


def test_rafdb_kaggle_csv_disagrees_with_folder(tmp_path, root):
    path = write_folder(tmp_path / "raf", {
        "DATASET/train/2/train_00001_aligned.jpg": jpeg(1),
        "DATASET/test/1/test_0001_aligned.jpg": jpeg(2),
        "train_labels.csv": b"image,label\ntrain_00001_aligned.jpg,3\n",
    })
    user_error(root, f"{path}/train_labels.csv line 2", "label 3 for train_00001_aligned.jpg disagrees",
               call=lambda: prepare("rafdb", path, data_root=root))


def test_unknown_split_folder(tmp_path, root):
    files = imagefolder_files()
    files["faces/extra/calm/x.png"] = encode(noise(3), "PNG")
    path = write_zip(tmp_path / "faces.zip", files)
    user_error(root, f"{path}/faces/extra", "unknown split folder 'extra'",
               call=lambda: prepare("imagefolder", path, data_root=root))


def test_undecodable_image(tmp_path, root):
    files = fer_files()
    files["test/fear/PrivateTest_broken.jpg"] = files["test/fear/PrivateTest_fear0.jpg"][:200]
    path = write_zip(tmp_path / "fer2013.zip", files)
    user_error(root, f"{path}/test/fear/PrivateTest_broken.jpg", "cannot decode the image",
               call=lambda: prepare("fer2013", path, data_root=root))


def test_not_an_image_in_imagefolder(tmp_path, root):
    files = imagefolder_files()
    files["faces/Train/calm/zz.jpg"] = b"plain text"
    path = write_folder(tmp_path / "faces", files)
    user_error(root, str(path / "faces/Train/calm/zz.jpg"), "cannot decode the image",
               call=lambda: prepare("imagefolder", path, data_root=root))


def test_every_undecodable_image_is_named_at_once(tmp_path, root):
    files = imagefolder_files()
    files["faces/Train/calm/zz.jpg"] = b"plain text"
    files["faces/Train/calm/zy.png"] = encode(noise(3), "PNG")[:60]
    path = write_folder(tmp_path / "faces", files)
    message = user_error(root, "2 images cannot be used, remove or replace them: ",
                         str(path / "faces/Train/calm/zy.png") + ": cannot decode the image (",
                         " | " + str(path / "faces/Train/calm/zz.jpg") + ": cannot decode the image (not an image "
                         "format Pillow reads", call=lambda: prepare("imagefolder", path, data_root=root))
    assert "BytesIO" not in message and "remove or replace the file" not in message
    for i in range(6):  # beyond five, the rest by name
        files[f"faces/Train/calm/zx{i}.jpg"] = b"junk"
    path = write_folder(tmp_path / "more", files)
    message = user_error(root, "8 images cannot be used", call=lambda: prepare("imagefolder", path, data_root=root))
    assert message.count("cannot decode the image") == 5 and all(f"zx{i}.jpg" in message for i in range(6))


def test_fer2013_wrong_image_size(tmp_path, root):
    files = fer_files()
    files["train/happy/Training_big.jpg"] = jpeg(3, side=64)
    path = write_zip(tmp_path / "fer2013.zip", files)
    user_error(root, f"{path}/train/happy/Training_big.jpg", "image is 64x64", "48x48",
               call=lambda: prepare("fer2013", path, data_root=root))


def test_csv_missing_column(tmp_path, root):
    path = tmp_path / "fer2013.csv"
    path.write_text("emotion,pixels\n0," + " ".join(["0"] * 2304) + "\n")
    user_error(root, str(path), "missing column(s) Usage", call=lambda: prepare("fer2013", path, data_root=root))


def test_csv_pixel_string_of_wrong_length(tmp_path, root):
    rows = [(0, np.zeros((48, 48), int), "Training")] * 3
    text = fer_csv_text(rows).splitlines()
    text[2] = text[2].replace(" 0,Training", ",Training")  # line 3: one value short
    path = tmp_path / "fer2013.csv"
    path.write_text("\n".join(text) + "\n")
    user_error(root, f"{path} line 3", "2303 pixel values, expected 2304",
               call=lambda: prepare("fer2013", path, data_root=root))


def test_csv_label_out_of_range(tmp_path, root):
    path = tmp_path / "fer2013.csv"
    path.write_text(fer_csv_text([(0, np.zeros((48, 48), int), "Training"), (7, np.ones((48, 48), int), "PublicTest")]))
    user_error(root, f"{path} line 3", "label 7 is out of range 0..6",
               call=lambda: prepare("fer2013", path, data_root=root))


def test_rafdb_label_out_of_range(tmp_path, root):
    files, _ = raf_official_files("basic/")
    label_file = "basic/EmoLabel/list_patition_label.txt"
    lines = files[label_file].decode().split("\n")
    lines[1] = lines[1].split()[0] + " 8"
    files[label_file] = "\n".join(lines).encode()
    path = write_zip(tmp_path / "rafdb.zip", files)
    user_error(root, f"{path}/{label_file} line 2", "label 8 is out of range 1..7",
               call=lambda: prepare("rafdb", path, data_root=root))


def test_rafdb_missing_image(tmp_path, root):
    files, _ = raf_official_files()
    del files["Image/aligned/test_0003_aligned.jpg"]
    path = write_folder(tmp_path / "raf", files)
    user_error(root, "list_patition_label.txt line 73", "test_0003_aligned.jpg is missing",
               call=lambda: prepare("rafdb", path, data_root=root))


def test_rafdb_image_without_a_label(tmp_path, root):
    files, _ = raf_official_files()
    label_file = "EmoLabel/list_patition_label.txt"
    lines = files[label_file].decode().split("\n")
    files[label_file] = "\n".join(line for line in lines if not line.startswith("test_0003.jpg")).encode()
    path = write_folder(tmp_path / "raf", files)
    user_error(root, "test_0003_aligned.jpg: not in", "list_patition_label.txt", "add its line or remove it",
               call=lambda: prepare("rafdb", path, data_root=root))


def test_empty_split(tmp_path, root):
    files = {m: d for m, d in fer_files().items() if "PrivateTest" not in m}
    path = write_zip(tmp_path / "fer2013.zip", files)
    user_error(root, str(path), "no test images found", call=lambda: prepare("fer2013", path, data_root=root))


def test_fer2013_without_its_test_folder_names_both_missing_splits(tmp_path, root):
    files = {m: d for m, d in fer_files().items() if "Test" not in m}
    path = write_zip(tmp_path / "fer2013.zip", files)
    user_error(root, str(path), "no val or test images found", call=lambda: prepare("fer2013", path, data_root=root))


def test_a_val_fraction_that_empties_train_says_so(tmp_path, root):
    path = write_zip(tmp_path / "myfaces.zip", imagefolder_files())
    user_error(root, str(path), "--val-fraction 0.99 left none for train: lower it",
               call=lambda: prepare("imagefolder", path, data_root=root, val_fraction=0.99))


def test_imagefolder_without_test_folder_slices_test_then_val_from_train(tmp_path, root):
    path = write_folder(tmp_path / "faces", imagefolder_files(("train",)))
    ds = prepare("imagefolder", path, data_root=root, test_fraction=0.25, val_fraction=0.34, seed=3, log=lambda _: None)
    counts = ds.meta["counts"]
    # 4 per class: a quarter to test, then a third of the 3 left to val.
    assert all((counts["train"][c], counts["val"][c], counts["test"][c]) == (2, 1, 1) for c in CLASSES)
    assert ds.meta["test_from"] == "stratified 25% of train (seed 3)" and ds.meta["test_fraction"] == 0.25
    assert ds.meta["val_from"] == "stratified 34% of train (seed 3)"
    assert "test: stratified 25% of train (seed 3)" in describe(ds.meta)
    again = prepare("imagefolder", path, name="again", data_root=root, test_fraction=0.25, val_fraction=0.34, seed=3,
                    log=lambda _: None)
    assert np.array_equal(again.images, ds.images) and np.array_equal(again.split, ds.split)


@pytest.mark.parametrize("form", ["folder", "zip"])
def test_imagefolder_of_class_folders_alone(tmp_path, root, form):
    """`<class>/<image>` with no split folders: all train, test and val sliced from it."""
    files = {  # 8 per class: faces/Anger/Train-img0.png, ...
        re.sub(r"faces/(\w+)/(\w+)/", r"faces/\2/\1-", m): d for m, d in imagefolder_files().items()
    }
    path = (write_zip(tmp_path / "jaffe.zip", files) if form == "zip" else write_folder(tmp_path / "jaffe", files))
    ds = prepare("imagefolder", path, data_root=root, test_fraction=0.5, val_fraction=0.25, log=lambda _: None)
    counts = ds.meta["counts"]
    # Test first (4 of 8), then val from the 4 left (1); val first would give 3 / 2 / 3.
    assert all((counts["train"][c], counts["val"][c], counts["test"][c]) == (3, 1, 4) for c in CLASSES)
    assert ds.name == "jaffe" and ds.meta["source"]["layout"] == "class folders, no split folders"


def test_imagefolder_leaves_out_contempt_and_says_so(tmp_path, root):
    """CK+ and AffectNet have classes no FER-2013 model has: their images are left out, counted."""
    files = imagefolder_files()
    files.update({m.replace("/calm/", "/Contempt/"): d for m, d in files.items() if "/calm/" in m})
    files["faces/Train/non-face/x.png"] = files["faces/Train/calm/img0.png"]
    path = write_zip(tmp_path / "ckplus.zip", files)
    ds = prepare("imagefolder", path, data_root=root, log=lambda _: None)
    assert sum(sum(c.values()) for c in ds.meta["counts"].values()) == 7 * 8 == len(ds.labels)
    assert ds.meta["left_out"] == {"contempt": 8, "non-face": 1}
    assert "left out, not among the 7 classes: 8 images of contempt, 1 image of non-face" in describe(ds.meta)
    assert "left_out" not in prepare("imagefolder", write_zip(tmp_path / "plain.zip", imagefolder_files()),
                                     data_root=root, log=lambda _: None).meta


def test_imagefolder_of_class_folders_names_every_unknown_one(tmp_path, root):
    files = {m.replace("faces/Train/", ""): d for m, d in imagefolder_files(("Train",)).items()}
    files["Smirk/img0.png"] = files["Wink/img0.png"] = files["Wink/img1.png"] = files["calm/img0.png"]
    path = write_folder(tmp_path / "faces", files)
    user_error(root, "unknown class folders ", "'Smirk'", "'Wink'", "rename them to one of: angry/",
               call=lambda: prepare("imagefolder", path, data_root=root))


def class_tree(per_class: int = 8, small: dict | None = None) -> dict[str, bytes]:
    """`faces/<class>/<image>` with `per_class` images a class (`small`: fewer for some classes)."""
    small = small or {}
    return {f"faces/{c}/img{i}.png": encode(noise(100 * k + i), "PNG")
            for k, c in enumerate(CLASSES) for i in range(small.get(c, per_class))}


def test_a_class_too_small_to_slice_from_is_named(tmp_path, root):
    path = write_folder(tmp_path / "faces", class_tree(small={"fear": 2}))
    user_error(root, "fear (2 images): too few to slice test and val from and keep some for train",
               call=lambda: prepare("imagefolder", path, data_root=root))


@pytest.mark.parametrize("stray, shape", [
    ("faces/happy/S010/x.png", "<class>/<image>"),  # CK+'s per-subject folders inside a class folder
    ("faces/cover.png", "<class>/<image>"),
])
def test_images_outside_the_layout_are_not_dropped_silently(tmp_path, root, stray, shape):
    files = class_tree()
    files[stray] = files["faces/happy/img0.png"]
    path = write_zip(tmp_path / "faces.zip", files)
    user_error(root, f"{path}/{stray}: not laid out as {shape} (1 image(s) like it)",
               call=lambda: prepare("imagefolder", path, data_root=root))
    files = imagefolder_files()
    files["faces/Train/x.png"] = files["faces/Train/calm/img0.png"]  # no class folder
    path = write_zip(tmp_path / "split.zip", files)
    user_error(root, f"{path}/faces/Train/x.png: not laid out as <split>/<class>/<image>",
               call=lambda: prepare("imagefolder", path, data_root=root))


def test_training_and_testing_split_folders(tmp_path, root):
    path = write_folder(tmp_path / "faces", imagefolder_files(("training", "Testing")))
    ds = prepare("imagefolder", path, data_root=root, log=lambda _: None)
    assert ds.meta["test_from"] == "test folder" and all(ds.meta["counts"]["test"][c] == 4 for c in CLASSES)


def test_only_classes_outside_the_seven(tmp_path, root):
    path = write_folder(tmp_path / "faces", {"faces/contempt/a.png": encode(noise(1), "PNG")})
    user_error(root, "no train or val or test images found", "(left out, not among the 7 classes: 1 image of contempt)",
               call=lambda: prepare("imagefolder", path, data_root=root))


def test_fractions_that_empty_train_name_both_flags(tmp_path, root):
    path = write_folder(tmp_path / "faces", imagefolder_files(("train",)))
    user_error(root, "--test-fraction 0.5 and --val-fraction 0.9 left none for train: lower them",
               call=lambda: prepare("imagefolder", path, data_root=root, test_fraction=0.5, val_fraction=0.9))


@pytest.mark.parametrize("kind", ["zip", "folder"])
def test_empty_source(tmp_path, root, kind):
    if kind == "zip":
        path = write_zip(tmp_path / "fer2013.zip", {})
    else:
        path = tmp_path / "empty"
        path.mkdir()
    user_error(root, str(path), f"the {'archive' if kind == 'zip' else 'folder'} is empty",
               call=lambda: prepare("fer2013", path, data_root=root))


def test_corrupt_zip(tmp_path, root):
    path = tmp_path / "rafdb.zip"
    path.write_bytes(b"PK\x03\x04 this is not really a zip")
    user_error(root, str(path), "not a readable zip archive", call=lambda: prepare("rafdb", path, data_root=root))


@pytest.mark.parametrize("kwargs, fragment", [
    ({"name": "../escape"}, "--name '../escape'"),
    ({"size": 0}, "--size 0"),
    ({"size": 100_000}, "--size 100000: must be 1 to 1024 pixels"),
    ({"val_fraction": 1.0}, "--val-fraction 1.0"),
    ({"test_fraction": 0.0}, "--test-fraction 0.0: must lie strictly between 0 and 1"),
])
def test_bad_options(fer_zip, root, kwargs, fragment):
    user_error(root, fragment, call=lambda: prepare("fer2013", fer_zip, data_root=root, **kwargs))


def test_unknown_source(fer_zip, root):
    user_error(root, "unknown source 'affectnet'", "fer2013, rafdb, imagefolder",
               call=lambda: prepare("affectnet", fer_zip, data_root=root))


@pytest.mark.parametrize("file", ["labels.npy", "images.npy", "train_copy.npy"])
def test_altered_dataset_is_refused(fer_zip, root, file):
    prepare("fer2013", fer_zip, data_root=root, log=lambda _: None)
    target = root / "fer2013" / file
    data = bytearray(target.read_bytes())
    data[-1] ^= 1
    target.write_bytes(bytes(data))
    with pytest.raises(UserError) as info:
        load("fer2013", data_root=root)
    message = str(info.value)
    assert f"{target}: does not match its sha256 in meta.json" in message and "\n" not in message
    assert f"re-run `fer-tune data prepare fer2013 {fer_zip} --data-root {root}`" in message
    assert len(load("fer2013", data_root=root, verify=False)) == 54


def test_old_format_is_refused(fer_zip, root):
    prepare("fer2013", fer_zip, data_root=root, log=lambda _: None)
    meta_file = root / "fer2013" / "meta.json"
    meta_file.write_text(meta_file.read_text().replace('"format_version": 1', '"format_version": 0'))
    with pytest.raises(UserError, match="prepared with format version 0, this fer-tune reads 1; re-run"):
        load("fer2013", data_root=root)


# ---------------------------------------------------------------------------------------------
# Atomic writes


def test_failed_prepare_keeps_the_old_dataset(fer_zip, tmp_path, root):
    old = prepare("fer2013", fer_zip, data_root=root, log=lambda _: None)
    files = fer_files()
    files["train/sad/Training_bad.jpg"] = b"\xff\xd8 broken"
    broken = write_zip(tmp_path / "broken.zip", files)
    with pytest.raises(UserError):
        prepare("fer2013", broken, data_root=root)
    assert sorted(p.name for p in root.iterdir()) == ["fer2013"]
    assert load("fer2013", data_root=root).meta == old.meta


def test_interrupted_write_leaves_nothing(fer_zip, root, monkeypatch):
    def interrupt(path):
        raise KeyboardInterrupt

    old = prepare("fer2013", fer_zip, data_root=root, log=lambda _: None)
    monkeypatch.setattr(prepared_module, "file_sha256", interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare("fer2013", fer_zip, data_root=root, rgb=True, log=lambda _: None)
    with pytest.raises(KeyboardInterrupt):
        prepare("fer2013", fer_zip, name="new", data_root=root, log=lambda _: None)
    monkeypatch.undo()
    assert sorted(p.name for p in root.iterdir()) == ["fer2013"]
    assert load("fer2013", data_root=root).meta == old.meta


def test_replacing_a_dataset(fer_zip, root):
    said = []
    prepare("fer2013", fer_zip, data_root=root, log=said.append)
    assert not [line for line in said if "replaced" in line]
    new = prepare("fer2013", fer_zip, data_root=root, rgb=True, log=said.append)
    assert said[-1] == f"replaced the earlier fer2013 (prepared from {fer_zip.resolve()})"
    assert sorted(p.name for p in root.iterdir()) == ["fer2013"]
    assert new.image_shape == (3, 48, 48)
    meta = json.loads((root / "fer2013" / "meta.json").read_text())
    assert meta["image_shape"] == [3, 48, 48]
    assert load("fer2013", data_root=root).image_shape == (3, 48, 48)
