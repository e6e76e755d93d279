"""Detections on raw images from a detkd checkpoint: what a deployed model does.

:class:`Predictor` prepares each image with the checkpoint's own evaluation view
(the one its ``val/AP`` was measured on), runs the detector and maps boxes back to
the original image's pixels, with COCO category ids and names instead of the model's
contiguous labels. The MLflow pyfunc (``detkd.tracking.pyfunc_model``) and ``detkd export``
build on it, so every deployed form returns the same detections.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from detkd.data.transforms import eval_transform, resize_image, to_tensor
from detkd.records import InputSpec

ImageInput = bytes | bytearray | Image.Image | np.ndarray | torch.Tensor


@dataclass
class Detections:
    """One image's detections in its original pixel coordinates (x1, y1, x2, y2)."""

    boxes: list[list[float]]
    scores: list[float]
    category_ids: list[int]
    names: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {"boxes": self.boxes, "scores": self.scores, "category_ids": self.category_ids, "names": self.names}


def image_tensor(image: ImageInput) -> torch.Tensor:
    """A float CHW tensor in [0, 1] from encoded bytes (PNG/JPEG), a PIL image, an HWC uint8 array or a CHW tensor."""
    if isinstance(image, bytes | bytearray):
        try:
            image = Image.open(io.BytesIO(bytes(image)))
            image.load()
        except Exception as exc:  # PIL raises several kinds for undecodable bytes
            raise ValueError(f"not a decodable image ({len(image)} bytes): {exc}") from None
    if isinstance(image, Image.Image):
        return to_tensor(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"an image array must be HxWx3 uint8, got shape {image.shape} dtype {image.dtype}")
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"an image tensor must be 3xHxW, got shape {tuple(image.shape)}")
        return image.float()
    raise TypeError(f"unsupported image type {type(image).__name__}")


class EagerBackend:
    """The detector as a PyTorch module (thresholds set on it per call).

    Images are batched only with others of the same prepared size: torchvision pads a batch to
    its largest image and the FCOS head's GroupNorm sees the padding, so a mixed-size batch would
    give an image other detections than it gets alone (or from an exported, one-image graph)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()

    def detect(
        self, images: list[torch.Tensor], *, score_thresh: float, detections_per_img: int
    ) -> list[dict[str, torch.Tensor]]:
        from detkd.models.detectors import set_inference_thresholds

        set_inference_thresholds(self.model, score_thresh=score_thresh, detections_per_img=detections_per_img)
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, image in enumerate(images):
            groups.setdefault(tuple(image.shape), []).append(index)
        outputs: list[dict[str, torch.Tensor]] = [{}] * len(images)
        for indices in groups.values():
            batch = [images[i] for i in indices]
            results = self.model(batch)
            for index, output in zip(indices, results, strict=True):
                outputs[index] = output
        return outputs


class ExportedBackend:
    """An exported graph (ONNX Runtime or TorchScript): one image per call, thresholds fixed at export; a
    transformers detector's graph has a fixed square ``canvas`` that each prepared image must fit."""

    def __init__(
        self, runner: Any, *, score_thresh: float, detections_per_img: int, path: Path, canvas: int | None = None
    ) -> None:
        self.runner = runner
        self.score_thresh = score_thresh
        self.detections_per_img = detections_per_img
        self.path = path
        self.canvas = canvas

    def check_fits(self, image: torch.Tensor) -> None:
        height, width = int(image.shape[-2]), int(image.shape[-1])
        if self.canvas is not None and (height > self.canvas or width > self.canvas):
            raise ValueError(
                f"{self.path}: this exported transformers detector runs on a {self.canvas}x{self.canvas} canvas; "
                f"the image is {width}x{height} px after resizing to the model's view. Cap the long side "
                "(input.max_size) or set model.hf_canvas to cover it when training, and export again"
            )

    def detect(
        self, images: list[torch.Tensor], *, score_thresh: float, detections_per_img: int
    ) -> list[dict[str, torch.Tensor]]:
        if score_thresh < self.score_thresh - 1e-9:
            raise ValueError(
                f"{self.path}: exported with score threshold {self.score_thresh}; it cannot return scores "
                f"below that (asked {score_thresh}); export again with a lower --score-threshold"
            )
        for image in images:
            self.check_fits(image)
        outputs = []
        for image in images:
            boxes, scores, labels = self.runner(image)
            # a graph exported at this threshold and cap needs no filtering: skip its three gathers
            if len(scores) > detections_per_img or (len(scores) and float(scores.min()) < score_thresh):
                keep = (scores >= score_thresh).nonzero().flatten()[:detections_per_img]  # already sorted by score
                boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            outputs.append({"boxes": boxes, "scores": scores, "labels": labels})
        return outputs


class Predictor:
    """A detector backend plus the input view and categories it was trained with."""

    def __init__(
        self,
        backend: EagerBackend | ExportedBackend,
        *,
        input_spec: InputSpec,
        categories: Sequence[tuple[int, str]],
        score_thresh: float = 0.3,
        detections_per_img: int = 100,
    ) -> None:
        self.backend = backend
        self.input_spec = input_spec
        self.transform = eval_transform(input_spec)
        self.categories = [(int(i), str(n)) for i, n in categories]  # label k (1..K) is categories[k - 1]
        self.score_thresh = score_thresh
        self.detections_per_img = detections_per_img

    @classmethod
    def from_checkpoint(cls, path: Path | str, **options: Any) -> Predictor:
        """Eager PyTorch; the checkpoint is loaded with ``weights_only=True`` and verified by its checksum."""
        from detkd.models.checkpoint import checkpoint_plan, load_detector

        model, meta = load_detector(Path(path))
        plan = checkpoint_plan(path, meta)
        return cls(EagerBackend(model), input_spec=plan.input, categories=plan.categories, **options)

    @classmethod
    def from_export(cls, path: Path | str, *, threads: int | None = None, **options: Any) -> Predictor:
        """A ``detkd export`` file (ONNX, run by ONNX Runtime on CPU with ``threads``, or TorchScript)."""
        from detkd.serving.export import load_export

        info, runner = load_export(Path(path), threads=threads)
        backend = ExportedBackend(
            runner,
            score_thresh=float(info["score_thresh"]),
            detections_per_img=int(info["detections_per_img"]),
            path=Path(path),
            canvas=info.get("canvas"),
        )
        input_spec = InputSpec.from_dict(info["input"])
        return cls(backend, input_spec=input_spec, categories=[tuple(c) for c in info["categories"]], **options)

    def prepare(self, images: Sequence[ImageInput]) -> tuple[list[torch.Tensor], list[tuple[float, float]]]:
        """Model inputs and each one's (x, y) scale from original pixels.

        The evaluation view's own sizing and resize (``ResizeShortSide`` then ``ScaleBy``), without
        its box bookkeeping: a served image has no boxes, and an image already at a step's size is
        used as it is. Each small tensor op saved counts at a 64 px student's speed: right after a
        network run has evicted the caches, the bookkeeping and the copy cost about a fifth of its
        network time."""
        tensors, scales = [], []
        for image in images:
            tensor = image_tensor(image)
            height, width = tensor.shape[-2:]
            scale_x = scale_y = 1.0
            for step in self.transform.transforms:
                new_height, new_width = step.output_size(height, width)
                if (new_height, new_width) != (height, width):
                    tensor = resize_image(tensor, height=new_height, width=new_width)
                    scale_x, scale_y = scale_x * new_width / width, scale_y * new_height / height
                    height, width = new_height, new_width
            tensors.append(tensor)
            scales.append((scale_x, scale_y))
        return tensors, scales

    @torch.inference_mode()
    def __call__(self, images: Sequence[ImageInput]) -> list[Detections]:
        if not len(images):
            return []
        tensors, scales = self.prepare(images)
        outputs = self.backend.detect(
            tensors, score_thresh=self.score_thresh, detections_per_img=self.detections_per_img
        )
        return [self.to_original(output, scale) for output, scale in zip(outputs, scales, strict=True)]

    def to_original(self, output: dict[str, Any], scale: tuple[float, float]) -> Detections:
        """Boxes in the original image's pixels, COCO ids and names; labels the model does not know are dropped."""
        scale_x, scale_y = scale
        boxes = as_numpy(output["boxes"]).astype(np.float64).reshape(-1, 4) / (scale_x, scale_y, scale_x, scale_y)
        scores = as_numpy(output["scores"]).astype(np.float64)
        labels = as_numpy(output["labels"]).tolist()
        known = [i for i, label in enumerate(labels) if 1 <= label <= len(self.categories)]
        if len(known) < len(labels):
            boxes, scores = boxes[known], scores[known]
        return Detections(
            boxes=np.round(boxes, 2).tolist(),
            scores=np.round(scores, 5).tolist(),
            category_ids=[self.categories[labels[i] - 1][0] for i in known],
            names=[self.categories[labels[i] - 1][1] for i in known],
        )


def as_numpy(values: torch.Tensor | np.ndarray) -> np.ndarray:
    return values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
