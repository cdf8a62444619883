"""The one training loop and what it needs: config, augmentation, metrics, reporters, checkpoints."""

from fer_tune.train.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from fer_tune.train.config import TrainConfig
from fer_tune.train.loop import FitResult, TrainData, TrainingDiverged, fit
from fer_tune.train.metrics import classification_scores, confusion_matrix, scores_from_confusion
from fer_tune.train.report import MemoryReporter, Reporter, RunFolderReporter

__all__ = [
    "FitResult", "MemoryReporter", "Reporter", "RunFolderReporter", "TrainConfig", "TrainData",
    "TrainingDiverged", "classification_scores", "confusion_matrix", "fit", "load_checkpoint",
    "model_from_checkpoint", "save_checkpoint", "scores_from_confusion",
]
