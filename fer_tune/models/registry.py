"""One registry for every model: the built-ins (registered with `@register_model`) and `timm/<name>`.

`create_model` checks the arguments every model shares, rejects unknown names and keyword arguments
with a `UserError`, and hands the rest to the model's builder function. A builder's keyword-only
parameters are the extra knobs it accepts (`width`, `hidden`, ...).
"""

from __future__ import annotations

import difflib
import inspect
import os
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fer_tune.errors import UserError

TIMM_PREFIX = "timm/"
COMMON_ARGS = ("num_classes", "in_chans", "dropout", "img_size")

_builders: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a builder under its function name. It takes the common arguments
    (num_classes, in_chans, dropout, img_size) plus keyword-only extras with defaults."""
    name = fn.__name__
    if name in _builders:
        raise ValueError(f"model {name!r} is registered twice")
    _builders[name] = fn
    return fn


def list_models() -> list[str]:
    """Names of the built-in models, simplest first (any `timm/<name>` works as well)."""
    return list(_builders)


def create_model(
    name: str,
    num_classes: int = 7,
    in_chans: int = 1,
    dropout: float = 0.0,
    img_size: int = 48,
    pretrained: str | os.PathLike | bool | None = None,
    **kw,
) -> nn.Module:
    """Build a model by name: a built-in (see `list_models()`) or `timm/<timm name>`.

    `dropout` is the classifier dropout; `img_size` is the (square) input size the model is built for.
    `pretrained`: None/False for random init, a path to a local weights file (.pth/.bin/.safetensors),
    or True for the hub weights of a timm model (a download; never implied).
    """
    _check_common(num_classes, in_chans, dropout, img_size)
    if name.startswith(TIMM_PREFIX):
        from fer_tune.models.timm_models import create_timm_model

        return create_timm_model(name[len(TIMM_PREFIX):], num_classes=num_classes, in_chans=in_chans,
                                 dropout=dropout, img_size=img_size, pretrained=pretrained, **kw)
    builder = _builder(name)
    extras = _extra_args(builder)
    unknown = sorted(set(kw) - set(extras))
    if unknown:
        raise UserError(f"model {name!r} got unknown argument(s) {', '.join(unknown)}; it accepts "
                        f"{', '.join(extras) or 'no extra arguments'} (besides {', '.join(COMMON_ARGS)}, pretrained)")
    if pretrained is True:
        raise UserError(f"model {name!r} has no hub weights; pass pretrained=<path to a weights file> or leave it unset")
    model = builder(num_classes=num_classes, in_chans=in_chans, dropout=dropout, img_size=img_size, **kw)
    if pretrained:
        load_builtin_weights(model, name, weights_file(pretrained))
    return model


def model_info(name: str, num_classes: int = 7, in_chans: int = 1, img_size: int = 48, **kw) -> dict:
    """Size and cost of a model: {"name", "params", "mflops", "description"}.

    `params` counts every parameter; `mflops` is one forward pass of one image at `img_size`, as
    counted by torch's FlopCounterMode (2 FLOPs per multiply-add in convolutions and matmuls; norms,
    activations and pooling are not counted).
    """
    model = create_model(name, num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kw)
    if name.startswith(TIMM_PREFIX):
        description = f"timm {type(model).__name__}"
    else:
        description = (inspect.getdoc(_builders[name]) or "").splitlines()[0]
    return {
        "name": name,
        "params": sum(p.numel() for p in model.parameters()),
        "mflops": round(forward_flops(model, in_chans, img_size) / 1e6, 1),
        "description": description,
    }


def describe_models(img_size: int = 48) -> str:
    """A table of the built-in models (parameters and MFLOPs for a 1-channel, 7-class model at
    `img_size`) and a line about `timm/<name>`. Printed by `fer-tune models`."""
    if img_size < 1:
        raise UserError(f"--img-size {img_size}: must be a positive number of pixels")
    infos = []
    for name in list_models():
        try:
            infos.append(model_info(name, img_size=img_size))
        except UserError as exc:  # e.g. too small an image for its poolings: say so in its row
            infos.append({"name": name, "params": None, "mflops": None, "description": f"({exc})"})
    width = max(len(i["name"]) for i in infos)
    lines = [f"{'name':<{width}}  {'params':>10}  {'MFLOPs':>8}  description"]
    for i in infos:
        if i["params"] is None:
            lines.append(f"{i['name']:<{width}}  {'-':>10}  {'-':>8}  {i['description']}")
        else:
            lines.append(f"{i['name']:<{width}}  {i['params']:>10,}  {i['mflops']:>8.1f}  {i['description']}")
    lines.append("")
    lines.append(f"MFLOPs: one {img_size}x{img_size} grayscale image, forward pass, 7 classes.")
    lines.append('timm/<name>: any timm model, e.g. timm/resnet18 or timm/efficientnet_b0 (names: '
                 'timm.list_models("*pattern*")); pretrained=PATH loads a local weights file.')
    return "\n".join(lines)


def forward_flops(model: nn.Module, in_chans: int, img_size: int) -> int:
    """FLOPs of one eval-mode forward pass of a single image."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, in_chans, img_size, img_size))
    finally:
        model.train(was_training)
    return counter.get_total_flops()


def weights_file(pretrained: str | os.PathLike) -> str:
    """The path of a local weights file, or a UserError when there is none."""
    path = os.path.expanduser(os.fspath(pretrained))
    if not os.path.isfile(path):
        raise UserError(f"pretrained weights file not found: {path} (give a .pth, .bin or .safetensors file)")
    return path


def load_builtin_weights(model: nn.Module, name: str, path: str) -> None:
    """Load a state dict saved from the same built-in model. A classifier of another size
    (another num_classes) is dropped and stays randomly initialised, as timm does."""
    from timm.models import load_state_dict  # handles .safetensors, wrapper keys, "module." prefixes

    try:
        state = load_state_dict(path, weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read pretrained weights {path}: {brief(e)}") from e
    own = model.state_dict()
    classifier = [k for k in own if k.startswith(f"head.{len(model.head) - 1}.")]
    if any(k in state and state[k].shape != own[k].shape for k in classifier):
        for k in classifier:
            state.pop(k, None)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise UserError(f"pretrained weights {path} do not fit model {name!r}: {brief(e)}") from e
    missing = [k for k in missing if k not in classifier]
    if missing or unexpected:
        raise UserError(f"pretrained weights {path} do not fit model {name!r}: "
                        f"missing {missing[:3]}, unexpected {unexpected[:3]}")


def _builder(name: str) -> Callable[..., nn.Module]:
    if name in _builders:
        return _builders[name]
    close = difflib.get_close_matches(name, list(_builders), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UserError(f"unknown model {name!r}{hint}; choose one of {', '.join(_builders)}, "
                    f"or timm/<name> for any timm model")


def model_arguments(name: str) -> list[str] | None:
    """The extra keyword arguments a built-in model accepts (None for timm models: timm checks its own)."""
    return None if name.startswith(TIMM_PREFIX) else _extra_args(_builder(name))


def _extra_args(builder: Callable[..., nn.Module]) -> list[str]:
    params = inspect.signature(builder).parameters
    return [p for p in params if p not in COMMON_ARGS]


def _check_common(num_classes, in_chans, dropout, img_size) -> None:
    for arg, value in (("num_classes", num_classes), ("in_chans", in_chans), ("img_size", img_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{arg} must be a positive integer, got {value!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise UserError(f"dropout must be a number in [0, 1), got {dropout!r}")


def brief(e: BaseException, limit: int = 240) -> str:
    """An exception's message on one line, cut to `limit` characters."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
