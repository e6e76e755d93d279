"""A transformers detector (RT-DETR, D-FINE, DETR...) as the single-image graph ``detkd export`` writes.

Traced at one image size, these models keep that size's feature-map shapes: RT-DETR builds its
anchors and positional embeddings, and splits its deformable-attention values, with Python
integers. Their ONNX graph is therefore made at one fixed size, the detector's square canvas
(:attr:`detkd.models.hf_detector.HFDetector.canvas_side`): the graph normalises the prepared
image, pads it to the canvas inside the graph (the only size-dependent step, computed from the
input's shape) and runs the network at the canvas's fixed shapes. Eager PyTorch pads every batch
to the same canvas, so both return the same detections for any image that fits it; a larger one
is refused by the predictor (``ExportedBackend``), since the graph's shapes cannot grow.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import boxes as box_ops

from detkd.models.hf_detector import HFDetector


class HFExportGraph(nn.Module):
    """One prepared image (3, h, w), h and w at most the canvas -> (boxes, scores, labels), as ``HFDetector`` in eval.

    Thresholds are read from the model (``set_inference_thresholds`` before building this).
    """

    def __init__(self, model: HFDetector) -> None:
        super().__init__()
        side = model.canvas_side
        if side is None:
            raise ValueError("the detector has no canvas (model.hf_canvas); its graph would have no fixed size")
        self.model = model
        self.side = side

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        height, width = image.shape[-2], image.shape[-1]
        side = self.side
        x = self.model.normalise(image)
        x = nn.functional.pad(x, (0, side - width, 0, side - height)).unsqueeze(0)
        mask = nn.functional.pad(torch.ones_like(image[0], dtype=torch.long), (0, side - width, 0, side - height))
        outputs = self.model.hf(pixel_values=x, pixel_mask=mask.unsqueeze(0))
        if self.model.family.mask_aware:  # boxes relative to the image: its size as a tensor of the graph
            frames = torch._shape_as_tensor(image)[1:3].unsqueeze(0)
        else:  # relative to the padded canvas, a constant
            frames = torch.tensor([[side, side]])
        detections = self.model.decode(outputs, frames, [(side, side)])[0]
        boxes = box_ops.clip_boxes_to_image(detections["boxes"], (height, width))  # eager clamps to the image
        return boxes, detections["scores"], detections["labels"]
