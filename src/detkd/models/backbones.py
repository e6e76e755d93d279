"""Backbone bodies and the feature pyramid built on top of them.

A *body* maps an image batch to the classic ResNet stage outputs C2..C5 (strides
4..32). ``PyramidBackbone`` turns those into FPN levels ``p{min_level}`` ..
``p{max_level}``; levels above P5 come from stride-2 convolutions on P5, the way
RetinaNet builds P6/P7. Level names are explicit (``"p3"``) so that distillation
code can pair student and teacher levels by number.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision import models as tvm
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork

STAGE_LEVELS = (2, 3, 4, 5)
BACKBONES = ("tiny", "resnet18", "resnet34", "resnet50", "mobilenet_v3_large", "mobilenet_v3_small")
NORMS = ("bn", "frozen_bn")


def _norm_layer(norm: str) -> type[nn.Module]:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    return nn.BatchNorm2d if norm == "bn" else FrozenBatchNorm2d


def _load_classifier_weights(net: nn.Module, weights: Path, *, what: str) -> None:
    """Load a local torchvision classification state dict (no hub access ever)."""
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"{what} weights file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    missing, unexpected = net.load_state_dict(state, strict=False)
    useful = [k for k in missing if not k.startswith(("fc.", "classifier."))]
    if useful:
        raise ValueError(f"{path}: not a {what} state dict, missing keys such as {useful[:3]}")


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, *, stride: int = 1, norm: type[nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), norm(cout), nn.ReLU(inplace=True))


class TinyBody(nn.Module):
    """A small plain CNN (widths 16..128 by default) that trains in minutes on a CPU."""

    def __init__(self, *, widths: tuple[int, int, int, int] = (16, 32, 64, 128), norm: str = "bn") -> None:
        super().__init__()
        norm_layer = _norm_layer(norm)
        self.stem = ConvBNReLU(3, widths[0], stride=2, norm=norm_layer)
        stages = []
        cin = widths[0]
        for cout in widths:
            stages.append(
                nn.Sequential(ConvBNReLU(cin, cout, stride=2, norm=norm_layer), ConvBNReLU(cout, cout, norm=norm_layer))
            )
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.channels = dict(zip(STAGE_LEVELS, widths, strict=True))

    def forward(self, x: Tensor) -> dict[int, Tensor]:
        x = self.stem(x)
        out = {}
        for level, stage in zip(STAGE_LEVELS, self.stages, strict=True):
            x = stage(x)
            out[level] = x
        return out


class ResNetBody(nn.Module):
    """torchvision ResNet without its classifier, returning C2..C5."""

    def __init__(self, *, name: str, weights: Path | None = None, norm: str = "bn") -> None:
        super().__init__()
        net = getattr(tvm, name)(weights=None, norm_layer=_norm_layer(norm))
        if weights is not None:
            _load_classifier_weights(net, weights, what=name)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.stages = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        expansion = 4 if name == "resnet50" else 1
        self.channels = dict(
            zip(STAGE_LEVELS, [64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion], strict=True)
        )

    def forward(self, x: Tensor) -> dict[int, Tensor]:
        x = self.stem(x)
        out = {}
        for level, stage in zip(STAGE_LEVELS, self.stages, strict=True):
            x = stage(x)
            out[level] = x
        return out


class MobileNetV3Body(nn.Module):
    """torchvision MobileNetV3 features, cut at the last block of each stride 4..32."""

    def __init__(self, *, name: str, weights: Path | None = None, norm: str = "bn") -> None:
        super().__init__()
        if norm != "bn":
            # torchvision's MobileNetV3 takes a norm factory with extra kwargs; keep BN there.
            norm = "bn"
        net = getattr(tvm, name)(weights=None)
        if weights is not None:
            _load_classifier_weights(net, weights, what=name)
        self.features = net.features
        self.taps: dict[int, int] = {}
        self.channels: dict[int, int] = {}
        with torch.no_grad():
            was_training = self.features.training
            self.features.eval()
            x = torch.zeros(1, 3, 64, 64)
            for index, block in enumerate(self.features):
                x = block(x)
                level = (64 // x.shape[-1]).bit_length() - 1
                if level in STAGE_LEVELS:
                    self.taps[level] = index
                    self.channels[level] = x.shape[1]
            self.features.train(was_training)
        self._tap_index = {index: level for level, index in self.taps.items()}

    def forward(self, x: Tensor) -> dict[int, Tensor]:
        out = {}
        for index, block in enumerate(self.features):
            x = block(x)
            level = self._tap_index.get(index)
            if level is not None:
                out[level] = x
            if len(out) == len(self.taps):
                break
        return out


def build_body(name: str, *, weights: Path | None = None, norm: str = "bn") -> nn.Module:
    """Name -> backbone body (the one string table for this family)."""
    if name == "tiny":
        if weights is not None:
            raise ValueError("the tiny backbone has no classification weights; pass detector weights instead")
        return TinyBody(norm=norm)
    if name.startswith("resnet"):
        return ResNetBody(name=name, weights=weights, norm=norm)
    if name.startswith("mobilenet_v3"):
        return MobileNetV3Body(name=name, weights=weights, norm=norm)
    raise ValueError(f"unknown backbone {name!r}; choose from {BACKBONES}")


class PyramidBackbone(nn.Module):
    """Body + FPN emitting ``OrderedDict(p{l} -> Tensor)`` for l in [min_level, max_level]."""

    def __init__(self, body: nn.Module, *, min_level: int, max_level: int, out_channels: int) -> None:
        super().__init__()
        if not 2 <= min_level <= 5:
            raise ValueError(f"min_level must be in 2..5 (C2..C5 exist), got {min_level}")
        if max_level < min_level:
            raise ValueError(f"max_level ({max_level}) must be >= min_level ({min_level})")
        self.body = body
        self.min_level, self.max_level = min_level, max_level
        self.fpn_levels = [lvl for lvl in STAGE_LEVELS if min_level <= lvl <= max_level]
        self.fpn = FeaturePyramidNetwork([body.channels[lvl] for lvl in self.fpn_levels], out_channels)
        self.extra = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1) for _ in range(max(0, max_level - 5))
        )
        for conv in self.extra:
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.constant_(conv.bias, 0)
        self.out_channels = out_channels

    @property
    def level_names(self) -> list[str]:
        return [f"p{lvl}" for lvl in range(self.min_level, self.max_level + 1)]

    @property
    def strides(self) -> dict[str, int]:
        return {f"p{lvl}": 2**lvl for lvl in range(self.min_level, self.max_level + 1)}

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        stages = self.body(x)
        fpn_in = OrderedDict((f"p{lvl}", stages[lvl]) for lvl in self.fpn_levels)
        pyramid = self.fpn(fpn_in)
        last = pyramid[f"p{self.fpn_levels[-1]}"]
        for i, conv in enumerate(self.extra):
            last = conv(last if i == 0 else torch.relu(last))
            pyramid[f"p{6 + i}"] = last
        return pyramid
