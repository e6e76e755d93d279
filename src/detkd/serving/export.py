"""Export a detkd checkpoint to ONNX or TorchScript, and run the exported file.

The exported graph is the whole detector for one prepared image: normalisation, padding,
backbone, FPN, head, box decoding and NMS. An FCOS exports to ONNX through
:class:`detkd.serving.export_graph.FCOSExportGraph`, the same computation with a fraction of the
nodes torchvision's traced forward has. Preparing the image (short-side resize to the
checkpoint's input view) and mapping boxes back to original pixels stay in
:class:`detkd.serving.predictor.Predictor`, so eager PyTorch, ONNX Runtime and TorchScript return the
same detections (``EXPORT_TOLERANCE_PX``) from the same code around the network.

The score threshold and detections-per-image cap are fixed in the exported graph; a
predictor over an exported file can only raise the threshold. The checkpoint's input view
and categories travel inside the file (ONNX metadata / TorchScript extra file), so the file
alone is enough to predict.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from detkd.extras import require

Format = Literal["onnx", "torchscript"]
FORMATS: tuple[str, ...] = ("onnx", "torchscript")
META_KEY = "detkd"  # ONNX metadata_props key / TorchScript extra file holding input view and categories
ONNX_OPSET = 17
EXPORT_SCORE_THRESH = 0.05  # torchvision's default: lower keeps many more candidates through NMS
EXPORT_TOLERANCE_PX = 0.01  # max box difference vs eager PyTorch measured on the tests' images (float32)


QUERY_TIES = (
    ". This model picks its queries by a top-k over the encoder's cells, and ONNX Runtime's top-k orders "
    "cells scored alike (ties) otherwise than PyTorch's; a barely trained model scores many cells alike "
    "(all cells of blank padding, or all cells at initialisation): train it longer"
)


class ExportError(ValueError):
    """A model that cannot be exported in the asked format; the message says why."""


class SingleImageDetector(nn.Module):
    """One prepared image (3, H, W, floats in [0, 1]) -> (boxes, scores, labels), the exported signature."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        output = self.detector([image])
        if isinstance(output, tuple):  # a scripted torchvision detector returns (losses, detections)
            output = output[1]
        detections = output[0]
        return detections["boxes"], detections["scores"], detections["labels"]


@dataclass
class ExportResult:
    path: Path
    format: str
    score_thresh: float
    detections_per_img: int
    max_box_difference_px: float  # exported vs eager, the largest over the probe images
    probe_images: int  # how many images the check ran (two for a fixed-canvas graph)


def export_detector(
    checkpoint: Path,
    *,
    format: Format,
    out: Path,
    score_thresh: float = EXPORT_SCORE_THRESH,
    detections_per_img: int = 100,
) -> ExportResult:
    """Write ``out`` atomically and check it against eager PyTorch on probe images (``probe_images``)."""
    from detkd.models.checkpoint import checkpoint_plan, load_detector
    from detkd.models.detectors import set_inference_thresholds

    if format not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    if format == "onnx":
        require("export", why="exporting to ONNX")
    checkpoint = Path(checkpoint)
    model, meta = load_detector(checkpoint)
    plan = checkpoint_plan(checkpoint, meta)
    if type(model).__name__ == "MultiScaleDetector":
        raise ExportError(
            f"{checkpoint}: the multi-scale MSAD teacher runs two resolutions and fuses them; "
            "it is a training-time teacher and is not exported (export its students)"
        )
    if type(model).__name__ == "MMDetDetector":
        raise ExportError(
            f"{checkpoint}: an MMDetection model; its NMS and RoIAlign are mmcv's compiled ops, which neither "
            "ONNX nor TorchScript export carries: deploy it with MMDeploy, or distill it into a detkd student "
            "and export that (its MLflow pyfunc serves it as it is)"
        )
    if type(model).__name__ == "HFDetector" and model.canvas is None:
        raise ExportError(
            f"{checkpoint}: a transformers {model.model_type} detector without a canvas (model.hf_canvas). Traced, "
            "its graph keeps the feature-map sizes of the image it was traced on, so detkd exports it at one fixed "
            "canvas that eager PyTorch pads to as well; this checkpoint pads each batch to its own size instead. "
            "Train it again with this detkd (the canvas is then the input view's largest side), or serve it with "
            "its MLflow pyfunc or the eager Predictor"
        )
    set_inference_thresholds(model, score_thresh=score_thresh, detections_per_img=detections_per_img)
    wrapper = export_module(model, format=format)
    info = {
        "format": format,
        "input": plan.input.to_dict(),
        "categories": [list(c) for c in plan.categories],
        "score_thresh": score_thresh,
        "detections_per_img": detections_per_img,
        "source_checkpoint": checkpoint.name,
        "model": plan.config.name,
    }
    if type(model).__name__ == "HFDetector":
        info["canvas"] = model.canvas_side
    probes = probe_images(plan.input, canvas=info.get("canvas"))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if format == "onnx":
            write_onnx(wrapper, probes[0], tmp, info)
        else:
            write_torchscript(wrapper, tmp, info)
        _, runner = load_export(tmp)
        difference = 0.0
        for probe in probes:
            with torch.inference_mode():  # against the eager detector, not the exported module
                expected = SingleImageDetector(model).eval()(probe)
            difference = max(difference, max_box_difference(expected, runner(probe)))
        if difference > EXPORT_TOLERANCE_PX:
            why = QUERY_TIES if getattr(model, "selects_queries", False) else ""
            raise ExportError(
                f"{checkpoint}: the {format} model's detections differ from PyTorch's (max box difference "
                f"{difference:.4g} px, tolerance {EXPORT_TOLERANCE_PX}){why}; nothing written to {out}"
            )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(out, format, score_thresh, detections_per_img, difference, len(probes))


def export_module(model: nn.Module, *, format: Format) -> nn.Module:
    """What gets exported: FCOS's lean graph for ONNX (``detkd.serving.export_graph``), a transformers detector
    on its fixed canvas (``detkd.serving.export_hf``), else the detector as it is."""
    from torchvision.models.detection import FCOS

    from detkd.models.hf_detector import HFDetector
    from detkd.serving.export_graph import FCOSExportGraph
    from detkd.serving.export_hf import HFExportGraph

    if isinstance(model, HFDetector):
        if format != "onnx":
            raise ExportError(
                f"a transformers {model.model_type} detector exports to ONNX only (its Python post-processing "
                "does not script); use --format onnx"
            )
        return HFExportGraph(model).eval()
    if format == "onnx" and isinstance(model, FCOS):
        return FCOSExportGraph(model).eval()
    return SingleImageDetector(model).eval()


def probe_images(spec: Any, *, canvas: int | None = None) -> list[Tensor]:
    """Deterministic non-square images at the model's input size, so dynamic height/width get exercised. A graph of
    a fixed canvas is checked on two sizes inside it: the canvas itself and a smaller non-square image, so a
    graph that kept one size's shapes fails the check."""
    generator = torch.Generator().manual_seed(0)
    height = spec.model_size
    if canvas is None:
        return [torch.rand(3, height, height + height // 2, generator=generator)]
    small = (max(16, canvas - 5), max(16, canvas - 13))
    return [torch.rand(3, canvas, canvas, generator=generator), torch.rand(3, *small, generator=generator)]


def write_onnx(wrapper: nn.Module, probe: Tensor, path: Path, info: dict[str, Any]) -> None:
    import onnx

    with warnings.catch_warnings():  # the tracer's notes on Python values in torchvision's postprocessing
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                wrapper,
                (probe,),
                str(path),
                dynamo=False,  # torchvision detectors export through the TorchScript-based exporter
                opset_version=ONNX_OPSET,
                input_names=["image"],
                output_names=["boxes", "scores", "labels"],
                dynamic_axes={
                    "image": {1: "height", 2: "width"},
                    "boxes": {0: "n"},
                    "scores": {0: "n"},
                    "labels": {0: "n"},
                },
            )
        except Exception as exc:  # the exporter raises many kinds; the user needs the model and the reason
            raise ExportError(f"ONNX export failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    wrapper.eval()  # torch.onnx.export restores the mode it found; keep eval for the check
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(info)
    onnx.save(proto, str(path))


def write_torchscript(wrapper: nn.Module, path: Path, info: dict[str, Any]) -> None:
    try:
        scripted = torch.jit.script(wrapper)
    except Exception as exc:
        raise ExportError(f"TorchScript export failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    torch.jit.save(scripted, str(path), _extra_files={META_KEY: json.dumps(info)})


def max_box_difference(expected: tuple[Tensor, ...], got: tuple[Tensor, ...]) -> float:
    if expected[0].shape != got[0].shape or not torch.equal(expected[2], got[2]):
        return float("inf")
    return float((expected[0] - got[0]).abs().max()) if expected[0].numel() else 0.0


Runner = Any  # callable: prepared image tensor -> (boxes, scores, labels)


def is_torchscript(path: Path) -> bool:
    """TorchScript files are zip archives; anything else is read as ONNX."""
    with open(path, "rb") as handle:
        return handle.read(2) == b"PK"


def read_info(path: Path) -> dict[str, Any]:
    """The input view, categories and baked thresholds stored in an exported file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such exported model")
    if is_torchscript(path):
        return load_export(path)[0]
    require("export", "onnx", why=f"reading {path} (not TorchScript: ONNX)")
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ExportError(f"{path}: neither a TorchScript archive nor an ONNX model ({exc})") from None
    return parse_info(path, next((p.value for p in proto.metadata_props if p.key == META_KEY), ""))


def parse_info(path: Path, text: str) -> dict[str, Any]:
    if not text:
        raise ExportError(f"{path}: not a detkd export (no '{META_KEY}' metadata)")
    return json.loads(text)


def load_export(path: Path, *, threads: int | None = None) -> tuple[dict[str, Any], Runner]:
    """The file's info and a callable running its graph: torch.jit, or ONNX Runtime on CPU (each loaded once)
    with ``threads`` intra-op threads (default: ``DETKD_ORT_THREADS``, else 1)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such exported model")
    if is_torchscript(path):
        files = {META_KEY: ""}
        module = torch.jit.load(str(path), _extra_files=files).eval()

        def run_script(image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            with torch.inference_mode():
                return module(image)

        return parse_info(path, files[META_KEY]), run_script
    require("export", "onnxruntime", why=f"running {path} (not TorchScript: ONNX)")
    import onnxruntime

    info = read_info(path)
    options = onnxruntime.SessionOptions()
    # One image per run of a small detector: a second intra-op thread (spinning between runs, beside
    # PyTorch's pool that prepares the images) made it 2.3x slower per image on 2 cores, not faster
    # (benchmarks/results/latency.md). DETKD_ORT_THREADS sets another count for bigger models.
    options.intra_op_num_threads = threads or int(os.environ.get("DETKD_ORT_THREADS", "1"))
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run_onnx(image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        boxes, scores, labels = session.run(None, {"image": image.contiguous().numpy()})
        return torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels)

    return info, run_onnx
