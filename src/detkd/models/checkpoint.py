"""Detector checkpoints: one self-describing file, written atomically, loaded safely.

A checkpoint holds the builder keyword arguments next to the weights, so any
detkd detector (teacher or student) can be rebuilt from the file alone. Loading
always uses ``weights_only=True``; a SHA-256 of the file is stored beside it and
checked on load, so a truncated or corrupted file is refused, never half-used.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT = "detkd.detector/1"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file."""


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
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_payload(path: Path, payload: dict[str, Any]) -> str:
    """Serialise ``payload`` with torch.save, write it and its checksum atomically."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    digest = _sha256(data)
    atomic_write_bytes(Path(path), data)
    atomic_write_bytes(Path(f"{path}.sha256"), f"{digest}  {Path(path).name}\n".encode())
    return digest


def load_payload(path: Path, *, verify: bool = True) -> dict[str, Any]:
    """Read a payload written by :func:`save_payload`, refusing corrupt files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    data = path.read_bytes()
    sidecar = Path(f"{path}.sha256")
    if verify and sidecar.is_file():
        expected = sidecar.read_text().split()[0] if sidecar.read_text().strip() else ""
        if _sha256(data) != expected:
            raise CheckpointError(
                f"{path}: checksum mismatch (file is corrupted or truncated; expected {expected[:12]}...)"
            )
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for broken archives
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc})".splitlines()[0]
        ) from exc
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, found {type(payload).__name__}")
    return payload


def save_detector(path: Path, model: nn.Module, *, meta: dict[str, Any] | None = None) -> str:
    """Save a detector (unwrapped from DDP) with its builder config. Returns the SHA-256."""
    model = getattr(model, "module", model)
    payload = {
        "format": FORMAT,
        "model": dict(model.detkd_config),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": dict(meta or {}),
    }
    return save_payload(Path(path), payload)


def read_detector_payload(path: Path) -> dict[str, Any]:
    payload = load_payload(Path(path))
    if payload.get("format") != FORMAT or "model" not in payload or "state_dict" not in payload:
        raise CheckpointError(f"{path}: not a detkd detector checkpoint (format={payload.get('format')!r})")
    return payload


def load_detector(path: Path, **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the detector stored in ``path``; returns (model in eval mode, meta)."""
    from detkd.models.detectors import build_detector

    payload = read_detector_payload(Path(path))
    kwargs = {**payload["model"], **overrides, "weights": None, "backbone_weights": None}
    model = build_detector(**kwargs)
    _load_state(model, payload["state_dict"], Path(path))
    model.eval()
    return model, dict(payload.get("meta", {}))


def load_state_into(model: nn.Module, path: Path) -> None:
    """Load weights from a detkd checkpoint or a raw state dict into ``model``."""
    payload = load_payload(Path(path))
    state = payload["state_dict"] if "state_dict" in payload else payload
    _load_state(model, state, Path(path))


def _load_state(model: nn.Module, state: dict[str, Any], path: Path) -> None:
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k in own and hasattr(v, "shape") and own[k].shape != v.shape]
    if wrong:
        k = wrong[0]
        raise CheckpointError(
            f"{path}: shape mismatch for {k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
            f" ({len(wrong)} tensors differ)"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
