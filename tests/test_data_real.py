"""The data layer on the real archives in ../shared/datasets (figures from its SOURCES.md)."""

import zipfile

import numpy as np
import pytest

from fer_tune.data import CLASSES, prepare

from conftest import SHARED_DATASETS as DATASETS

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not DATASETS.is_dir(), reason=f"{DATASETS} is absent"),
]

FER_SHA256 = "1df4f19d1156864bff00aedf0ed980a0c87374bca2f66e61442555b0ab1c0815"
FER_TRAIN = {"angry": 3995, "disgust": 436, "fear": 4097, "happy": 7215, "sad": 4830, "surprise": 3171, "neutral": 4965}
FER_TEST = {"angry": 958, "disgust": 111, "fear": 1024, "happy": 1774, "sad": 1247, "surprise": 831, "neutral": 1233}

RAF_SHA256 = "1ce299a7ecbe5c293c38aab600133f8f04abb5c32c1c1dd7d4d88e1a0b03d33f"
RAF_CONTENT_DIGEST = "bd812f1d50be45b2e9c581ea7598269b2f242f3b60602e63cf06144b7930e3eb"
# RAF-DB labels 1..7 (surprise, fear, disgust, happiness, sadness, anger, neutral), in canonical names.
RAF_TRAIN = {"surprise": 1290, "fear": 281, "disgust": 717, "happy": 4772, "sad": 1982, "angry": 705, "neutral": 2524}
RAF_TEST = {"surprise": 329, "fear": 74, "disgust": 160, "happy": 1185, "sad": 478, "angry": 162, "neutral": 680}


@pytest.fixture
def root(real_data_root):
    return real_data_root


@pytest.fixture
def fer(real_fer):
    return real_fer


@pytest.fixture
def raf(real_rafdb):
    return real_rafdb


def class_counts(ds, *splits):
    labels = np.concatenate([ds.arrays(s)[1] for s in splits])
    return dict(zip(CLASSES, np.bincount(labels, minlength=len(CLASSES)).tolist()))


def test_fer2013_counts(fer):
    assert fer.sha256 == FER_SHA256
    assert fer.image_shape == (1, 48, 48)
    assert [len(fer.indices(s)) for s in ("train", "val", "test")] == [28709, 3589, 3589]
    assert class_counts(fer, "train") == FER_TRAIN
    assert class_counts(fer, "val", "test") == FER_TEST


def test_fer2013_duplicates(fer):
    d = fer.meta["duplicates"]
    assert (d["groups"], d["files"], d["redundant_copies"]) == (1516, 3369, 1853)
    assert d["conflicting_label_groups"] == 57
    assert d["groups_within_split"]["train"] == 936
    across = d["groups_across_splits"]
    with_train = across["train+val"] + across["train+test"] + across["train+val+test"]
    assert with_train == 531
    assert d["groups_within_split"]["val"] + d["groups_within_split"]["test"] + across["val+test"] == 49
    assert d["copies_in_train"]["val"] + d["copies_in_train"]["test"] == 568
    assert fer.train_copy.sum() == 568 and not fer.train_copy[fer.indices("train")].any()


def test_rafdb_counts(raf):
    assert raf.sha256 == RAF_SHA256
    assert raf.image_shape == (1, 48, 48)
    assert len(raf.indices("train")) + len(raf.indices("val")) == 12271
    assert len(raf.indices("test")) == 3068
    assert class_counts(raf, "train", "val") == RAF_TRAIN
    assert class_counts(raf, "test") == RAF_TEST
    assert abs(len(raf.indices("val")) - 1227) <= 7  # 10 % of each class, rounded per class
    d = raf.meta["duplicates"]
    assert (d["groups"], d["files"], d["conflicting_label_groups"]) == (3, 6, 0)


def test_rafdb_extracted_folder_matches_zip(raf, root, tmp_path):
    with zipfile.ZipFile(DATASETS / "rafdb.zip") as z:
        z.extractall(tmp_path / "rafdb")
    ds = prepare("rafdb", tmp_path / "rafdb", name="rafdb-folder", data_root=root, log=lambda _: None)
    assert ds.sha256 == RAF_CONTENT_DIGEST
    assert np.array_equal(ds.images, raf.images)
    assert np.array_equal(ds.labels, raf.labels) and np.array_equal(ds.split, raf.split)
