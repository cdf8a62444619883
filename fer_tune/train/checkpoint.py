"""Checkpoints: one dict of tensors and plain values, saved atomically, loaded with weights_only=True."""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import torch

from fer_tune.data.decode import IMAGE_SUFFIXES
from fer_tune.errors import UserError


def save_checkpoint(state: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by `save_checkpoint`; never unpickles arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a text file, a zip that is no torch file, a truncated file ...: torch raises all
        # sorts, and its message advises weights_only=False, which is not for a file from anywhere.
        objects = isinstance(exc, pickle.UnpicklingError) and "not an allowed global" in str(exc)
        what = "a .pt file written by fer-tune train or retrain, such as results/train/<run>/best.pt"
        if path.suffix.lower() in IMAGE_SUFFIXES:
            what += "; the checkpoint comes before the images"
        detail = "it holds Python objects besides tensors and plain values, which fer-tune does not unpickle; " \
            if objects else ""
        raise UserError(f"{path}: not a readable fer-tune checkpoint ({detail}expected {what})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise UserError(f"{path}: not a fer-tune checkpoint (expected weights and config)")
    return state


def model_from_checkpoint(state: dict, device: str | torch.device = "cpu"):
    """Rebuild the model of a checkpoint with its weights; returns (model, TrainConfig)."""
    from fer_tune.models import create_model
    from fer_tune.train.config import TrainConfig

    cfg = TrainConfig.from_dict(state["config"], source="checkpoint config")
    model = create_model(cfg.model, num_classes=len(state["classes"]), in_chans=state["in_chans"],
                         dropout=cfg.dropout, img_size=state["img_size"], **cfg.model_kwargs)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg
