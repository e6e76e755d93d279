"""Backbone bodies and the feature pyramid built on top of them.

A *body* maps an image batch to the classic stage outputs ``c2``..``c5`` (strides
4..32). ``PyramidBackbone`` turns those into FPN levels ``p{min_level}`` ..
``p{max_level}`` with torchvision's ``FeaturePyramidNetwork``; P6/P7 come from
torchvision's ``LastLevelP6P7`` on P5 (RetinaNet v1, FCOS) or C5 (RetinaNet v2), or P6
from subsampling P5 (``LastLevelMaxPool``, Faster R-CNN): ``TOP_LEVELS``. Level names
are explicit (``"p3"``) so that distillation code can pair student and teacher
levels by number. Nothing here loads weights: that is ``detkd.models.checkpoint``
and ``detkd.models.pretrained``; :func:`freeze_body` fixes the lower stages of a
pretrained body as torchvision's ``trainable_backbone_layers`` does.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from functools import partial
from typing import NamedTuple

from torch import Tensor, nn
from torch.nn import functional as F
from torchvision import models as tvm
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork, LastLevelP6P7

STAGE_LEVELS = (2, 3, 4, 5)
MAX_LEVEL = 7  # LastLevelP6P7 makes P6 and P7, nothing above
NORMS = ("bn", "frozen_bn")
TOP_LEVELS = ("conv_p5", "conv_c5", "maxpool")
FPN_NORMS = ("none", "bn")


class Body(NamedTuple):
    """A module returning ``OrderedDict(c2=..., ..., c5=...)`` and each stage level's channels."""

    module: nn.Module
    channels: dict[int, int]


def _norm_layer(norm: str, eps: float | None = None) -> Callable[..., nn.Module]:
    """The body's BatchNorm class; ``eps`` None keeps the class's own (1e-5)."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    layer = nn.BatchNorm2d if norm == "bn" else FrozenBatchNorm2d
    return layer if eps is None else partial(layer, eps=eps)


class ConvBNReLU(nn.Sequential):
    def __init__(
        self, cin: int, cout: int, *, stride: int = 1, norm: Callable[..., nn.Module] = nn.BatchNorm2d
    ) -> None:
        super().__init__(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), norm(cout), nn.ReLU(inplace=True))


class TinyBody(nn.Module):
    """A small plain CNN (widths 16..128 by default) that trains in minutes on a CPU."""

    def __init__(
        self, *, widths: tuple[int, int, int, int] = (16, 32, 64, 128), norm: str = "bn", norm_eps: float | None = None
    ) -> None:
        super().__init__()
        norm_layer = _norm_layer(norm, norm_eps)
        self.stem = ConvBNReLU(3, widths[0], stride=2, norm=norm_layer)
        stages = []
        cin = widths[0]
        for cout in widths:
            stages.append(
                nn.Sequential(ConvBNReLU(cin, cout, stride=2, norm=norm_layer), ConvBNReLU(cout, cout, norm=norm_layer))
            )
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.widths = widths

    def forward(self, x: Tensor) -> dict[str, Tensor]:  # TorchScript-able: detkd export --format torchscript
        x = self.stem(x)
        out: dict[str, Tensor] = OrderedDict()
        level = 2  # C2 (STAGE_LEVELS[0]); TorchScript cannot read module globals
        for stage in self.stages:
            x = stage(x)
            out["c" + str(level)] = x
            level += 1
        return out


def build_tiny_body(*, norm: str = "bn", norm_eps: float | None = None) -> Body:
    body = TinyBody(norm=norm, norm_eps=norm_eps)
    return Body(body, dict(zip(STAGE_LEVELS, body.widths, strict=True)))


def build_resnet_body(*, factory: Callable[..., tvm.ResNet], norm: str = "bn", norm_eps: float | None = None) -> Body:
    """A torchvision ResNet (``tvm.resnet18``...) cut after layer1..layer4 (C2..C5), without pooling and classifier."""
    net = factory(weights=None, norm_layer=_norm_layer(norm, norm_eps))
    getter = IntermediateLayerGetter(net, return_layers={f"layer{i}": f"c{i + 1}" for i in range(1, 5)})
    c5 = net.fc.in_features  # 512 * block expansion; every stage below halves it
    return Body(getter, {level: c5 // 2 ** (5 - level) for level in STAGE_LEVELS})


# Index in ``features`` of the last block at stride 4, 8, 16 and 32 (C2..C5); C5 is the final 1x1 conv.
MOBILENET_V3_LARGE_TAPS = (3, 6, 12, 16)
MOBILENET_V3_SMALL_TAPS = (1, 3, 8, 12)


def build_mobilenet_v3_body(
    *,
    factory: Callable[..., tvm.MobileNetV3],
    taps: tuple[int, int, int, int],
    norm: str = "bn",
    norm_eps: float | None = None,
) -> Body:
    """torchvision MobileNetV3 features, tapped at known block indices (no probe forward, meta-safe)."""
    _norm_layer(norm)  # validates the name
    # torchvision's own BatchNorm settings are eps 1e-3, momentum 0.01; the frozen variant keeps that eps.
    eps = 0.001 if norm_eps is None else norm_eps
    if norm == "bn":
        norm_layer = None if norm_eps is None else partial(nn.BatchNorm2d, eps=eps, momentum=0.01)
    else:
        norm_layer = partial(FrozenBatchNorm2d, eps=eps)
    net = factory(weights=None, norm_layer=norm_layer)
    levels = dict(zip(STAGE_LEVELS, taps, strict=True))
    getter = IntermediateLayerGetter(net.features, return_layers={str(i): f"c{lvl}" for lvl, i in levels.items()})
    return Body(getter, {lvl: net.features[i].out_channels for lvl, i in levels.items()})


class SwinBody(nn.Module):
    """torchvision's Swin Transformer ``features`` (patch embedding, then stage / patch merging pairs, all
    channels-last) returning the four stage outputs as NCHW ``c2``..``c5`` (strides 4..32).

    The transformer teacher of MTPD's transformer-to-CNN results, buildable with the plain install.
    torchvision pads every window and patch merge, so any input size works.
    """

    def __init__(self, features: nn.Sequential) -> None:
        super().__init__()
        self.features = features

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = OrderedDict()
        level = 2
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index % 2 == 1:  # 1, 3, 5, 7: the output of a stage of Swin blocks
                out["c" + str(level)] = x.permute(0, 3, 1, 2)
                level += 1
        return out


def build_swin_body(
    *, factory: Callable[..., tvm.SwinTransformer], norm: str = "bn", norm_eps: float | None = None
) -> Body:
    """A torchvision Swin (``tvm.swin_t``, ``tvm.swin_s``) without its final norm and classifier."""
    if norm != "bn" or norm_eps is not None:
        setting = f"norm={norm!r}" if norm != "bn" else f"norm_eps={norm_eps}"
        raise ValueError(f"Swin backbones use LayerNorm; {setting} (a BatchNorm setting) does not apply")
    net = factory(weights=None)
    embed = net.features[0][0].out_channels  # the patch embedding conv: C2's width; each stage doubles it
    return Body(SwinBody(net.features), {level: embed * 2 ** (level - 2) for level in STAGE_LEVELS})


BODY_BUILDERS: dict[str, Callable[..., Body]] = {
    "tiny": build_tiny_body,
    "resnet18": partial(build_resnet_body, factory=tvm.resnet18),
    "resnet34": partial(build_resnet_body, factory=tvm.resnet34),
    "resnet50": partial(build_resnet_body, factory=tvm.resnet50),
    "mobilenet_v3_large": partial(
        build_mobilenet_v3_body, factory=tvm.mobilenet_v3_large, taps=MOBILENET_V3_LARGE_TAPS
    ),
    "mobilenet_v3_small": partial(
        build_mobilenet_v3_body, factory=tvm.mobilenet_v3_small, taps=MOBILENET_V3_SMALL_TAPS
    ),
    "swin_t": partial(build_swin_body, factory=tvm.swin_t),
    "swin_s": partial(build_swin_body, factory=tvm.swin_s),
}
BACKBONES = tuple(BODY_BUILDERS)


def build_body(name: str, *, norm: str = "bn", norm_eps: float | None = None) -> Body:
    """Backbone name -> freshly initialised body (weights are loaded by ``detkd.models.checkpoint``)."""
    if name not in BODY_BUILDERS:
        raise ValueError(f"unknown backbone {name!r}; choose from {BACKBONES}")
    return BODY_BUILDERS[name](norm=norm, norm_eps=norm_eps)


def body_stages(name: str, body: nn.Module) -> list[list[str]]:
    """The body's parameter-name prefixes per stage, top stage first: what ``trainable_layers`` counts.

    ResNet: torchvision's ``_resnet_fpn_extractor`` (layer4, layer3, layer2, layer1, conv1; bn1 trains only
    with all five). MobileNetV3: its ``_mobilenet_extractor`` (the blocks from each strided block up, the
    first block alone). tiny: its four stages and the stem. Swin: each stage with the patch merging in
    front of it, then the patch embedding.
    """
    if name.startswith("resnet"):
        return [["layer4."], ["layer3."], ["layer2."], ["layer1."], ["conv1.", "bn1."]]
    if name.startswith("mobilenet_v3"):
        blocks = list(body.children())
        starts = [0] + [i for i, b in enumerate(blocks) if getattr(b, "_is_cn", False)] + [len(blocks) - 1]
        bounds = [*starts, len(blocks)]
        # torchvision freezes features[:starts[num_stages - n]]: stage k spans starts[k] .. starts[k + 1] - 1,
        # the last "stage" is the final block alone
        return [[f"{j}." for j in range(bounds[k], bounds[k + 1])] for k in reversed(range(len(starts)))]
    if name == "tiny":
        return [[f"stages.{i}."] for i in reversed(range(4))] + [["stem."]]
    if name.startswith("swin"):
        return [["features.6.", "features.7."], ["features.4.", "features.5."], ["features.2.", "features.3."]] + [
            ["features.1."],
            ["features.0."],
        ]
    raise ValueError(f"unknown backbone {name!r}; choose from {BACKBONES}")


def freeze_body(body: nn.Module, name: str, *, trainable_layers: int) -> list[str]:
    """Stop the gradient of every body parameter below the top ``trainable_layers`` stages; returns their names.

    As torchvision's detection builders do with ``trainable_backbone_layers``: the frozen parameters get
    ``requires_grad=False`` (the optimizer skips them, DDP does not reduce them). BatchNorm statistics are
    frozen by ``norm: frozen_bn``, not here.
    """
    stages = body_stages(name, body)
    if not 0 <= trainable_layers <= len(stages):
        raise ValueError(
            f"model.trainable_layers: {trainable_layers} is out of range for backbone {name}: "
            f"0..{len(stages)} (stages from the top: {', '.join(p[0].rstrip('.') for p in stages)})"
        )
    trainable = tuple(prefix for stage in stages[:trainable_layers] for prefix in stage)
    frozen = []
    for param_name, param in body.named_parameters():
        if not param_name.startswith(trainable):
            param.requires_grad_(False)
            frozen.append(param_name)
    return frozen


def body_state_from_classifier(backbone: str, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A torchvision classification state dict -> the body's keys; the classifier itself is dropped."""
    if backbone.startswith("resnet"):
        return {k: v for k, v in state.items() if not k.startswith("fc.")}
    if backbone.startswith("swin"):  # the body holds torchvision's ``features`` under the same name
        return {k: v for k, v in state.items() if k.startswith("features.")}
    if backbone.startswith("mobilenet_v3"):
        return {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    raise ValueError(f"the {backbone!r} backbone has no classification weights; pass detector weights instead")


def check_levels(min_level: int, max_level: int) -> None:
    if not 2 <= min_level <= 5:
        raise ValueError(f"min_level must be in 2..5 (C2..C5 exist), got {min_level}")
    if max_level < min_level:
        raise ValueError(f"max_level ({max_level}) must be >= min_level ({min_level})")
    if max_level > MAX_LEVEL:
        raise ValueError(
            f"max_level must be <= {MAX_LEVEL} (torchvision's LastLevelP6P7 makes P6 and P7), got {max_level}"
        )


class MaxPoolP6(ExtraFPNBlock):
    """torchvision's ``LastLevelMaxPool`` (P6 = P5 subsampled by 2, no weights) naming its level ``p6``."""

    def forward(self, x: list[Tensor], y: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        names.append("p6")
        x.append(F.max_pool2d(x[-1], kernel_size=1, stride=2, padding=0))
        return x, names


def _extra_blocks(max_level: int, channels: int, *, top_levels: str, c5_channels: int) -> ExtraFPNBlock | None:
    if top_levels not in TOP_LEVELS:
        raise ValueError(f"top_levels must be one of {TOP_LEVELS}, got {top_levels!r}")
    if max_level < 6:
        return None
    if top_levels == "maxpool":
        if max_level > 6:
            raise ValueError(f"top_levels maxpool makes one level above P5 (P6): max_level {max_level} > 6")
        return MaxPoolP6()
    extra = LastLevelP6P7(c5_channels if top_levels == "conv_c5" else channels, channels)
    extra.use_P5 = top_levels == "conv_p5"  # torchvision infers it from in == out channels; say it
    if max_level == 6:
        # P7 is dropped in forward; an identity there leaves no conv whose weights never get a gradient (DDP).
        extra.p7 = nn.Identity()
    return extra


class PyramidBackbone(nn.Module):
    """Body + FPN emitting ``OrderedDict(p{l} -> Tensor)`` for l in [min_level, max_level]."""

    __jit_unused_properties__ = ["level_names", "strides"]  # Python-side helpers, not part of the scripted graph

    def __init__(
        self,
        body: nn.Module,
        *,
        in_channels: Mapping[int, int],
        min_level: int,
        max_level: int,
        out_channels: int,
        top_levels: str = "conv_p5",
        fpn_norm: str = "none",
    ) -> None:
        super().__init__()
        check_levels(min_level, max_level)
        if fpn_norm not in FPN_NORMS:
            raise ValueError(f"fpn_norm must be one of {FPN_NORMS}, got {fpn_norm!r}")
        self.body = body
        self.min_level, self.max_level = min_level, max_level
        self.fpn_levels = tuple(lvl for lvl in STAGE_LEVELS if min_level <= lvl <= max_level)
        self.fpn = FeaturePyramidNetwork(
            [in_channels[lvl] for lvl in self.fpn_levels],
            out_channels,
            extra_blocks=_extra_blocks(
                max_level, out_channels, top_levels=top_levels, c5_channels=in_channels[self.fpn_levels[-1]]
            ),
            norm_layer=nn.BatchNorm2d if fpn_norm == "bn" else None,
        )
        self.out_channels = out_channels

    @property
    def level_names(self) -> list[str]:
        return [f"p{lvl}" for lvl in range(self.min_level, self.max_level + 1)]

    @property
    def strides(self) -> dict[str, int]:
        return {f"p{lvl}": 2**lvl for lvl in range(self.min_level, self.max_level + 1)}

    def forward(self, x: Tensor) -> dict[str, Tensor]:  # written for TorchScript: loops, no comprehensions
        stages = self.body(x)
        inputs: dict[str, Tensor] = OrderedDict()
        for lvl in self.fpn_levels:
            inputs["p" + str(lvl)] = stages["c" + str(lvl)]
        pyramid = self.fpn(inputs)
        out: dict[str, Tensor] = OrderedDict()
        for lvl in range(self.min_level, self.max_level + 1):
            out["p" + str(lvl)] = pyramid["p" + str(lvl)]
        return out


def build_pyramid_backbone(
    *,
    backbone: str,
    min_level: int,
    max_level: int,
    fpn_channels: int,
    norm: str = "bn",
    norm_eps: float | None = None,
    top_levels: str = "conv_p5",
    fpn_norm: str = "none",
) -> PyramidBackbone:
    check_levels(min_level, max_level)
    body = build_body(backbone, norm=norm, norm_eps=norm_eps)
    return PyramidBackbone(
        body.module,
        in_channels=body.channels,
        min_level=min_level,
        max_level=max_level,
        out_channels=fpn_channels,
        top_levels=top_levels,
        fpn_norm=fpn_norm,
    )
