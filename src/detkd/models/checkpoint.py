"""Checkpoints that verify themselves, and the strict ways weights get into a detector.

Strict: a teacher, ``detkd evaluate`` and serving load a detkd checkpoint whole, a backbone file
fits its body whole. ``model.weights`` (a user's pretrained file, classes possibly other) goes
through ``detkd.models.pretrained``.

A checkpoint file is one header line and the ``torch.save`` bytes of a dict::

    DETKD-CHECKPOINT 2 sha256=<hex of the payload bytes> bytes=<payload length>\\n<payload>

so a copied file carries its own checksum: a flipped byte or a truncated copy is
refused on load with or without the ``<file>.sha256`` sidecar (the SHA-256 of the
whole file, for ``sha256sum -c``) that is still written beside it. Loading always
uses ``weights_only=True``; files are written atomically.

A detector checkpoint holds a :class:`~detkd.records.CheckpointMeta` next to the weights: its
format version, the validated network config and the run plan, so any detkd detector
(teacher or student) is rebuilt from the file alone, exactly as it was trained; a format
whose network this code cannot rebuild exactly is refused, naming the version.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from detkd.models.backbones import body_state_from_classifier
from detkd.models.detectors import (
    GroupNormFCOSHead,
    pyramid_backbone,
    rebuild_detector,
    single_scale,
    unwrap_model,
)
from detkd.models.mmdet_detector import MMDetDetector
from detkd.records import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, CheckpointMeta, InputSpec, RunPlan

FORMAT = f"{CHECKPOINT_FORMAT}/{CHECKPOINT_VERSION}"  # what this detkd writes
MAGIC = b"DETKD-CHECKPOINT"
HEADER_VERSION = 2
_HEADER = re.compile(rb"^DETKD-CHECKPOINT (\d+) sha256=([0-9a-f]{64}) bytes=(\d+)\n")
_MAX_HEADER = 160  # bytes: the header line is about 110


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file."""


def file_digest(path: Path) -> str:
    """SHA-256 of a file's contents (a checkpoint's embedded checksum covers the same bytes' payload)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.filename is None and exc.errno is not None:  # a failed write names no file: name the target
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_payload(path: Path, payload: dict[str, Any]) -> str:
    """Write header + ``torch.save(payload)`` and the ``.sha256`` sidecar, each atomically.

    Returns the SHA-256 of the whole file (the sidecar's value).
    """
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    body = buffer.getvalue()
    header = b"%s %d sha256=%s bytes=%d\n" % (MAGIC, HEADER_VERSION, _sha256(body).encode(), len(body))
    data = header + body
    digest = _sha256(data)
    atomic_write_bytes(Path(path), data)
    atomic_write_bytes(Path(f"{path}.sha256"), f"{digest}  {Path(path).name}\n".encode())
    return digest


def _check_sidecar(path: Path, data: bytes) -> bool:
    """True when a ``.sha256`` sidecar exists and matches; a mismatch raises.

    A sidecar cut short (its write interrupted: not a whole digest) beside a file that carries its own
    checksum is ignored; the file's header decides."""
    sidecar = Path(f"{path}.sha256")
    if not sidecar.is_file():
        return False
    text = sidecar.read_text(errors="replace").split()
    expected = text[0] if text else ""
    if data.startswith(MAGIC) and not re.fullmatch(r"[0-9a-f]{64}", expected):
        return False
    if _sha256(data) != expected:
        raise CheckpointError(
            f"{path}: checksum mismatch with {sidecar.name}: the file is corrupted or truncated"
            f" (expected {expected[:12]}...)"
        )
    return True


def _verified_body(path: Path, data: bytes) -> bytes:
    """The payload bytes after a header whose checksum and length they match."""
    newline = data.find(b"\n", 0, _MAX_HEADER)
    match = _HEADER.match(data[: newline + 1]) if newline >= 0 else None
    if match is None:
        raise CheckpointError(f"{path}: the file is corrupted: its checkpoint header is damaged or truncated")
    version, expected, length = int(match[1]), match[2].decode(), int(match[3])
    if version != HEADER_VERSION:
        raise CheckpointError(f"{path}: checkpoint header version {version}, this detkd reads {HEADER_VERSION}")
    body = data[match.end() :]
    if len(body) != length:
        raise CheckpointError(f"{path}: the file is corrupted: truncated ({len(body)} of {length} payload bytes)")
    if _sha256(body) != expected:
        raise CheckpointError(
            f"{path}: checksum mismatch: the file is corrupted (its contents do not match the checksum inside it)"
        )
    return body


def verified_bytes(path: Path, *, verify: bool = True) -> bytes:
    """The payload bytes of a checkpoint file, checked against its header and sidecar (see :func:`load_payload`);
    nothing is unpickled. A CheckpointError says what is wrong: missing, empty, truncated, or corrupted."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    data = path.read_bytes()
    if not data:
        raise CheckpointError(f"{path}: the file is empty (0 bytes): its write did not finish")
    if data.startswith(MAGIC):  # the header first: it says how much is missing from a file cut short
        body = _verified_body(path, data)
        _check_sidecar(path, data)
        return body
    if _check_sidecar(path, data) or not verify:
        return data
    raise CheckpointError(
        f"{path}: cannot be verified: it carries no checksum (an old-format or foreign file)"
        f" and no {path.name}.sha256 lies beside it"
    )


def load_payload(path: Path, *, verify: bool = True) -> dict[str, Any]:
    """Read a dict written by :func:`save_payload`, refusing corrupt or unverifiable files.

    A header's checksum and a sidecar's, when present, are always checked. A file
    without a header (the previous format) is accepted when its sidecar matches;
    without one it cannot be verified and is refused, unless ``verify=False``, which
    accepts such a plain ``torch.save`` file (e.g. a state dict from elsewhere).
    """
    path = Path(path)
    body = verified_bytes(path, verify=verify)
    try:
        payload = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for broken archives
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc})".splitlines()[0]
        ) from exc
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, found {type(payload).__name__}")
    return payload


def save_detector(path: Path, model: nn.Module, *, meta: dict[str, Any] | None = None) -> str:
    """Save a detector (unwrapped from DDP) with its :class:`CheckpointMeta`. Returns the file's SHA-256.

    ``meta`` is the flat meta dict (``plan``, ``name``, ``val/...``); the network config comes from the model.
    """
    model = unwrap_model(model)
    record = CheckpointMeta.from_meta_dict(
        dict(meta or {}), model=model.detkd_config, format_version=CHECKPOINT_VERSION
    )
    payload = {
        "format": record.format,
        "model": dict(record.model),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": record.meta_dict(),
    }
    return save_payload(Path(path), payload)


def read_detector_payload(path: Path) -> dict[str, Any]:
    """The payload of a detector checkpoint of a format this detkd reads (CheckpointError otherwise)."""
    payload = load_payload(Path(path))
    checkpoint_meta(path, payload)
    return payload


def checkpoint_meta(path: Path, payload: dict[str, Any]) -> CheckpointMeta:
    try:
        return CheckpointMeta.from_payload(payload)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def read_checkpoint_meta(path: Path) -> CheckpointMeta:
    return checkpoint_meta(path, load_payload(Path(path)))


def load_detector(
    path: Path, *, head_norm_groups: int | None = None, **overrides: Any
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the detector stored in ``path``; returns (model in eval mode, the flat meta dict).

    ``head_norm_groups`` sets an FCOS head's GroupNorm groups where the file cannot say them
    (a format-2 file of fpn_channels 32 from before ``model.design``: see :func:`refuse_unknown_head_groups`).
    """
    payload = load_payload(Path(path))
    meta = checkpoint_meta(path, payload)
    model = detector_from_meta(meta, path=Path(path), head_norm_groups=head_norm_groups, **overrides)
    _load_state(model, payload["state_dict"], Path(path))
    model.eval()
    return model, meta.meta_dict()


def detector_from_meta(
    meta: CheckpointMeta, *, path: Path, head_norm_groups: int | None = None, **overrides: Any
) -> nn.Module:
    """The network (no weights) a checkpoint was trained with; a CheckpointError when its format cannot say."""
    if head_norm_groups is None:
        refuse_unknown_head_groups(meta, path=path)
    try:
        model = rebuild_detector({**meta.model, **overrides})
    except ValueError as exc:
        raise CheckpointError(f"{path}: checkpoint format {meta.format}: cannot rebuild its model: {exc}") from None
    if head_norm_groups is not None:
        set_head_norm_groups(model, head_norm_groups)
    return model


def refuse_unknown_head_groups(meta: CheckpointMeta, *, path: Path) -> None:
    """Refuse a checkpoint whose FCOS head's GroupNorm group count its format does not determine.

    Before detkd 7bc5af0 (2026-11-22) an FCOS head had torchvision's GroupNorm(32) and fpn_channels
    had to be a multiple of 32; since, widths under 64 get two channels per group. So a format-2
    file of fpn_channels 32 has 32 or 16 groups, unless it names ``model["design"]`` (written from
    6422bd7 on, after the change). GroupNorm's weights have the same shape either way: loading
    such a file into today's head would silently change its predictions.
    """
    model = meta.model
    if meta.format_version != 2 or model.get("arch") != "fcos" or "design" in model:
        return
    if int(model["fpn_channels"]) == 32:
        raise CheckpointError(
            f"{path}: checkpoint format {meta.format} from before model.design existed, with an FCOS head over "
            "fpn_channels=32: its GroupNorm has 32 groups if written before 2026-11-22 (detkd 7bc5af0) and 16 "
            "after, and the file does not say which. Load it with load_detector(path, head_norm_groups=32 or 16), "
            "check its detections, and save it again (format 3 records its network)"
        )


def set_head_norm_groups(model: nn.Module, groups: int) -> None:
    """Set the GroupNorm group count of a detkd FCOS head (the weights do not depend on it)."""
    head = getattr(single_scale(model), "head", None)
    if not isinstance(head, GroupNormFCOSHead):
        raise CheckpointError(f"head_norm_groups applies to a standard FCOS head, not {type(head).__name__}")
    for module in head.modules():
        if isinstance(module, nn.GroupNorm):
            if module.num_channels % groups:
                raise CheckpointError(f"head_norm_groups={groups} does not divide {module.num_channels} channels")
            module.num_groups = groups


def backbone_state(path: Path, *, backbone: str) -> dict[str, Tensor]:
    """The body's tensors in a local torchvision file: a ``backbone`` classification state dict (its classifier
    dropped) or a torchvision detection state dict (its ``backbone.body``)."""
    path = Path(path)
    state = load_payload(path, verify=False)
    state = state.get("state_dict", state)
    if any(str(k).startswith("backbone.body.") for k in state):
        return {k.removeprefix("backbone.body."): v for k, v in state.items() if k.startswith("backbone.body.")}
    try:
        return body_state_from_classifier(backbone, state)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def load_backbone_weights(model: nn.Module, path: Path, *, backbone: str) -> None:
    """Load a local torchvision ``backbone`` state dict (:func:`backbone_state`) into the body, strictly."""
    body = pyramid_backbone(single_scale(model)).body
    _load_state(body, backbone_state(path, backbone=backbone), Path(path), what=f"a torchvision {backbone} body")


def check_backbone_weights(model: nn.Module, path: Path, *, backbone: str) -> None:
    """What :func:`load_backbone_weights` checks, against a model built on the meta device (nothing loaded)."""
    body = pyramid_backbone(single_scale(model)).body
    _check_state(
        body.state_dict(), backbone_state(path, backbone=backbone), Path(path), what=f"a torchvision {backbone} body"
    )


def load_state_into(model: nn.Module, path: Path) -> None:
    """Load weights from a detkd checkpoint or a raw state dict into ``model``.

    An MMDetection model also takes an MMDetection checkpoint (``{"meta", "state_dict"}``
    as its model zoo publishes them): those weights belong to the wrapped network.
    """
    model = unwrap_model(model)
    path = Path(path)
    if isinstance(model, MMDetDetector) and not is_detkd_checkpoint(path):
        load_mmdet_checkpoint(model, path)
        return
    payload = load_payload(path, verify=False)
    state = payload["state_dict"] if "state_dict" in payload else payload
    _load_state(model, state, path)


def is_detkd_checkpoint(path: Path) -> bool:
    """Whether ``path`` starts with detkd's checkpoint header (else: a foreign torch file)."""
    with open(path, "rb") as fh:
        return fh.read(len(MAGIC)) == MAGIC


def load_mmdet_checkpoint(model: MMDetDetector, path: Path) -> None:
    """Load an MMDetection checkpoint into the network its config built; a mismatch names both files."""
    path = Path(path)
    try:
        payload = load_payload(path, verify=False)
    except CheckpointError as exc:
        raise CheckpointError(
            f"{exc}. detkd loads weights only (torch.load weights_only=True): a full MMDetection training "
            "checkpoint that pickles its message hub or optimizer must be stripped to {'meta', 'state_dict'} "
            "first (MMDetection's tools/model_converters/publish_model.py does that)"
        ) from None
    state = payload.get("state_dict", payload)
    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, Tensor)}
    _load_state(model.mm, state, path, what=f"the model of MMDetection config {model.config_file}")


def load_teacher(path: Path, model_config: dict[str, Any]) -> nn.Module:
    """A teacher in eval mode: a detkd checkpoint, an MMDetection checkpoint for ``model_config``'s network, or
    a transformers ``save_pretrained`` folder."""
    path = Path(path)
    if path.is_dir():  # a transformers save_pretrained folder, every tensor checked
        from detkd.models.hf_detector import fit_hf_weights
        from detkd.models.vit_teacher import load_vit_weights

        model = rebuild_detector(model_config)
        try:
            if model_config.get("arch") == "vit":
                load_vit_weights(model, path)
            else:
                fit_hf_weights(model, path, strict=True)
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None
        return model.eval()
    if is_detkd_checkpoint(path):
        return load_detector(path)[0]
    model = rebuild_detector(model_config)
    load_state_into(model, path)
    return model.eval()


def _check_state(own: dict[str, Tensor], state: dict[str, Any], path: Path, *, what: str) -> None:
    """Refuse a state of other names or shapes than ``own`` (BatchNorm step counters aside: FrozenBatchNorm2d
    files have none)."""
    _refuse_misshapen(own, state, path, what=what)
    counter = "num_batches_tracked"
    missing = [k for k in own if k not in state and not k.endswith(counter)]
    unexpected = [k for k in state if k not in own and not k.endswith(counter)]
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not match {what}: missing {missing[:3]}, unexpected {unexpected[:3]}")


def _refuse_misshapen(own: dict[str, Tensor], state: dict[str, Any], path: Path, *, what: str) -> None:
    """Refuse a state with a tensor of another shape than the model's tensor of the same name."""
    wrong = [k for k, v in state.items() if k in own and isinstance(v, Tensor) and own[k].shape != v.shape]
    if wrong:
        k = wrong[0]
        raise CheckpointError(
            f"{path}: does not match {what}: shape mismatch for {k}: checkpoint {tuple(state[k].shape)}"
            f" vs model {tuple(own[k].shape)} ({len(wrong)} tensors differ)"
        )


def _load_state(model: nn.Module, state: dict[str, Any], path: Path, *, what: str = "the model") -> None:
    _refuse_misshapen(model.state_dict(), state, path, what=what)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not match {what}: missing {missing[:3]}, unexpected {unexpected[:3]}")


_FPN_BLOCK = re.compile(r"^backbone\.fpn\.(inner_blocks|layer_blocks)\.(\d+)\.")


def _by_level(key: str, fpn_levels: Sequence[int]) -> str:
    """Name FPN blocks by pyramid level (``inner_blocks.1.`` -> ``inner_blocks.p3.``); other keys unchanged."""
    match = _FPN_BLOCK.match(key)
    if match is None:
        return key
    return f"backbone.fpn.{match[1]}.p{fpn_levels[int(match[2])]}.{key[match.end() :]}"


def copy_matching_weights(target: nn.Module, source: nn.Module, *, prefixes: Sequence[str] | None = None) -> list[str]:
    """Copy every ``source`` tensor whose name and shape match one of ``target``; return the target keys.

    FPN blocks are matched by pyramid level, not position, so a P3-P7 teacher's P3 convs
    land in a P2-P6 student's P3 blocks. A multi-scale source gives its shared detector;
    the target must be a single-scale detector. With ``prefixes`` only target keys starting
    with one of them are considered (e.g. ``("backbone.fpn.", "head.")`` for MTPD's
    neck-and-head copy). This is MSAD's "initialise the student from the teacher".
    """
    target, source = unwrap_model(target), single_scale(source)
    if isinstance(target, MMDetDetector) or isinstance(source, MMDetDetector):
        return _copy_mmdet_weights(target, source, neck_and_head=prefixes is not None)
    target_levels = pyramid_backbone(target).fpn_levels
    source_levels = pyramid_backbone(source).fpn_levels
    source_state = {_by_level(k, source_levels): v for k, v in source.state_dict().items()}
    chosen: dict[str, Tensor] = {}
    for key, current in target.state_dict().items():
        if prefixes is not None and not key.startswith(tuple(prefixes)):
            continue
        value = source_state.get(_by_level(key, target_levels))
        if value is not None and value.shape == current.shape:
            chosen[key] = value
    if chosen:
        with torch.no_grad():
            target.load_state_dict(chosen, strict=False)
    return list(chosen)


def same_framework(a: nn.Module, b: nn.Module) -> bool:
    """Both MMDetection detectors, or both detkd's torchvision ones: weights can be copied by name."""
    return isinstance(single_scale(a), MMDetDetector) == isinstance(single_scale(b), MMDetDetector)


def _copy_mmdet_weights(target: nn.Module, source: nn.Module, *, neck_and_head: bool) -> list[str]:
    """Between two MMDetection detectors: every tensor of the same name and shape (neck and heads only)."""
    if not same_framework(target, source):
        raise ValueError(
            "init_from_teacher / copy_neck_head copy weights by name: the teacher and the student must both "
            "be MMDetection detectors or both detkd (torchvision) detectors"
        )
    heads = ("mm.neck.", "mm.bbox_head.", "mm.rpn_head.", "mm.roi_head.")
    source_state = source.state_dict()
    chosen = {
        key: source_state[key]
        for key, current in target.state_dict().items()
        if (not neck_and_head or key.startswith(heads))
        and key in source_state
        and source_state[key].shape == current.shape
    }
    if chosen:
        with torch.no_grad():
            target.load_state_dict(chosen, strict=False)
    return list(chosen)


def checkpoint_plan(path, meta: CheckpointMeta | dict[str, Any]) -> RunPlan:
    """The run plan a checkpoint stores (its input view, categories and config)."""
    plan = meta.plan if isinstance(meta, CheckpointMeta) else meta.get("plan")
    if plan is None:
        raise CheckpointError(f"{path}: the checkpoint stores no run plan, so its input view is unknown")
    return RunPlan.from_dict(plan)


def checkpoint_input(path, meta: CheckpointMeta | dict[str, Any]) -> InputSpec:
    """The input view a checkpoint was trained and validated with, from the run plan it stores."""
    return checkpoint_plan(path, meta).input
