"""Device, precision and input conversion shared by training and inference."""

from __future__ import annotations

import contextlib
from functools import lru_cache

import torch


def pick_device(requested: str | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


def predict_logits(model: torch.nn.Module, images: torch.Tensor, *, mean: float, std: float,
                   batch_size: int = 512, precision: str = "fp32", channels_last: bool = True,
                   flip_tta: bool = False) -> torch.Tensor:
    """Float32 logits for uint8 images (N, C, H, W) already on the model's device (eval mode).

    `flip_tta` averages the logits of each image and its horizontal mirror.
    """
    plain, mirrored = predict_views(model, images, mean=mean, std=std, batch_size=batch_size,
                                    precision=precision, channels_last=channels_last, mirror=flip_tta)
    return plain if mirrored is None else (plain + mirrored) / 2


@torch.no_grad()
def predict_views(model: torch.nn.Module, images: torch.Tensor, *, mean: float, std: float,
                  batch_size: int = 512, precision: str = "fp32", channels_last: bool = True,
                  mirror: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float32 logits of the images as they are and, with `mirror`, of their horizontal mirrors
    (else None): one pass over the images, each view scored once."""
    was_training = model.training
    model.eval()
    device = images.device
    plain, mirrored = [], []
    for start in range(0, len(images), batch_size):
        x = to_input(images[start:start + batch_size], mean, std, channels_last)
        with autocast(device, precision):
            plain.append(model(x).float())
            if mirror:
                mirrored.append(model(x.flip(3)).float())
    model.train(was_training)
    cat = lambda parts: torch.cat(parts) if parts else torch.empty(0)  # noqa: E731
    return cat(plain), (cat(mirrored) if mirror else None)
