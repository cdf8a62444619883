"""Datasets: prepare FER-2013, RAF-DB or an image-folder tree once into uint8 arrays, then load them.

    ds = prepare("fer2013", "~/Downloads/fer2013.zip")   # writes <data_root>/fer2013/
    ds = load("fer2013")                                 # memory-mapped, checksums verified
    x, y = ds.arrays("train")
"""

from fer_tune.data.classes import CLASSES
from fer_tune.data.prepared import PreparedDataset, default_data_root, describe, list_prepared, load, prepare
from fer_tune.data.splits import SPLITS, stratified_indices

__all__ = [
    "CLASSES", "SPLITS", "PreparedDataset", "default_data_root", "describe", "list_prepared", "load", "prepare",
    "stratified_indices",
]
