"""Pretrained weights as users bring them: ``model.weights`` into a freshly built detector.

A file is a detkd checkpoint, a torchvision detection state dict in torchvision's own layout
(its older key layouts included), or, for ``arch: mmdet``, an MMDetection checkpoint. It is
matched to the model tensor by tensor, after its names are put in the model's terms (module
prefixes, FPN blocks by pyramid level, torchvision's pre-0.13 names, FCOS ``bbox_reg`` with or
without detkd's softplus):

* a tensor of the same name and shape is loaded;
* a class layer (a tensor whose shape follows the class count, found by building the network
  with one more class on the meta device) of another class count keeps the values the
  builder drew: it is re-initialised exactly as a model built without weights;
* any other tensor the file lacks or has in another shape is left at its initialisation, and
  file tensors the model has no place for are unused.

One log line (logger ``detkd.models``) says what was kept and what was not. A file that fits
poorly, with fewer than half the model's tensors found or more than half of its own tensors
unused, is refused with its first mismatches named. Class counts are detkd's, background
excluded: a torchvision COCO file (91 outputs) has 90 classes.

Frozen teachers, ``detkd evaluate`` and serving load detkd checkpoints strictly
(``detkd.models.checkpoint``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Size, Tensor, nn

from detkd.models.checkpoint import (
    CheckpointError,
    checkpoint_meta,
    file_digest,
    is_detkd_checkpoint,
    load_backbone_weights,
    load_payload,
)
from detkd.models.detectors import (
    build_detector_from_config,
    pyramid_backbone,
    rebuild_detector,
    single_scale,
    unwrap_model,
)
from detkd.models.hf_detector import HFDetector, fit_hf_weights, weights_file
from detkd.models.mmdet_detector import MMDetDetector
from detkd.models.multiscale import MultiScaleDetector
from detkd.models.torchvision_zoo import NOT_EXPRESSIBLE

if TYPE_CHECKING:
    from detkd.config import ModelConfig

log = logging.getLogger("detkd.models")

_COUNTERS = "num_batches_tracked"  # BatchNorm's step counter: FrozenBatchNorm2d files have none; never counted
_SHOWN = 3  # names per kind in the log line and the refusal


@dataclass(frozen=True)
class WeightsFile:
    """A weights file read for matching: its tensors, and the network a detkd checkpoint records."""

    path: Path
    state: dict[str, Tensor]
    network: dict[str, Any] | None = None  # a detkd checkpoint's ``model`` entry


def read_weights(path: Path) -> WeightsFile:
    """The tensors of ``path``: a detkd checkpoint (checksums verified) or a foreign ``torch.save`` file.

    Foreign files are read with ``weights_only=True``, memory-mapped when their format allows
    (shapes are all the driver's check reads); a ``.sha256`` sidecar beside one is verified.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    if is_detkd_checkpoint(path):
        payload = load_payload(path)
        meta = checkpoint_meta(path, payload)
        return WeightsFile(path, _tensors(payload["state_dict"]), dict(meta.model))
    _check_sidecar(path)
    try:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # files saved in torch's legacy (pre-1.6) format cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for broken or pickled-object files
        first = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise CheckpointError(
            f"{path}: not a readable weights file ({first}). detkd reads tensors only (torch.load "
            "weights_only=True): a training checkpoint that pickles other objects (an optimizer, argparse "
            "args, MMDetection's message hub) must be stripped to its state dict first (MMDetection's "
            "tools/model_converters/publish_model.py does that)"
        ) from None
    if not isinstance(payload, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found {type(payload).__name__}")
    state = payload.get("state_dict", payload)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: its state_dict entry is a {type(state).__name__}, not a state dict")
    tensors = _tensors(state)
    if tensors and all(k.startswith("module.") for k in tensors):  # saved from inside DistributedDataParallel
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    return WeightsFile(path, tensors)


def _tensors(state: Mapping[str, Any]) -> dict[str, Tensor]:
    return {str(k): v for k, v in state.items() if isinstance(v, Tensor)}


def _check_sidecar(path: Path) -> None:
    sidecar = Path(f"{path}.sha256")
    if not sidecar.is_file():
        return
    expected = (sidecar.read_text().split() or [""])[0]
    if file_digest(path) != expected:
        raise CheckpointError(f"{path}: checksum mismatch with {sidecar.name}: the file is corrupted or truncated")


# --- names in the model's terms ----------------------------------------------------------------------------------

# torchvision's own renames (its modules' _load_from_state_dict for files older than torchvision 0.13), detkd's
# softplus FCOS head (bbox_reg.0) and its torchvision twin (bbox_reg): applied to a file key only when the key is
# not in the model and the renamed one is.
_FPN_OLD = re.compile(r"^(.*backbone\.fpn\.(?:inner|layer)_blocks\.[^.]+)\.(weight|bias)$")
_RPN_OLD = re.compile(r"^(.*rpn\.head\.conv)\.(weight|bias)$")
_RETINA_OLD = re.compile(r"^(.*head\.(?:classification|regression)_head\.conv)\.(\d+)\.(weight|bias)$")
_FCOS_BARE = re.compile(r"^(.*head\.regression_head\.bbox_reg)\.(weight|bias)$")
_FCOS_SOFTPLUS = re.compile(r"^(.*head\.regression_head\.bbox_reg)\.0\.(weight|bias)$")


def _retina_v1(match: re.Match[str]) -> str | None:
    index = int(match[2])  # v1 heads: Sequential(conv, relu, conv, relu, ...): convs at even indices
    return f"{match[1]}.{index // 2}.0.{match[3]}" if index % 2 == 0 else None


_RENAMES: tuple[tuple[re.Pattern[str], Callable[[re.Match[str]], str | None]], ...] = (
    (_FPN_OLD, lambda m: f"{m[1]}.0.{m[2]}"),
    (_RPN_OLD, lambda m: f"{m[1]}.0.0.{m[2]}"),
    (_RETINA_OLD, _retina_v1),
    (_FCOS_BARE, lambda m: f"{m[1]}.0.{m[2]}"),
    (_FCOS_SOFTPLUS, lambda m: f"{m[1]}.{m[2]}"),
)
_FPN_BLOCK = re.compile(r"^(.*backbone\.fpn\.(?:inner|layer)_blocks\.)(\d+)\.(.*)$")


def _prefix(model: nn.Module) -> str:
    """Where the detector's own tensors sit in ``model``'s state dict."""
    if isinstance(model, MultiScaleDetector):
        return "detector."
    if isinstance(model, MMDetDetector):
        return "mm."
    return ""


def _file_prefix(keys: list[str]) -> str:
    for prefix in ("detector.", "mm."):
        if any(k.startswith(prefix) for k in keys):
            return prefix
    return ""


def _fpn_levels(model: nn.Module) -> tuple[int, ...] | None:
    try:
        return pyramid_backbone(single_scale(model)).fpn_levels
    except TypeError:  # MMDetection: its own names
        return None


def canonical_names(model: nn.Module, weights: WeightsFile, own: Mapping[str, Any]) -> dict[str, str]:
    """File key -> the model key it stands for (or a name the model does not have)."""
    model = unwrap_model(model)
    keys = list(weights.state)
    source, target = _file_prefix(keys), _prefix(model)
    out: dict[str, str] = {}
    for key in keys:
        name = key
        if source and name.startswith(source):
            name = target + name[len(source) :]
        elif not source:
            name = target + name
        out[key] = name
    out = _by_pyramid_level(out, model, weights)
    for key, name in out.items():
        if name in own:
            continue
        for pattern, rename in _RENAMES:
            match = pattern.match(name)
            renamed = rename(match) if match else None
            if renamed is not None and renamed in own:
                out[key] = renamed
                break
    return out


def _by_pyramid_level(names: dict[str, str], model: nn.Module, weights: WeightsFile) -> dict[str, str]:
    """FPN blocks matched by pyramid level, not position: a P3-P7 file's C3 block goes to a P2-P6 model's C3 block.

    A detkd checkpoint's top FPN input is C(min(max_level, 5)); a foreign file's is C5, as in every torchvision
    detector. A level the model does not have keeps a name no model tensor has.
    """
    model_levels = _fpn_levels(model)
    indices = {int(m[2]) for name in names.values() if (m := _FPN_BLOCK.match(name)) and "inner_blocks" in m[1]}
    if model_levels is None or not indices:
        return names
    top = 5
    if weights.network is not None and weights.network.get("arch") != "mmdet":
        top = min(int(weights.network.get("max_level", 5)), 5)
    count = max(indices) + 1
    level_of = {i: top - count + 1 + i for i in range(count)}
    out = {}
    for key, name in names.items():
        match = _FPN_BLOCK.match(name)
        if match is None or int(match[2]) not in level_of:
            out[key] = name
            continue
        level = level_of[int(match[2])]
        index = model_levels.index(level) if level in model_levels else f"[P{level}]"
        out[key] = f"{match[1]}{index}.{match[3]}"
    return out


# --- class layers -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassLaw:
    """A class layer's size along ``dim``: ``slope * num_classes + intercept`` (detkd's count, no background)."""

    dim: int
    slope: int
    intercept: int

    def classes(self, model_shape: Size, file_shape: Size) -> int | None:
        """The file's class count when its shape differs from the model's by the class count alone."""
        if len(file_shape) != len(model_shape):
            return None
        if any(a != b for d, (a, b) in enumerate(zip(file_shape, model_shape, strict=True)) if d != self.dim):
            return None
        count, rest = divmod(file_shape[self.dim] - self.intercept, self.slope)
        return count if rest == 0 and count >= 1 else None


def class_layers(model: nn.Module) -> dict[str, ClassLaw]:
    """The tensors whose shape follows the class count: the network built with one more class on the meta
    device differs there (cls_logits, Faster R-CNN's cls_score and per-class bbox_pred, MMDetection's heads)."""
    model = unwrap_model(model)
    config = getattr(model, "detkd_config", None)
    if not config or config.get("num_classes") is None:
        return {}
    classes = int(config["num_classes"])
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        wider = rebuild_detector({**config, "num_classes": classes + 1}).state_dict()
    laws = {}
    for key, value in model.state_dict().items():
        other = wider.get(key)
        if other is None or other.shape == value.shape or other.dim() != value.dim():
            continue
        dims = [d for d in range(value.dim()) if other.shape[d] != value.shape[d]]
        if len(dims) == 1:
            slope = other.shape[dims[0]] - value.shape[dims[0]]
            laws[key] = ClassLaw(dims[0], slope, value.shape[dims[0]] - slope * classes)
    return laws


# --- the match ----------------------------------------------------------------------------------------------------


def _shape(shape: Size) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _modules(keys: list[str]) -> list[str]:
    """``a.b.weight``, ``a.b.bias`` -> ``a.b`` (in order, once)."""
    return list(dict.fromkeys(k.rsplit(".", 1)[0] for k in keys))


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f" (+{len(names) - _SHOWN} more)" if len(names) > _SHOWN else "")


@dataclass(frozen=True)
class WeightsFit:
    """How a weights file meets a model: what loads, what is re-initialised, what is left or unused."""

    path: Path
    model_tensors: int
    file_tensors: int
    load: dict[str, str]  # model key -> file key, same shape
    reset: list[str]  # class layers (model keys) of another class count
    file_classes: int | None
    model_classes: int | None
    missing: list[str]  # model keys the file lacks
    misshapen: list[tuple[str, Size, Size]]  # (model key, file shape, model shape)
    unused: list[str]  # file keys with no model tensor of their name
    counters: dict[str, str] = field(default_factory=dict)  # BatchNorm step counters present on both sides
    problems: list[str] = field(default_factory=list)  # the model's missing and misshapen tensors, in its order

    @property
    def unused_total(self) -> int:
        """File tensors that go nowhere: unused names, misshapen tensors (class layers aside)."""
        return self.file_tensors - len(self.load) - len(self.reset)

    @property
    def fits(self) -> bool:
        return (
            self.file_tensors > 0
            and 2 * len(self.load) >= self.model_tensors
            and 2 * self.unused_total <= self.file_tensors
        )

    def summary(self) -> str:
        """The one line that says what was kept and what was not."""
        parts = [f"{self.path.name}: kept {len(self.load)} of {self.model_tensors} tensors"]
        if self.reset:
            classes = f"{self.file_classes} -> {self.model_classes} classes"
            parts.append(f"re-initialised {', '.join(_modules(self.reset))} ({classes})")
        if self.missing:
            parts.append(f"left at init, not in the file: {len(self.missing)} ({_listed(self.missing)})")
        if self.misshapen:
            shown = [f"{k} {_shape(f)} in the file, {_shape(m)} here" for k, f, m in self.misshapen]
            parts.append(f"left at init, other shape: {len(self.misshapen)} ({_listed(shown)})")
        if self.unused:
            parts.append(f"unused from the file: {len(self.unused)} ({_listed(self.unused)})")
        return "; ".join(parts)

    def refusal(self, what: str) -> str:
        first = self.problems[:_SHOWN] + [f"{k}: in the file, not in the model" for k in self.unused[:_SHOWN]]
        return (
            f"{self.path}: does not fit {what}: {len(self.load)} of its {self.model_tensors} tensors found in the "
            f"file with their shapes, {self.unused_total} of the file's {self.file_tensors} unused; first "
            f"mismatches: {'; '.join(first) or 'none'}. A file is loaded when at least half the model's tensors "
            "and half of its own fit; for a torchvision file, `detkd models torchvision-config NAME` prints the "
            "settings that build its network"
        )


def match_weights(model: nn.Module, weights: WeightsFile) -> WeightsFit:
    """Compare ``weights`` with ``model`` by name and shape (a meta-device model will do: nothing is loaded)."""
    model = unwrap_model(model)
    _refuse_known_misfits(weights)
    own = {k: v.shape for k, v in model.state_dict().items()}
    names = canonical_names(model, weights, own)
    by_name = {name: key for key, name in names.items()}
    laws = class_layers(model)
    config = getattr(model, "detkd_config", {}) or {}
    load: dict[str, str] = {}
    counters: dict[str, str] = {}
    reset, missing, misshapen, problems, file_classes = [], [], [], [], None
    for key, shape in own.items():
        file_key = by_name.get(key)
        if key.endswith(_COUNTERS):
            if file_key is not None and weights.state[file_key].shape == shape:
                counters[key] = file_key
            continue
        if file_key is None:
            missing.append(key)
            problems.append(f"{key}: not in the file")
            continue
        file_shape = weights.state[file_key].shape
        if file_shape == shape:
            load[key] = file_key
            continue
        law = laws.get(key)
        count = law.classes(shape, file_shape) if law else None
        if count is not None and file_classes in (None, count):
            file_classes = count
            reset.append(key)
        else:
            misshapen.append((key, file_shape, shape))
            problems.append(f"{key}: {_shape(file_shape)} in the file, {_shape(shape)} in the model")
    unused = [k for k, name in names.items() if name not in own and not k.endswith(_COUNTERS)]
    return WeightsFit(
        path=weights.path,
        model_tensors=sum(1 for k in own if not k.endswith(_COUNTERS)),
        file_tensors=sum(1 for k in weights.state if not k.endswith(_COUNTERS)),
        load=load,
        reset=reset,
        file_classes=file_classes,
        model_classes=config.get("num_classes"),
        missing=missing,
        misshapen=misshapen,
        unused=unused,
        counters=counters,
        problems=problems,
    )


def _refuse_known_misfits(weights: WeightsFile) -> None:
    """Files of torchvision detectors detkd cannot build, named instead of half-loaded."""
    keys = weights.state
    inner = {m[2] for k in keys if (m := _FPN_BLOCK.match(k)) and "inner_blocks" in m[1]}
    if "backbone.body.16.0.weight" in keys and len(inner) == 2 and "rpn.head.cls_logits.weight" in keys:
        name = "fasterrcnn_mobilenet_v3_large_fpn (or its _320_fpn twin)"
        raise CheckpointError(
            f"{weights.path}: a torchvision {name} file: {NOT_EXPRESSIBLE['fasterrcnn_mobilenet_v3_large_fpn']}"
        )


def _describe(model: nn.Module) -> str:
    config = getattr(unwrap_model(model), "detkd_config", None) or {}
    if config.get("arch") == "mmdet":
        return f"the model of MMDetection config {config.get('config_file') or 'mmdet_config'}"
    if config:
        return f"the model (arch {config.get('arch')}, backbone {config.get('backbone')})"
    return "the model"


def _refuse_poor_fit(fit: WeightsFit, model: nn.Module, weights: WeightsFile) -> None:
    if fit.fits:
        return
    message = fit.refusal(_describe(model))
    detector_parts = ("backbone.", "head.", "rpn.", "roi_heads.", "detector.", "mm.", "neck.", "bbox_head.")
    if not any(k.startswith(detector_parts) for k in weights.state):
        message += ". Its names are a classifier's, not a detector's: model.backbone_weights takes a backbone file"
    raise CheckpointError(message)


def check_weights(model: nn.Module, path: Path) -> WeightsFit:
    """Match ``path`` with ``model`` (e.g. built on the meta device) and refuse a poor fit, loading nothing."""
    weights = read_weights(Path(path))
    fit = match_weights(model, weights)
    _refuse_poor_fit(fit, model, weights)
    return fit


def load_weights(model: nn.Module, path: Path) -> WeightsFit:
    """Load the fitting tensors of ``path`` into ``model`` (freshly built: what is not loaded keeps the builder's
    initialisation) and log one line of what was kept; a poor fit raises :class:`CheckpointError`."""
    weights = read_weights(Path(path))
    fit = match_weights(model, weights)
    _refuse_poor_fit(fit, model, weights)
    chosen = {key: weights.state[file_key] for key, file_key in {**fit.load, **fit.counters}.items()}
    with torch.no_grad():
        unwrap_model(model).load_state_dict(chosen, strict=False)
    log.info(fit.summary())
    return fit


def build_model(cfg: ModelConfig, *, num_classes: int) -> nn.Module:
    """Build from the config, then load ``cfg.backbone_weights`` (strictly, into the body) and ``cfg.weights``
    (:func:`load_weights`) when set (local files only)."""
    model = build_detector_from_config(cfg, num_classes=num_classes)
    if isinstance(model, HFDetector) and weights_file(Path(cfg.hf_model)) is not None:
        fit = fit_hf_weights(model, Path(cfg.hf_model), strict=False)  # a save_pretrained folder: its weights
        fresh = f", class layers re-initialised for {num_classes} classes: {fit.reinitialised}"
        log.info(f"{cfg.hf_model}: {len(fit.loaded)} tensors loaded" + (fresh if fit.reinitialised else ""))
    if cfg.backbone_weights is not None:  # torchvision archs only (ModelConfig)
        load_backbone_weights(model, Path(cfg.backbone_weights), backbone=cfg.backbone)
    if cfg.weights is not None:
        load_weights(model, Path(cfg.weights))
    return model
