"""Device, precision and input conversion shared by training and inference."""

from __future__ import annotations

import contextlib
from functools import lru_cache

import torch
import torch.nn.functional as F

from fer_tune.errors import UserError


def pick_device(requested: str | torch.device | None = None) -> torch.device:
    """The torch device asked for (--device), checked before any work starts; else CUDA when present."""
    if not requested:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {requested}: not a device fer-tune trains on; use cpu, cuda or cuda:N")
    if device.type == "cpu":
        return torch.device("cpu")  # cpu:0 is the same device; one spelling keeps the CPU notes right
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"--device {requested}: no CUDA GPU is usable here (torch.cuda.is_available() is "
                            "False); leave --device out or use cpu")
        if device.index is not None and device.index >= count:
            raise UserError(f"--device {requested}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    return device


@lru_cache(maxsize=None)
def cpu_has_bf16() -> bool:
    """True when this CPU computes bf16 natively (AVX-512 BF16 or AMX), where autocast pays off."""
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if probe is not None and probe():
        return True
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(amx is not None and amx())


def resolve_precision(requested: str, device: torch.device) -> str:
    """'auto' -> bf16 on CUDA with bf16 and on bf16-capable CPUs, fp16 on older GPUs, else fp32."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_input(x_uint8: torch.Tensor, mean: float, std: float, channels_last: bool) -> torch.Tensor:
    """uint8 (B, C, H, W) -> normalized float input in the model's memory format."""
    x = x_uint8.float().div_(255.0)
    return normalize(x, mean, std, channels_last)


def normalize(x01: torch.Tensor, mean: float, std: float, channels_last: bool) -> torch.Tensor:
    x = (x01 - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# Test-time augmentation: "flip" averages the logits of each image and its mirror; "crops" also
# those of the image shifted by one pixel each way and zoomed in and out by 8 % (warped as training's
# augmentation warps, so every view is one training could have drawn), each with its mirror.
TTA_MODES = ("none", "flip", "crops")
CROP_SHIFT_PX = 1
CROP_ZOOMS = (1.08, 0.93)


def tta_mode(tta: bool | str | None) -> str:
    """'none', 'flip' or 'crops', from a mode name or a yes/no (yes = flip)."""
    if tta in (None, False):
        return "none"
    if tta is True:
        return "flip"
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
    return tta


def applied_tta(tta: bool | str | None) -> str | None:
    """The TTA mode to apply, "flip" or "crops", or None for none (for code that asks `if tta`)."""
    mode = tta_mode(tta)
    return None if mode == "none" else mode


def tta_description(tta: bool | str | None) -> str:
    """How a TTA mode is written in metrics.json and reports."""
    return {"none": "none", "flip": "horizontal flip",
            "crops": f"horizontal flip x (the image, {CROP_SHIFT_PX}-pixel shifts up/down/left/right, zoom "
                     f"{'/'.join(f'{z:g}' for z in CROP_ZOOMS)}): {2 * (5 + len(CROP_ZOOMS))} views"}[tta_mode(tta)]


def tta_mode_described(description: str) -> str:
    """The TTA mode whose `tta_description` this is (metrics.json keeps the description)."""
    modes = [mode for mode in TTA_MODES if tta_description(mode) == description]
    if not modes:
        raise ValueError(f"not a description of a TTA mode: {description!r}")
    return modes[0]


def tta_views(x: torch.Tensor, tta: bool | str | None) -> list[torch.Tensor]:
    """The views of a batch of model inputs (B, C, H, W) that TTA averages over; the batch itself first."""
    mode = tta_mode(tta)
    views = [x]
    if mode == "crops":
        b, _, h, w = x.shape
        px = CROP_SHIFT_PX
        warps = [(1.0, 2 * dx / w, 2 * dy / h) for dx, dy in ((px, 0), (-px, 0), (0, px), (0, -px))]
        warps += [(1 / zoom, 0.0, 0.0) for zoom in CROP_ZOOMS]
        for scale, tx, ty in warps:
            theta = torch.tensor([[scale, 0.0, tx], [0.0, scale, ty]], dtype=x.dtype, device=x.device)
            grid = F.affine_grid(theta.expand(b, 2, 3), list(x.shape), align_corners=False)
            view = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
            views.append(view.contiguous(memory_format=torch.channels_last)
                         if x.is_contiguous(memory_format=torch.channels_last) else view)
    if mode != "none":
        views += [v.flip(3) for v in views]
    return views


def predict_logits(model: torch.nn.Module, images: torch.Tensor, *, mean: float, std: float,
                   batch_size: int = 512, precision: str = "fp32", channels_last: bool = True,
                   tta: bool | str | None = None) -> torch.Tensor:
    """Float32 logits for uint8 images (N, C, H, W) already on the model's device (eval mode);
    with `tta` ("flip", "crops"; True = "flip") the mean logits over each image's views."""
    plain, averaged = predict_views(model, images, mean=mean, std=std, batch_size=batch_size,
                                    precision=precision, channels_last=channels_last, tta=tta)
    return plain if averaged is None else averaged


@torch.no_grad()
def predict_views(model: torch.nn.Module, images: torch.Tensor, *, mean: float, std: float,
                  batch_size: int = 512, precision: str = "fp32", channels_last: bool = True,
                  tta: bool | str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float32 logits of the images as they are and, with `tta`, the mean logits over their TTA
    views (else None): one pass over the images, each view scored once."""
    views_of = tta_mode(tta)
    was_training = model.training
    model.eval()
    device = images.device
    plain, averaged = [], []
    for start in range(0, len(images), batch_size):
        x = to_input(images[start:start + batch_size], mean, std, channels_last)
        with autocast(device, precision):
            logits = [model(view).float() for view in tta_views(x, views_of)]
        plain.append(logits[0])
        if views_of != "none":
            averaged.append(torch.stack(logits).mean(0))
    model.train(was_training)
    cat = lambda parts: torch.cat(parts) if parts else torch.empty(0)  # noqa: E731
    return cat(plain), (cat(averaged) if views_of != "none" else None)
