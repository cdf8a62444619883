"""Built-in models: the architectures of the seed studies (hand-tuned FER-2013 classifiers, 53-66 %
from scratch) and a VGG-style network after Khaireddin & Chen (2021).

Every model is a `FerNet`: `features` (convolutions or, for the MLPs, flatten + hidden layers) then
`head`, whose last layer is the classifier `nn.Linear`. `dropout` is the classifier dropout: after
every hidden dense layer (ReLU, then dropout), or before the classifier of a pooling head. Models
whose seed version also dropped out after each conv stage take `block_dropout` (default 0).

They are built from Conv2d / BatchNorm2d / ReLU / MaxPool2d / AdaptiveAvgPool2d, so they run well
with channels_last and bf16 autocast on a CPU. A flattening dense head gets its input size from
`img_size`; pooling heads take any size the poolings allow.
"""

from __future__ import annotations

from torch import nn

from fer_tune.errors import UserError
from fer_tune.models.registry import register_model


class FerNet(nn.Module):
    """`features` then `head`; `head[-1]` is the classifier."""

    def __init__(self, features: nn.Module, head: nn.Sequential):
        super().__init__()
        self.features = features
        self.head = head
        init_weights(self)

    def forward(self, x):
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN, a shortcut (1x1 conv-BN when the shape changes), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def init_weights(model: nn.Module) -> None:
    """Kaiming init for convs and hidden dense layers, unit BatchNorm, zero biases; the last BN of
    each residual block starts at zero (the block begins as the identity) and the classifier's
    weights are small (the first predictions are near uniform)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        if isinstance(m, BasicBlock):
            nn.init.zeros_(m.bn2.weight)
    nn.init.normal_(model.head[-1].weight, std=0.01)


# ---------------------------------------------------------------------------------------------
# Building blocks


def drop(p: float) -> nn.Module:
    """Dropout with probability p (an Identity when p is 0, so the layer costs nothing)."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise UserError(f"dropout probabilities must be numbers in [0, 1), got {p!r}")
    return nn.Dropout(p) if p > 0 else nn.Identity()


def conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def conv_stage(cin: int, cout: int, convs: int, block_dropout: float = 0.0) -> nn.Sequential:
    """`convs` x (3x3 conv-BN-ReLU), 2x2 max-pool, optional dropout."""
    layers = []
    for i in range(convs):
        layers += conv_bn_relu(cin if i == 0 else cout, cout)
    return nn.Sequential(*layers, nn.MaxPool2d(2), drop(block_dropout))


def dense_head(cin: int, hidden: list[int], num_classes: int, dropout: float) -> nn.Sequential:
    """Dense layers, each followed by ReLU and dropout, then the classifier."""
    layers = []
    for h in hidden:
        layers += [nn.Linear(cin, h), nn.ReLU(inplace=True), drop(dropout)]
        cin = h
    return nn.Sequential(*layers, nn.Linear(cin, num_classes))


def gap_head(cin: int, num_classes: int, dropout: float) -> nn.Sequential:
    """Global average pooling, dropout, classifier."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), drop(dropout), nn.Linear(cin, num_classes))


def channels(base: tuple[int, ...], width: float) -> list[int]:
    """Channel counts scaled by `width`, rounded to a multiple of 8 (at least 8)."""
    if isinstance(width, bool) or not isinstance(width, (int, float)) or width <= 0:
        raise UserError(f"width must be a positive number (a channel multiplier), got {width!r}")
    return [max(8, int(round(c * width / 8)) * 8) for c in base]


def pooled_size(img_size: int, pools: int, model: str) -> int:
    """Side of the feature map after `pools` 2x2 max-pools."""
    side = img_size // 2**pools
    if side < 1:
        raise UserError(f"img_size {img_size} is too small for {model} ({pools} 2x2 poolings need >= {2**pools})")
    return side


def positive_ints(value, arg: str) -> list[int]:
    """`value` (an int or a list of ints) as a list, checked to be positive."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise UserError(f"{arg} must be a positive integer or a list of them, got {value!r}")
    return values


# ---------------------------------------------------------------------------------------------
# The models


def _mlp(num_classes, in_chans, dropout, img_size, hidden, batch_norm) -> FerNet:
    layers: list[nn.Module] = [nn.Flatten()]
    cin = in_chans * img_size * img_size
    for h in positive_ints(hidden, "hidden"):
        layers += [nn.Linear(cin, h, bias=not batch_norm)]
        layers += [nn.BatchNorm1d(h)] if batch_norm else []
        layers += [nn.ReLU(inplace=True), drop(dropout)]
        cin = h
    return FerNet(nn.Sequential(*layers), nn.Sequential(nn.Linear(cin, num_classes)))


@register_model
def mlp(num_classes=7, in_chans=1, dropout=0.0, img_size=48, *, hidden=(1024, 512, 256)):
    """MLP baseline: flatten, dense layers (ReLU, dropout after each), classifier."""
    return _mlp(num_classes, in_chans, dropout, img_size, hidden, batch_norm=False)


@register_model
def mlp_bn(num_classes=7, in_chans=1, dropout=0.0, img_size=48, *, hidden=(1024, 512, 256)):
    """MLP baseline with BatchNorm1d after each dense layer."""
    return _mlp(num_classes, in_chans, dropout, img_size, hidden, batch_norm=True)


@register_model
def simple_cnn(num_classes=7, in_chans=1, dropout=0.0, img_size=48, *, width=1.0, hidden=128):
    """The classic first Keras CNN: 3 x (conv-ReLU, max-pool), one dense layer."""
    c = channels((32, 64, 128), width)
    side = pooled_size(img_size, 3, "simple_cnn")
    layers = []
    for cin, cout in zip([in_chans, *c], c):
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
    features = nn.Sequential(*layers, nn.Flatten())
    return FerNet(features, dense_head(c[-1] * side * side, positive_ints(hidden, "hidden"), num_classes, dropout))


@register_model
def improved_cnn(num_classes=7, in_chans=1, dropout=0.0, img_size=48, *, width=1.0, hidden=256,
                 block_dropout=0.0):
    """3 stages of 2 x conv-BN-ReLU (32-64-128) with max-pool, dropout, dense 256."""
    c = channels((32, 64, 128), width)
    side = pooled_size(img_size, 3, "improved_cnn")
    stages = [conv_stage(cin, cout, 2, block_dropout) for cin, cout in zip([in_chans, *c], c)]
    features = nn.Sequential(*stages, nn.Flatten())
    return FerNet(features, dense_head(c[-1] * side * side, positive_ints(hidden, "hidden"), num_classes, dropout))


@register_model
def gap_cnn(num_classes=7, in_chans=1, dropout=0.0, img_size=48, *, width=1.0, block_dropout=0.0):
    """improved_cnn's conv stages (plus a 256-channel one) with a global-average-pooling head."""
    c = channels((32, 64, 128, 256), width)
    pooled_size(img_size, 4, "gap_cnn")
    stages = [conv_stage(cin, cout, 2, block_dropout) for cin, cout in zip([in_chans, *c], c)]
    return FerNet(nn.Sequential(*stages), gap_head(c[-1], num_classes, dropout))


@register_model
def mini_resnet(num_classes=7, in_chans=1, dropout=0.0, img_size=48, *, width=1.0, blocks=(2, 2, 2)):
    """Small ResNet: 3x3 stem, 3 stages of BasicBlocks (64-128-256, each stride 2), GAP head."""
    c = channels((64, 128, 256), width)
    blocks = positive_ints(blocks, "blocks")
    if len(blocks) != 3:
        raise UserError(f"blocks must give 3 numbers (blocks per stage), got {blocks!r}")
    pooled_size(img_size, 3, "mini_resnet")
    stem = nn.Sequential(*conv_bn_relu(in_chans, c[0]))
    stages = []
    for cin, cout, n in zip([c[0], *c], c, blocks):
        stages.append(nn.Sequential(BasicBlock(cin, cout, stride=2), *[BasicBlock(cout, cout) for _ in range(n - 1)]))
    return FerNet(nn.Sequential(stem, *stages), gap_head(c[-1], num_classes, dropout))


@register_model
def cnn4_l2(num_classes=7, in_chans=1, dropout=0.0, img_size=48, *, width=1.0, hidden=256, block_dropout=0.0):
    """4 conv-BN-ReLU-pool blocks (32-64-128-512), dense 256; L2 via weight decay.

    The seed study's "L2-regularised" net put an L2 penalty on its kernels; here L2 is the
    optimizer's weight_decay (a search axis), not part of the model.
    """
    c = channels((32, 64, 128, 512), width)
    side = pooled_size(img_size, 4, "cnn4_l2")
    stages = [conv_stage(cin, cout, 1, block_dropout) for cin, cout in zip([in_chans, *c], c)]
    features = nn.Sequential(*stages, nn.Flatten())
    return FerNet(features, dense_head(c[-1] * side * side, positive_ints(hidden, "hidden"), num_classes, dropout))


@register_model
def cnn10(num_classes=7, in_chans=1, dropout=0.0, img_size=48, *, width=1.0, hidden=256, block_dropout=0.0):
    """10 conv layers: 5 stages of 2 x conv-BN-ReLU (32..512), pools, GAP, dense 256."""
    c = channels((32, 64, 128, 256, 512), width)
    pooled_size(img_size, 4, "cnn10")
    stages = [conv_stage(cin, cout, 2, block_dropout) for cin, cout in zip([in_chans, *c[:4]], c[:4])]
    last = nn.Sequential(*conv_bn_relu(c[3], c[4]), *conv_bn_relu(c[4], c[4]), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    head = dense_head(c[4], positive_ints(hidden, "hidden"), num_classes, dropout)
    return FerNet(nn.Sequential(*stages, last), head)


@register_model
def vgg_fer(num_classes=7, in_chans=1, dropout=0.0, img_size=48, *, width=1.0, fc=1024):
    """VGG-style net after Khaireddin & Chen 2021: 4 x (2 conv-BN-ReLU, pool), 64-512, 2 FC layers.

    Differences from the paper (73.28 % on FER-2013 with a 4096-wide net): the two hidden FC layers
    are `fc` wide (default 1024, the paper's 4096 is affordable with fc=4096); `width` scales the
    conv channels (1.0 = the paper's 64-128-256-512). The paper trained on 40x40 crops (512x2x2
    features) with ten-crop test-time averaging and dropout 0.2; here the flatten size follows
    `img_size` (48 -> 512x3x3), cropping belongs to the data pipeline, and dropout is the caller's.
    """
    c = channels((64, 128, 256, 512), width)
    side = pooled_size(img_size, 4, "vgg_fer")
    stages = [conv_stage(cin, cout, 2) for cin, cout in zip([in_chans, *c], c)]
    if isinstance(fc, bool) or not isinstance(fc, int) or fc < 1:
        raise UserError(f"fc must be a positive integer (the width of both hidden FC layers), got {fc!r}")
    features = nn.Sequential(*stages, nn.Flatten())
    return FerNet(features, dense_head(c[-1] * side * side, [fc, fc], num_classes, dropout))


@register_model
def vgg_fer_s(num_classes=7, in_chans=1, dropout=0.0, img_size=48, *, width=0.25, fc=256):
    """vgg_fer at a quarter width (16-32-64-128) with 256-wide FC layers: CPU-sized, the default."""
    return vgg_fer(num_classes, in_chans, dropout, img_size, width=width, fc=fc)
