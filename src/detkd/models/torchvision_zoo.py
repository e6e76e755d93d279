"""Which ``model`` settings build torchvision's published detectors, as data.

A torchvision detection file (``torch.save`` of its model's state dict) loads through
``model.weights`` into the detkd network these settings build; with them the detections
are torchvision's own (``tests/models/test_pretrained.py`` checks each one). ``detkd models
torchvision-config NAME`` prints an entry as the YAML ``model:`` section of a run config.

torchvision's labels are its 91 COCO outputs (background + category ids 1..90), detkd's
are 1..K over the data's categories: on other data the class layers are re-initialised
(``detkd.models.pretrained``), everything else is kept.
"""

from __future__ import annotations

from typing import Any

# torchvision builds its RetinaNets' anchors with int(): (32, 40, 50), not 32 * 2 ** (1/3)...
_RETINANET_ANCHORS = [
    [32, 40, 50],
    [64, 80, 101],
    [128, 161, 203],
    [256, 322, 406],
    [512, 645, 812],
]
_RPN_ANCHORS = [[32], [64], [128], [256], [512]]

# name -> the ModelConfig fields that reproduce it. Thresholds are torchvision's constructor defaults;
# trainable_layers is its fine-tuning default (trainable_backbone_layers=3), a training setting.
TORCHVISION_ZOO: dict[str, dict[str, Any]] = {
    "fcos_resnet50_fpn": {
        "arch": "fcos",
        "backbone": "resnet50",
        "min_level": 3,
        "max_level": 7,
        "fpn_channels": 256,
        "head_convs": 4,
        "top_levels": "conv_p5",
        "fpn_norm": "none",
        "fcos_box_activation": "relu",
        "anchor_sizes": [[8], [16], [32], [64], [128]],
        "norm": "frozen_bn",
        "norm_eps": None,
        "score_thresh": 0.2,
        "nms_thresh": 0.6,
        "detections_per_img": 100,
        "trainable_layers": 3,
    },
    "retinanet_resnet50_fpn": {
        "arch": "retinanet",
        "backbone": "resnet50",
        "min_level": 3,
        "max_level": 7,
        "fpn_channels": 256,
        "top_levels": "conv_p5",
        "fpn_norm": "none",
        "head_norm": "none",
        "box_loss": "l1",
        "anchor_sizes": _RETINANET_ANCHORS,
        "norm": "frozen_bn",
        "norm_eps": 0.0,  # torchvision loads its COCO_V1 file with overwrite_eps(model, 0.0)
        "score_thresh": 0.05,
        "nms_thresh": 0.5,
        "detections_per_img": 300,
        "trainable_layers": 3,
    },
    "retinanet_resnet50_fpn_v2": {
        "arch": "retinanet",
        "backbone": "resnet50",
        "min_level": 3,
        "max_level": 7,
        "fpn_channels": 256,
        "top_levels": "conv_c5",
        "fpn_norm": "none",
        "head_norm": "gn",
        "box_loss": "giou",
        "anchor_sizes": _RETINANET_ANCHORS,
        "norm": "bn",  # v2 keeps the ResNet's BatchNorm2d
        "norm_eps": None,
        "score_thresh": 0.05,
        "nms_thresh": 0.5,
        "detections_per_img": 300,
        "trainable_layers": 3,
    },
    "fasterrcnn_resnet50_fpn": {
        "arch": "fasterrcnn",
        "backbone": "resnet50",
        "min_level": 2,
        "max_level": 6,
        "fpn_channels": 256,
        "top_levels": "maxpool",
        "fpn_norm": "none",
        "rpn_convs": 1,
        "box_head": "mlp",
        "anchor_sizes": _RPN_ANCHORS,
        "norm": "frozen_bn",
        "norm_eps": 0.0,  # torchvision loads its COCO_V1 file with overwrite_eps(model, 0.0)
        "score_thresh": 0.05,
        "nms_thresh": 0.5,
        "detections_per_img": 100,
        "trainable_layers": 3,
    },
    "fasterrcnn_resnet50_fpn_v2": {
        "arch": "fasterrcnn",
        "backbone": "resnet50",
        "min_level": 2,
        "max_level": 6,
        "fpn_channels": 256,
        "top_levels": "maxpool",
        "fpn_norm": "bn",
        "rpn_convs": 2,
        "box_head": "conv",
        "anchor_sizes": _RPN_ANCHORS,
        "norm": "bn",  # v2 keeps the ResNet's BatchNorm2d
        "norm_eps": None,
        "score_thresh": 0.05,
        "nms_thresh": 0.5,
        "detections_per_img": 100,
        "trainable_layers": 3,
    },
}

# name -> the file torchvision publishes for it (COCO_V1: what torchvision's hub cache holds)
TORCHVISION_FILES: dict[str, str] = {
    "fcos_resnet50_fpn": "fcos_resnet50_fpn_coco-99b0c9b7.pth",
    "retinanet_resnet50_fpn": "retinanet_resnet50_fpn_coco-eeacb38b.pth",
    "retinanet_resnet50_fpn_v2": "retinanet_resnet50_fpn_v2_coco-5905b1c5.pth",
    "fasterrcnn_resnet50_fpn": "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth",
    "fasterrcnn_resnet50_fpn_v2": "fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth",
}

# torchvision resizes every image of these models to a short side of 800, the long side at most 1333
TORCHVISION_INPUT = {"size": 800, "max_size": 1333}

_MOBILENET_FPN = (
    "its FPN reads MobileNetV3-Large features[13] and features[16], both at stride 32, and adds a max-pooled "
    "level at stride 64 (15 anchors each): two pyramid levels of one stride, which detkd's pyramid (one level "
    "per stride, P2..P7, paired by number in distillation) does not express. Load its MobileNetV3 body with "
    "model.backbone_weights (backbone: mobilenet_v3_large) and train the FPN and heads"
)
# name -> why detkd cannot build it
NOT_EXPRESSIBLE: dict[str, str] = {
    "fasterrcnn_mobilenet_v3_large_fpn": _MOBILENET_FPN,
    "fasterrcnn_mobilenet_v3_large_320_fpn": _MOBILENET_FPN,
}


def torchvision_model_config(name: str) -> dict[str, Any]:
    """The ``model`` settings that build torchvision's ``name``; ValueError naming the known ones otherwise."""
    if name in NOT_EXPRESSIBLE:
        raise ValueError(f"torchvision's {name} cannot be built by detkd: {NOT_EXPRESSIBLE[name]}")
    if name not in TORCHVISION_ZOO:
        raise ValueError(f"unknown torchvision detector {name!r}; detkd builds {', '.join(TORCHVISION_ZOO)}")
    return {
        key: (list(map(list, value)) if key == "anchor_sizes" else value)
        for key, value in TORCHVISION_ZOO[name].items()
    }
