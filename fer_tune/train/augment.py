"""Batched on-device augmentation, scaled by one `aug_strength` knob in [0, 1].

Everything runs on whole batches of float images (B, C, H, W) in [0, 1] on the training device:
one affine warp (flip, shift, scale, rotation, shear composed into a single 2x3 matrix and applied
with one `grid_sample`), brightness/contrast, and random erasing (a box of one random gray level). Mixup and cutmix act on the batch
and its targets and have their own knobs. All randomness comes from the caller's generator, so a
seeded run is reproducible.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# What aug_strength = 1 means; every range shrinks linearly to "no change" at 0.
MAX_ROTATE_DEG = 20.0
MAX_SHIFT = 0.12  # fraction of the image side
MAX_SCALE = 0.20  # zoom in [1 - s, 1 + s]
MAX_SHEAR_DEG = 10.0
MAX_BRIGHTNESS = 0.25  # additive, images in [0, 1]
MAX_CONTRAST = 0.35  # multiplicative around the image mean, in [1 - c, 1 + c]
MAX_ERASE_PROB = 0.5
ERASE_AREA = (0.02, 0.25)


def _uniform(shape, low, high, generator, device):
    return low + (high - low) * torch.rand(shape, generator=generator, device=device)


def affine_matrices(batch: int, strength: float, generator: torch.Generator, device) -> torch.Tensor:
    """Random (B, 2, 3) matrices for `F.affine_grid`: horizontal flip with p = 0.5, then scale,
    rotation, shear and shift, each drawn uniformly within `strength` times its maximum."""
    s = strength
    flip = torch.where(torch.rand(batch, generator=generator, device=device) < 0.5, -1.0, 1.0)
    angle = _uniform(batch, -1, 1, generator, device) * math.radians(MAX_ROTATE_DEG * s)
    shear = _uniform(batch, -1, 1, generator, device) * math.radians(MAX_SHEAR_DEG * s)
    zoom = 1.0 + _uniform(batch, -1, 1, generator, device) * MAX_SCALE * s
    shift = _uniform((batch, 2), -1, 1, generator, device) * (2 * MAX_SHIFT * s)  # grid units span 2
    cos, sin, tan = torch.cos(angle), torch.sin(angle), torch.tan(shear)
    # Output pixel -> input sample location: rotate . shear . (1/zoom) . flip
    a = cos / zoom
    b = (cos * tan - sin) / zoom
    c = sin / zoom
    d = (sin * tan + cos) / zoom
    theta = torch.stack(
        [torch.stack([a * flip, b, shift[:, 0]], 1), torch.stack([c * flip, d, shift[:, 1]], 1)], 1
    )
    return theta


def augment(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Augment a float batch (B, C, H, W) in [0, 1]. `strength` = 0 returns `x` unchanged."""
    if strength <= 0:
        return x
    B, C, H, W = x.shape
    dev = x.device
    theta = affine_matrices(B, strength, generator, dev).to(x.dtype)
    grid = F.affine_grid(theta, (B, C, H, W), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    contrast = 1.0 + _uniform((B, 1, 1, 1), -1, 1, generator, dev) * MAX_CONTRAST * strength
    brightness = _uniform((B, 1, 1, 1), -1, 1, generator, dev) * MAX_BRIGHTNESS * strength
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean + brightness).clamp_(0.0, 1.0)

    return random_erase(x, MAX_ERASE_PROB * strength, generator)


def random_erase(x: torch.Tensor, prob: float, generator: torch.Generator) -> torch.Tensor:
    """Fill one random rectangle per chosen image (probability `prob`) with a random gray level."""
    B, C, H, W = x.shape
    dev = x.device
    area = _uniform(B, *ERASE_AREA, generator, dev) * H * W
    log_ratio = _uniform(B, math.log(0.3), math.log(1 / 0.3), generator, dev)
    h = (area * log_ratio.exp()).sqrt().clamp(1, H)
    w = (area / log_ratio.exp()).sqrt().clamp(1, W)
    top = _uniform(B, 0, 1, generator, dev) * (H - h)
    left = _uniform(B, 0, 1, generator, dev) * (W - w)
    chosen = torch.rand(B, generator=generator, device=dev) < prob
    rows = torch.arange(H, device=dev).view(1, H, 1)
    cols = torch.arange(W, device=dev).view(1, 1, W)
    mask = (
        (rows >= top.view(B, 1, 1)) & (rows < (top + h).view(B, 1, 1))
        & (cols >= left.view(B, 1, 1)) & (cols < (left + w).view(B, 1, 1))
        & chosen.view(B, 1, 1)
    ).unsqueeze(1)
    fill = torch.rand((B, 1, 1, 1), generator=generator, device=dev, dtype=x.dtype)
    return torch.where(mask, fill, x)


def mix_batch(
    x: torch.Tensor, targets: torch.Tensor, mixup: float, cutmix: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or cutmix (one of the enabled ones, chosen per batch) on images and one-hot/soft targets.

    Returns the mixed batch and mixed soft targets (B, num_classes). With both knobs at 0 the
    inputs come back unchanged.
    """
    enabled = [(kind, alpha) for kind, alpha in (("mixup", mixup), ("cutmix", cutmix)) if alpha > 0]
    if not enabled:
        return x, targets
    pick = int(torch.randint(len(enabled), (1,), generator=generator, device=x.device).item())
    kind, alpha = enabled[pick]
    lam = _sample_beta(alpha, generator)
    perm = torch.randperm(x.shape[0], generator=generator, device=x.device)
    if kind == "mixup":
        mixed = lam * x + (1 - lam) * x[perm]
    else:
        B, C, H, W = x.shape
        cut = math.sqrt(1 - lam)
        h, w = int(H * cut), int(W * cut)
        cy = int(torch.randint(H, (1,), generator=generator, device=x.device).item())
        cx = int(torch.randint(W, (1,), generator=generator, device=x.device).item())
        y0, y1 = max(cy - h // 2, 0), min(cy + h // 2, H)
        x0, x1 = max(cx - w // 2, 0), min(cx + w // 2, W)
        mixed = x.clone()
        mixed[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)
    return mixed, lam * targets + (1 - lam) * targets[perm]


def _sample_beta(alpha: float, generator: torch.Generator) -> float:
    """One Beta(alpha, alpha) draw, seeded from `generator` (torch's Beta takes no generator)."""
    seed = int(torch.randint(2**31 - 1, (1,), generator=generator, device=generator.device).item())
    return float(np.random.default_rng(seed).beta(alpha, alpha))
