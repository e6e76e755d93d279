"""Hugging Face ``transformers`` object detectors (the DETR family) behind detkd's detection interface.

``HFDetector`` wraps an ``AutoModelForObjectDetection`` (RT-DETR, RT-DETRv2, D-FINE, Deformable
DETR, DETR) so that it behaves like detkd's other detectors: ``model(images, targets)`` returns
the model's own losses (its Hungarian matching, denoising and auxiliary terms, weighted as the
model weighs them and summed per kind), and ``model(images)`` in eval mode returns
``[{"boxes", "scores", "labels"}]`` in input pixels with labels 1..K, decoded by the model's own
image processor (``post_process_object_detection``). Images arrive as detkd gives them to every
detector, RGB floats in [0, 1] already resized; the wrapper normalises them as the model's image
processor would and pads the batch to a multiple of the coarsest stride with a pixel mask, and to at
least a square ``canvas`` when one is set: RT-DETR's positions ignore the mask, so the padded frame
is part of its input, and a fixed canvas gives an image the same detections in any batch and lets
``detkd export`` write a graph of fixed feature-map sizes (``detkd.serving.export_hf``).

The taps are the encoder's multi-scale feature maps (what the decoder attends to), named
``p<log2 stride>`` like every detkd pyramid. A DETR-family detector has no dense per-location
class logits: its classes come from object queries, so logit losses cannot use it as a teacher.

``transformers`` is imported only when a model is built (the ``hf`` extra).
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from detkd.extras import MissingExtra, missing_extra

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PROCESSOR_FILE = "preprocessor_config.json"
PROBE_PX = 256  # the blank image whose backbone maps give their strides: a multiple of every stride up to 256


class HFUnavailable(MissingExtra, RuntimeError):
    """``transformers`` is not installed (a user error: the CLI prints one line)."""


@dataclass(frozen=True)
class Family:
    """What detkd needs to know of one ``transformers`` detector type."""

    processor: str  # the image processor class whose post_process_object_detection decodes it
    mask_aware: bool  # positions follow the pixel mask: boxes are relative to each image, not the padded batch
    focal: bool  # sigmoid class scores (no "no object" class)
    selects_queries: bool = False  # queries are the top-k encoder cells (two-stage): ties order differently


FAMILIES: dict[str, Family] = {
    "rt_detr": Family("RTDetrImageProcessor", mask_aware=False, focal=True, selects_queries=True),
    "rt_detr_v2": Family("RTDetrImageProcessor", mask_aware=False, focal=True, selects_queries=True),
    "d_fine": Family("RTDetrImageProcessor", mask_aware=False, focal=True, selects_queries=True),
    "deformable_detr": Family("DeformableDetrImageProcessor", mask_aware=True, focal=True),
    "detr": Family("DetrImageProcessor", mask_aware=True, focal=False),
}


def import_transformers():
    """The ``transformers`` module, or a one-line error that says how to install it."""
    try:
        import transformers
    except ImportError as exc:
        raise missing_extra("hf", why="model.arch 'hf'", detail=str(exc), cls=HFUnavailable) from None
    transformers.utils.logging.disable_progress_bar()  # one bar per weights file in every worker's log
    return transformers


def read_hf_config(path: Path) -> dict[str, Any]:
    """The model config (``config.json``) of a ``save_pretrained`` folder, or a ``config.json`` file, as data."""
    path = Path(path)
    file = path / CONFIG_FILE if path.is_dir() else path
    if not file.is_file():
        where = f"{path}: no {CONFIG_FILE} (a folder written by save_pretrained holds one)" if path.is_dir() else path
        raise ValueError(f"{where}: Hugging Face model config not found")
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file}: not a readable JSON model config ({exc})") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ValueError(f"{file}: a Hugging Face model config names its model_type; this one does not")
    if data["model_type"] not in FAMILIES:
        raise ValueError(
            f"{file}: model_type {data['model_type']!r} is not a detector detkd wraps; it wraps {sorted(FAMILIES)}"
        )
    return data


def weights_file(path: Path) -> Path | None:
    """The ``model.safetensors`` beside a folder's config, if any (a config alone means random weights)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    file = folder / WEIGHTS_FILE
    return file if file.is_file() else None


def config_classes(config: Mapping[str, Any]) -> int:
    """The class count of a model config (``id2label``, else ``num_labels``)."""
    labels = config.get("id2label")
    if labels:
        return len(labels)
    return int(config.get("num_labels", 2))


def with_classes(config: Mapping[str, Any], num_classes: int) -> dict[str, Any]:
    """A copy of ``config`` predicting ``num_classes`` classes (its label names kept where they fit)."""
    out = dict(config)
    old = {int(k): v for k, v in (config.get("id2label") or {}).items()}
    if len(old) != num_classes:
        old = {i: f"class_{i + 1}" for i in range(num_classes)}
    out["id2label"] = {str(k): v for k, v in old.items()}
    out["label2id"] = {v: k for k, v in old.items()}
    out["num_labels"] = num_classes
    return out


def term_base(key: str) -> str:
    """``loss_vfl_aux_3`` / ``loss_bbox_dn_0`` / ``loss_ce_2`` -> the kind of loss it is (``loss_vfl``...)."""
    return re.sub(r"(_(aux|dn|enc|pre))*(_\d+)?$", "", key)


def loss_terms(outputs: Any, config: Any) -> dict[str, Tensor]:
    """The model's loss as one weighted term per kind (``vfl``, ``bbox``, ``giou``, ...); they sum to ``outputs.loss``.

    RT-DETR and D-FINE weigh their terms before returning them; DETR and Deformable DETR
    return them raw and weigh them by the config's coefficients in the total. Which one it
    is is read off the numbers, and a total the terms do not add up to is an error, not a
    silently different loss.
    """
    total: Tensor = outputs.loss
    raw: dict[str, Tensor] = dict(outputs.loss_dict)
    weights = {
        "loss_ce": 1.0,
        "loss_bbox": float(getattr(config, "bbox_loss_coefficient", 1.0)),
        "loss_giou": float(getattr(config, "giou_loss_coefficient", 1.0)),
    }
    candidates = [
        {k: v for k, v in raw.items()},
        {k: v * weights[term_base(k)] for k, v in raw.items() if term_base(k) in weights},
    ]
    for terms in candidates:
        if not terms:
            continue
        summed = sum(terms.values())
        if torch.allclose(summed.detach().float(), total.detach().float(), rtol=1e-4, atol=1e-5):
            grouped: dict[str, Tensor] = {}
            for key, value in terms.items():
                kind = term_base(key).removeprefix("loss_")  # the loop logs each as train/loss_<kind>
                grouped[kind] = grouped[kind] + value if kind in grouped else value
            return grouped
    raise RuntimeError(
        f"{type(config).__name__}: its loss terms {sorted(raw)} do not add up to its total loss "
        f"{float(total):.6g}; detkd cannot say which weighted terms make it"
    )


class HFDetector(nn.Module):
    """A ``transformers`` detector (``self.hf``) with detkd's detection interface and taps (see the module)."""

    def __init__(
        self,
        *,
        hf: nn.Module,
        image_mean: list[float] | None,
        image_std: list[float] | None,
        source: str | None = None,
        canvas: int | None = None,
    ) -> None:
        super().__init__()
        self.hf = hf
        self.source = source
        self.canvas = canvas  # the least square side (px) a batch is padded to; rounded up to size_divisible
        self.model_type = str(hf.config.model_type)
        self.family = FAMILIES[self.model_type]
        self.out_channels = int(getattr(hf.config, "encoder_hidden_dim", None) or hf.config.d_model)
        self.score_thresh = 0.05
        self.detections_per_img = 100
        self.register_buffer("pixel_mean", torch.tensor(image_mean or [0.0] * 3).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(image_std or [1.0] * 3).view(3, 1, 1), persistent=False)
        self._strides: dict[str, int] | None = None
        self._processor = None

    # --- the encoder's pyramid -------------------------------------------------------------------------------
    @property
    def encoder(self) -> nn.Module:
        return self.hf.model.encoder

    def encoder_maps(self, args: tuple, kwargs: dict[str, Any], output: Any) -> list[Tensor]:
        """The encoder's output (a forward hook's view of it) as (N, C, H, W) maps, finest first."""
        hidden = output[0] if isinstance(output, (tuple, list)) else output.last_hidden_state
        if isinstance(hidden, (list, tuple)):  # RT-DETR, RT-DETRv2, D-FINE: the hybrid encoder's PAN maps
            return list(hidden)
        n, _, channels = hidden.shape
        shapes = kwargs.get("spatial_shapes_list") or kwargs.get("spatial_shapes")
        if shapes is None:  # DETR: one level, the backbone's last map
            shapes = [self._detr_shape]
        maps, start = [], 0
        for h, w in [(int(h), int(w)) for h, w in shapes]:
            maps.append(hidden[:, start : start + h * w].transpose(1, 2).reshape(n, channels, h, w))
            start += h * w
        return maps

    def _on_detr_projection(self, module, inputs, output: Tensor) -> None:
        self._detr_shape = tuple(output.shape[-2:])

    def capture(self, on_pyramid: Callable[[OrderedDict[str, Tensor]], None]) -> list:
        """Forward hooks that hand the encoder's levels of each forward, by name, to ``on_pyramid``; returns the
        handles (remove them when done)."""
        return self._hooks(lambda maps: on_pyramid(self.name_levels(maps)))

    def _hooks(self, on_maps: Callable[[list[Tensor]], None]) -> list:
        handles = []
        if self.model_type == "detr":
            handles.append(self.hf.model.input_projection.register_forward_hook(self._on_detr_projection))

        def on_encoder(module, args, kwargs, output) -> None:
            on_maps(self.encoder_maps(args, kwargs, output))

        handles.append(self.encoder.register_forward_hook(on_encoder, with_kwargs=True))
        return handles

    @property
    def strides(self) -> dict[str, int]:
        """Level name -> stride of the encoder's maps, read once (see :meth:`encoder_strides`)."""
        if self._strides is None:
            strides = self.encoder_strides()
            for s in strides:
                if s < 1 or 2 ** round(math.log2(s)) != s:
                    raise ValueError(f"{self.model_type}: an encoder level of stride {s} (not a power of 2)")
            self._strides = {f"p{round(math.log2(s))}": s for s in strides}
        return self._strides

    def encoder_strides(self) -> list[int]:
        """The encoder's level strides. RT-DETR, RT-DETRv2 and D-FINE state them (``feat_strides``); DETR's one
        level is the backbone's last map and Deformable DETR's are the backbone's maps plus stride-2 levels
        above them, read off a backbone forward of a blank image (convolutions only, so a model built on the
        meta device answers too)."""
        config = self.hf.config
        if self.model_type in ("rt_detr", "rt_detr_v2", "d_fine"):
            return [int(s) for s in config.feat_strides]
        probe = self.pixel_mean.new_zeros((1, 3, PROBE_PX, PROBE_PX))
        mask = torch.ones((1, PROBE_PX, PROBE_PX), dtype=torch.long, device=probe.device)
        with torch.no_grad():
            maps = [feature for feature, _ in self.hf.model.backbone(probe, mask)]
        strides = [PROBE_PX // int(m.shape[-1]) for m in maps]
        if self.model_type == "detr":
            return strides[-1:]
        while len(strides) < int(config.num_feature_levels):
            strides.append(strides[-1] * 2)
        return strides[: int(config.num_feature_levels)]

    @property
    def level_names(self) -> list[str]:
        return list(self.strides)

    @property
    def size_divisible(self) -> int:
        return max(32, max(self.strides.values()))

    @property
    def canvas_side(self) -> int | None:
        """``canvas`` rounded up to a multiple of :attr:`size_divisible` (None: pad to the batch only)."""
        if self.canvas is None:
            return None
        return math.ceil(self.canvas / self.size_divisible) * self.size_divisible

    def name_levels(self, maps: list[Tensor]) -> OrderedDict[str, Tensor]:
        if len(maps) != len(self.strides):
            raise ValueError(f"the encoder gave {len(maps)} levels, the probe read {len(self.strides)}")
        return OrderedDict(zip(self.level_names, maps, strict=True))

    def _run_encoder(self, pixels: Tensor, mask: Tensor) -> list[Tensor]:
        sink: list = []
        handles = self._hooks(sink.append)
        try:
            self.hf.model(pixel_values=pixels, pixel_mask=mask)
        finally:
            for handle in handles:
                handle.remove()
        return sink[-1]

    def pyramid(self, images: list[Tensor]) -> OrderedDict[str, Tensor]:
        """The encoder's levels by name for a list of images (the decoder runs too: it is the encoder's caller)."""
        pixels, mask, _ = self.prepare(images)
        return self.name_levels(self._run_encoder(pixels, mask))

    # --- detection -------------------------------------------------------------------------------------------
    def normalise(self, image: Tensor) -> Tensor:
        """A [0, 1] RGB image (3, h, w) as the model's image processor normalises it (eager and exported alike)."""
        return (image - self.pixel_mean) / self.pixel_std

    def prepare(self, images: list[Tensor]) -> tuple[Tensor, Tensor, list]:
        """[0, 1] RGB images -> the normalised, zero-padded batch, its pixel mask and each image's (h, w).

        The batch is padded to a multiple of the coarsest stride, and to at least the canvas (an image
        larger than the canvas widens the batch as it would without one)."""
        div = self.size_divisible
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        least = self.canvas_side or 0
        height = max(math.ceil(max(h for h, _ in sizes) / div) * div, least)
        width = max(math.ceil(max(w for _, w in sizes) / div) * div, least)
        batch = images[0].new_zeros((len(images), 3, height, width))
        mask = images[0].new_zeros((len(images), height, width), dtype=torch.long)
        for i, image in enumerate(images):
            h, w = sizes[i]
            batch[i, :, :h, :w] = self.normalise(image)
            mask[i, :h, :w] = 1
        return batch, mask, sizes

    def frames(self, batch: Tensor, sizes: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The (h, w) each image's normalised boxes are relative to: its own size for a mask-aware model,
        the padded batch otherwise (RT-DETR's positions ignore the mask)."""
        if self.family.mask_aware:
            return sizes
        return [(int(batch.shape[-2]), int(batch.shape[-1]))] * len(sizes)

    def labels(self, targets: list[dict[str, Tensor]], frames: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """detkd targets (xyxy pixels, labels 1..K) -> the model's (normalised cxcywh, class_labels 0..K-1)."""
        out = []
        for target, (h, w) in zip(targets, frames, strict=True):
            boxes = target["boxes"].float().reshape(-1, 4)
            scale = boxes.new_tensor([w, h, w, h])
            x0, y0, x1, y1 = (boxes / scale).unbind(-1)
            cxcywh = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)
            out.append({"class_labels": target["labels"].long() - 1, "boxes": cxcywh})
        return out

    @property
    def processor(self):
        """The model's image processor, built offline from its class defaults (its post-processing only)."""
        if self._processor is None:
            self._processor = getattr(import_transformers(), self.family.processor)()
        return self._processor

    def decode(self, outputs: Any, frames: list[tuple[int, int]] | Tensor, sizes: list[tuple[int, int]]) -> list[dict]:
        """The image processor's detections, best ``detections_per_img`` first, clamped to each image;
        ``frames`` (what the normalised boxes are relative to) may be an (N, 2) tensor (an export's graph)."""
        kwargs: dict[str, Any] = {"threshold": self.score_thresh, "target_sizes": frames}
        if self.family.processor == "RTDetrImageProcessor":
            kwargs["use_focal_loss"] = self.family.focal
        if self.family.processor == "DeformableDetrImageProcessor":
            kwargs["top_k"] = self.detections_per_img
        results = self.processor.post_process_object_detection(outputs, **kwargs)
        out = []
        for result, (h, w) in zip(results, sizes, strict=True):
            order = result["scores"].argsort(descending=True)[: self.detections_per_img]
            boxes = result["boxes"][order].clone()
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
            out.append({"boxes": boxes, "scores": result["scores"][order], "labels": result["labels"][order] + 1})
        return out

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        batch, mask, sizes = self.prepare(images)
        frames = self.frames(batch, sizes)
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            outputs = self.hf(pixel_values=batch, pixel_mask=mask, labels=self.labels(targets, frames))
            return loss_terms(outputs, self.hf.config)
        outputs = self.hf(pixel_values=batch, pixel_mask=mask)
        return self.decode(outputs, frames, sizes)

    @property
    def selects_queries(self) -> bool:
        return self.family.selects_queries

    def set_thresholds(self, *, score_thresh: float, detections_per_img: int) -> None:
        self.score_thresh = float(score_thresh)
        self.detections_per_img = int(detections_per_img)


def processor_normalisation(model_type: str, folder: Path | None) -> dict[str, list[float]]:
    """``{"mean", "std"}`` on the [0, 1] scale as the model's image processor normalises, or ``{}`` when it
    does not (RT-DETR only rescales): its folder's ``preprocessor_config.json`` when there is one, else the
    processor class's defaults."""
    transformers = import_transformers()
    settings: dict[str, Any] = {}
    if folder is not None and (folder / PROCESSOR_FILE).is_file():
        try:
            settings = json.loads((folder / PROCESSOR_FILE).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{folder / PROCESSOR_FILE}: not readable JSON ({exc})") from None
    defaults = getattr(transformers, FAMILIES[model_type].processor)
    if not settings.get("do_normalize", defaults.do_normalize):
        return {}
    return {
        "mean": [float(v) for v in settings.get("image_mean", defaults.image_mean)],
        "std": [float(v) for v in settings.get("image_std", defaults.image_std)],
    }


def build_hf_detector(
    *,
    hf_config: Mapping[str, Any],
    num_classes: int | None = None,
    source: str | None = None,
    pixel_norm: Mapping[str, list[float]] | None = None,
    canvas: int | None = None,
) -> HFDetector:
    """Build a ``transformers`` detector from its config data (:func:`read_hf_config`), random weights.

    ``num_classes`` (labels 1..K) replaces the config's class count; ``None`` keeps it (a teacher).
    ``pixel_norm`` is the input normalisation (``{}``: none); ``None`` reads it from the model's
    image processor (:func:`processor_normalisation`). Nothing is downloaded: the config's
    pretrained-backbone switches are turned off, and weights come from local files
    (:func:`fit_hf_weights`). ``canvas`` is the least square side every batch is padded to
    (:class:`HFDetector`). The result records ``detkd_config``, the keywords that rebuild it
    from a checkpoint alone.
    """
    transformers = import_transformers()
    data = dict(hf_config)
    classes = config_classes(data) if num_classes is None else int(num_classes)
    if classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {classes}")
    data = with_classes(data, classes)
    data["use_pretrained_backbone"] = False
    if isinstance(data.get("backbone_config"), dict):
        data["backbone_config"] = {**data["backbone_config"], "use_pretrained_backbone": False}
    model_type = data.pop("model_type")
    where = source or "hf_config"
    if model_type not in FAMILIES:
        raise ValueError(
            f"{where}: model_type {model_type!r} is not a detector detkd wraps; it wraps {sorted(FAMILIES)}"
        )
    try:
        config = transformers.AutoConfig.for_model(model_type, **data)
        hf = transformers.AutoModelForObjectDetection.from_config(config)
    except Exception as exc:  # transformers raises many kinds for a config it cannot build
        raise ValueError(f"{where}: transformers cannot build this {model_type}: {type(exc).__name__}: {exc}") from None
    if pixel_norm is None:
        folder = Path(source) if source and Path(source).is_dir() else (Path(source).parent if source else None)
        pixel_norm = processor_normalisation(model_type, folder)
    norm = {k: [float(v) for v in pixel_norm[k]] for k in ("mean", "std")} if pixel_norm else {}
    if canvas is not None and canvas < 1:
        raise ValueError(f"{where}: canvas must be a positive side in pixels, got {canvas}")
    model = HFDetector(hf=hf, image_mean=norm.get("mean"), image_std=norm.get("std"), source=source, canvas=canvas)
    model.detkd_config = dict(
        arch="hf",
        num_classes=classes,
        hf_config={**data, "model_type": model_type},
        source=source,
        pixel_norm=norm,
        canvas=canvas,
    )
    return model


def is_class_layer(own: torch.Size, theirs: torch.Size, *, classes: int, file_classes: int) -> bool:
    """A tensor whose only difference is the class count (K or K + 1 rows: DETR's "no object" slot, RT-DETR's
    denoising label embedding) is a class layer, re-initialised when the classes differ."""
    return (
        len(own) == len(theirs)
        and own[1:] == theirs[1:]
        and own[0] - classes in (0, 1)
        and theirs[0] - file_classes in (0, 1)
        and own[0] - classes == theirs[0] - file_classes
    )


@dataclass
class HFWeightsFit:
    loaded: list[str]
    reinitialised: list[str]  # class layers (the classes differ)


def read_pretrained(auto_class: Any, folder: Path, config: Any, *, what: str) -> tuple[nn.Module, dict[str, list]]:
    """transformers' own reading of a ``save_pretrained`` folder into a model of ``config`` (local files only;
    tensors of another shape are reported, not raised): (model, loading info)."""
    try:
        return auto_class.from_pretrained(
            str(folder), config=config, local_files_only=True, ignore_mismatched_sizes=True, output_loading_info=True
        )
    except Exception as exc:  # transformers raises OSError, ValueError, RuntimeError for unreadable folders
        raise ValueError(f"{folder}: transformers cannot read it as {what}: {type(exc).__name__}: {exc}") from None


def fit_hf_weights(model: HFDetector, folder: Path, *, strict: bool) -> HFWeightsFit:
    """Load a ``save_pretrained`` folder's weights into ``model.hf``; a folder of another network is refused
    naming both. ``strict`` (a teacher): every tensor must fit. Otherwise the class layers of a folder with
    other classes are left re-initialised (fine-tuning on the user's classes) and everything else must fit.

    transformers reads the folder (``from_pretrained`` with the model's own config, local files only):
    it knows the renamings between the names files were saved with and its current modules."""
    transformers = import_transformers()
    folder = Path(folder)
    if weights_file(folder) is None:
        raise ValueError(f"{folder}: no {WEIGHTS_FILE} (save_pretrained writes it beside {CONFIG_FILE})")
    theirs = config_classes(read_hf_config(folder))
    ours = int(model.detkd_config["num_classes"])
    what = f"the {model.model_type} of {model.source or 'its config'} ({ours} classes)"
    loaded, info = read_pretrained(transformers.AutoModelForObjectDetection, folder, model.hf.config, what=what)
    mismatched = {key: (tuple(file_shape), tuple(own_shape)) for key, file_shape, own_shape in info["mismatched_keys"]}
    classy = sorted(
        k for k, (file_shape, own_shape) in mismatched.items()
        if is_class_layer(torch.Size(own_shape), torch.Size(file_shape), classes=ours, file_classes=theirs)
    )  # fmt: skip
    wrong = sorted(k for k in mismatched if k not in classy or strict)
    missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
    if missing or unexpected or wrong:
        detail = [
            f"{len(missing)} of its tensors missing (e.g. {missing[:2]})" if missing else "",
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})" if unexpected else "",
            f"{len(wrong)} of another shape (e.g. {wrong[0]}: {mismatched[wrong[0]][0]} in the folder, "
            f"{mismatched[wrong[0]][1]} in the model)"
            if wrong
            else "",
        ]
        raise ValueError(
            f"{folder}: its weights ({theirs} classes) do not fit {what}: " + "; ".join(d for d in detail if d)
        )
    state = loaded.state_dict()
    model.hf.load_state_dict({k: v for k, v in state.items() if k not in classy}, strict=not classy)
    return HFWeightsFit(loaded=sorted(k for k in state if k not in classy), reinitialised=classy)
