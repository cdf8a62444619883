"""`timm/<name>`: any timm model, built by `timm.create_model` for our input and classes.

timm is imported on first use (it takes seconds), so the built-ins do not pay for it.
"""

from __future__ import annotations

import difflib
import inspect
import os
import re

import torch
from torch import nn

from fer_tune.errors import UserError
from fer_tune.models.registry import brief, weights_file


def create_timm_model(
    name: str,
    num_classes: int = 7,
    in_chans: int = 1,
    dropout: float = 0.0,
    img_size: int = 48,
    pretrained: str | os.PathLike | bool | None = None,
    **kw,
) -> nn.Module:
    """`timm.create_model(name, num_classes=, in_chans=, drop_rate=dropout, **kw)`.

    `pretrained`: None/False for random init; a path to a local weights file (.pth/.bin/.safetensors,
    e.g. an ImageNet checkpoint with 3 input channels and a 1000-class head), loaded by timm's own
    `load_pretrained`: it adapts the first conv to `in_chans` (for 1 channel, the sum over the RGB
    weights) and drops the classifier when `num_classes` differs from the model's pretrained config
    (1000 for ImageNet models, also for a checkpoint that already has another head); True downloads
    the hub weights (only ever on request).

    `img_size` is passed on only to models with a fixed input size (ViTs and the like). Other models
    take any size, but most downsample 32x: resnet18 turns 48x48 into a 2x2 feature map.
    """
    import timm
    from timm.models import get_pretrained_cfg

    _check_name(name, timm)
    cfg = get_pretrained_cfg(name)
    if cfg is not None and cfg.fixed_input_size:
        kw.setdefault("img_size", img_size)
    if pretrained is True:
        load = dict(pretrained=True)
    elif pretrained:
        load = dict(pretrained=True, pretrained_cfg_overlay=dict(file=weights_file(pretrained)))
    else:
        load = dict(pretrained=False)
    try:
        return timm.create_model(name, num_classes=num_classes, in_chans=in_chans, drop_rate=dropout, **load, **kw)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        raise UserError(f"timm/{name}: {e}; {_accepted_args(name, timm)}") from e
    except Exception as e:
        if pretrained is True:
            raise UserError(f"cannot get the hub weights of timm/{name} ({brief(e)}); "
                            f"pass pretrained=<path to a local weights file> instead") from e
        if pretrained:
            raise UserError(f"cannot load pretrained weights {pretrained} into timm/{name}: {brief(e)}") from e
        raise


def _check_name(name: str, timm) -> None:
    if ":" in name:
        raise UserError(f"timm/{name}: only timm registry names are supported (no hf-hub: or local-dir: "
                        f"sources); give local weights with pretrained=PATH")
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3)
    stem = re.match(r"[A-Za-z]*", name).group() or name
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise UserError(f"unknown timm model {name!r}; {hint}list names with timm.list_models(\"*{stem}*\")")


def _accepted_args(name: str, timm) -> str:
    """The keyword arguments of the model class behind a timm name (built on the meta device: free)."""
    try:
        with torch.device("meta"):
            cls = type(timm.create_model(name))
    except Exception:
        return "see the model's class in timm for its arguments"
    args = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
    return f"{cls.__name__} accepts {', '.join(args)}"
