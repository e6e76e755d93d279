"""A trained FCOS as the lean single-image graph that ``detkd export --format onnx`` writes.

Traced as it is, torchvision's FCOS exports to ~1900 ONNX nodes, two thirds of them shape
arithmetic around the network: the padding of a one-image batch, an anchor generator that
rebuilds every level's grid from tensor sizes, a head that flattens and concatenates levels,
and post-processing that runs its decoding per candidate with integer floor divisions. ONNX
Runtime dispatches them one by one: at the quickstart's sizes the traced graph is 1.24x
(teacher) to 1.34x (64 px student) slower than this one (``benchmarks/results/latency.md``).
This module computes the same detections with about 850 nodes:

* the pixel-coordinate grid is built once and each level's cell centres are a strided slice
  of it (torchvision places level l's points at multiples of its stride, ``(x * s, y * s)``);
* the head's per-level maps are decoded densely (a few vector ops over every cell), then only
  the candidates above the score threshold are gathered;
* the candidates per level, the threshold, the top-k cap, the box clipping and the class-wise
  NMS are torchvision's, in torchvision's order, so the boxes, scores and labels equal eager
  PyTorch's (``detkd.serving.export.EXPORT_TOLERANCE_PX``; checked on every export).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import boxes as box_ops

from detkd.models.detectors import GroupNormFCOSHead
from detkd.models.lite import LiteFCOSHead


class FCOSExportGraph(nn.Module):
    """One prepared image (3, H, W, floats in [0, 1]) -> (boxes, scores, labels), as ``FCOS.forward`` in eval.

    Thresholds are read from the model (``set_inference_thresholds`` before building this).
    """

    def __init__(self, model: FCOS) -> None:
        super().__init__()
        transform = model.transform
        self.register_buffer("mean", torch.tensor(transform.image_mean).view(3, 1, 1))
        self.register_buffer("std", torch.tensor(transform.image_std).view(3, 1, 1))
        self.size_divisible = int(transform.size_divisible)
        head = model.head
        if not isinstance(head, (GroupNormFCOSHead, LiteFCOSHead)):
            raise TypeError(f"expected a detkd FCOS head (per-level outputs), got {type(head).__name__}")
        self.backbone = model.backbone
        self.head = head
        self.num_classes = int(head.num_classes)
        self.strides = list(model.backbone.strides.values())  # in level order, as the backbone returns them
        # torchvision's point "anchors" are [-a, -a, a, a] (rounded) around each cell's (x * s, y * s);
        # the box coder scales the predicted distances by the anchor's width
        cells = [anchors[0] for anchors in model.anchor_generator.cell_anchors]
        if len(cells) != len(self.strides) or any(len(a) != 1 for a in model.anchor_generator.cell_anchors):
            raise ValueError("expected one point per location and level (an FCOS anchor generator)")
        self.anchor_offsets = [float(c[0] + c[2]) / 2 for c in cells]
        self.anchor_widths = [float(c[2] - c[0]) for c in cells]
        self.score_thresh = float(model.score_thresh)
        self.nms_thresh = float(model.nms_thresh)
        self.topk_candidates = int(model.topk_candidates)
        self.detections_per_img = int(model.detections_per_img)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        height, width = image.shape[-2], image.shape[-1]
        divisor = self.size_divisible
        x = (image - self.mean) / self.std
        x = nn.functional.pad(x, (0, (divisor - width % divisor) % divisor, 0, (divisor - height % divisor) % divisor))
        x = x.unsqueeze(0)
        padded_height, padded_width = x.shape[-2], x.shape[-1]
        columns = torch.arange(padded_width, dtype=torch.float32).expand(padded_height, padded_width)
        rows = torch.arange(padded_height, dtype=torch.float32).unsqueeze(1).expand(padded_height, padded_width)
        grid = torch.stack([columns, rows])  # (2, H, W) pixel coordinates
        features = list(self.backbone(x).values())
        classes = self.num_classes
        all_boxes, all_scores, all_labels = [], [], []
        for level, (logits, distances, centerness) in enumerate(self.head.level_outputs(features)):
            stride = self.strides[level]
            scores = torch.sqrt(torch.sigmoid(logits) * torch.sigmoid(centerness))
            scores = scores.reshape(classes, -1).t().reshape(-1)  # torchvision's order: cell-major, then class
            candidates = torch.nonzero(scores > self.score_thresh).reshape(-1)
            top_scores, order = scores[candidates].topk(det_utils._topk_min(candidates, self.topk_candidates, 0))
            candidates = candidates[order]
            cells = torch.div(candidates, classes, rounding_mode="trunc")
            centers = grid[:, ::stride, ::stride].reshape(2, -1) + self.anchor_offsets[level]
            distances = distances.reshape(4, -1) * self.anchor_widths[level]
            boxes = torch.cat([centers - distances[:2], centers + distances[2:]]).t()
            all_boxes.append(boxes[cells])
            all_scores.append(top_scores)
            all_labels.append(candidates % classes)
        boxes = torch.cat(all_boxes)
        scores = torch.cat(all_scores)
        labels = torch.cat(all_labels)
        boxes = box_ops.clip_boxes_to_image(boxes, (height, width))
        keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
        return boxes[keep], scores[keep], labels[keep]
