"""Checkpoints carry their checksum inside; weights are loaded only by detkd.models.checkpoint."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from factories import tiny_fcos

from detkd.config import ModelConfig
from detkd.models import CheckpointError, build_model, load_detector, save_detector
from detkd.models.checkpoint import FORMAT, MAGIC, load_payload, read_detector_payload, save_payload


def _model():
    return tiny_fcos(num_classes=2, max_level=5)


def _saved(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    model = _model()
    path = tmp_path / "model.pt"
    save_detector(path, model, meta={"role": "teacher"})
    return path, model


def _flip(path: Path, index: int) -> None:
    data = bytearray(path.read_bytes())
    data[index] ^= 0x55
    path.write_bytes(bytes(data))


def test_intact_file_loads_with_and_without_sidecar(tmp_path):
    path, model = _saved(tmp_path)
    assert path.read_bytes().startswith(MAGIC + b" 2 sha256=")
    loaded, meta = load_detector(path)
    assert meta == {"role": "teacher"}
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    Path(f"{path}.sha256").unlink()
    loaded, _ = load_detector(path)  # the file verifies itself
    assert read_detector_payload(path)["format"] == FORMAT == "detkd.detector/3"


@pytest.mark.parametrize("keep_sidecar", [True, False])
@pytest.mark.parametrize("where", [-10, 300])
def test_one_flipped_byte_is_refused(tmp_path, keep_sidecar, where):
    path, _ = _saved(tmp_path)
    if not keep_sidecar:
        Path(f"{path}.sha256").unlink()
    _flip(path, where)
    with pytest.raises(CheckpointError, match=f"{path}: checksum mismatch.*corrupted"):
        load_detector(path)


def test_flipped_byte_in_the_header_is_refused(tmp_path):
    path, _ = _saved(tmp_path)
    Path(f"{path}.sha256").unlink()
    _flip(path, 30)  # inside the recorded checksum
    with pytest.raises(CheckpointError, match=f"{path}: .*corrupted"):
        load_payload(path)


@pytest.mark.parametrize("keep", [40, 2000, -1])
def test_truncated_file_is_refused_without_sidecar(tmp_path, keep):
    path, _ = _saved(tmp_path)
    Path(f"{path}.sha256").unlink()
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(CheckpointError, match=f"{path}: .*corrupted"):
        load_payload(path)


def test_truncated_file_is_refused_with_sidecar(tmp_path):
    path, _ = _saved(tmp_path)
    length = len(path.read_bytes()) - path.read_bytes().index(b"\n") - 1
    path.write_bytes(path.read_bytes()[:-100])
    # the header says how much is missing (the sidecar would only say that the file differs)
    expected = rf"{path}: the file is corrupted: truncated \({length - 100} of {length}"
    with pytest.raises(CheckpointError, match=expected):
        load_payload(path)


def _old_format(path: Path, payload: dict, *, sidecar: bool) -> None:
    """The previous format: bare torch.save bytes, checksum only in the sidecar."""
    import hashlib

    buffer = io.BytesIO()
    torch.save(payload, buffer)
    path.write_bytes(buffer.getvalue())
    if sidecar:
        Path(f"{path}.sha256").write_text(f"{hashlib.sha256(buffer.getvalue()).hexdigest()}  {path.name}\n")


def test_previous_format_loads_only_with_a_matching_sidecar(tmp_path):
    path = tmp_path / "train_state.pt"
    _old_format(path, {"step": 3}, sidecar=True)
    assert load_payload(path) == {"step": 3}
    _flip(path, -10)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_payload(path)
    _old_format(path, {"step": 3}, sidecar=False)
    Path(f"{path}.sha256").unlink()
    with pytest.raises(CheckpointError, match=f"{path}: cannot be verified"):
        load_payload(path)


def test_payload_round_trip_and_sidecar_is_the_file_digest(tmp_path):
    import hashlib

    path = tmp_path / "state.pt"
    digest = save_payload(path, {"step": 7, "t": torch.arange(3)})
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert Path(f"{path}.sha256").read_text().split() == [digest, "state.pt"]
    payload = load_payload(path)
    assert payload["step"] == 7 and torch.equal(payload["t"], torch.arange(3))
    assert not list(tmp_path.glob(".state.pt.*"))  # no temp files left behind


def test_build_model_loads_detector_weights_from_checkpoint_or_raw_state_dict(tmp_path):
    path, model = _saved(tmp_path)
    cfg = ModelConfig(arch="fcos", backbone="tiny", min_level=3, max_level=5, fpn_channels=32, weights=path)
    built = build_model(cfg, num_classes=2)
    for key, value in model.state_dict().items():
        assert torch.equal(built.state_dict()[key], value), key
    raw = tmp_path / "raw.pt"
    torch.save(model.state_dict(), raw)  # a plain state dict from elsewhere: nothing to verify against
    built = build_model(cfg.model_copy(update={"weights": raw}), num_classes=2)
    assert torch.equal(
        built.state_dict()["head.classification_head.cls_logits.weight"],
        model.state_dict()["head.classification_head.cls_logits.weight"],
    )
    # a P2-P6 model takes the P3-P5 file's FPN blocks by level; its P2 blocks and P6 conv stay at init
    other = ModelConfig(arch="fcos", backbone="tiny", min_level=2, max_level=6, fpn_channels=32, weights=path)
    wider = build_model(other, num_classes=2).state_dict()
    source = model.state_dict()
    assert torch.equal(wider["backbone.fpn.inner_blocks.1.0.weight"], source["backbone.fpn.inner_blocks.0.0.weight"])
    assert torch.equal(wider["backbone.fpn.layer_blocks.3.0.bias"], source["backbone.fpn.layer_blocks.2.0.bias"])
    wrong = other.model_copy(update={"backbone": "resnet18"})
    with pytest.raises(CheckpointError, match=f"{path}: does not fit the model .*first mismatches: backbone.body"):
        build_model(wrong, num_classes=2)
    with pytest.raises(CheckpointError, match="missing.pt: weights file not found"):
        build_model(cfg.model_copy(update={"weights": tmp_path / "missing.pt"}), num_classes=2)


def test_build_model_loads_torchvision_classification_weights_into_the_body(tmp_path):
    from torchvision import models as tvm

    torch.manual_seed(1)
    classifier = tvm.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(classifier.state_dict(), path)
    cfg = ModelConfig(arch="retinanet", backbone="resnet18", fpn_channels=32, backbone_weights=path)
    model = build_model(cfg, num_classes=2)
    state = model.state_dict()
    assert torch.equal(state["backbone.body.conv1.weight"], classifier.conv1.weight)
    assert torch.equal(state["backbone.body.layer4.1.bn2.running_var"], classifier.layer4[1].bn2.running_var)

    mobile = tvm.mobilenet_v3_small(weights=None)
    mpath = tmp_path / "mnv3.pth"
    torch.save(mobile.state_dict(), mpath)
    ms = build_model(
        ModelConfig(
            arch="fcos", backbone="mobilenet_v3_small", fpn_channels=32, multiscale=True, backbone_weights=mpath
        ),
        num_classes=2,
    )
    assert torch.equal(ms.detector.backbone.body["0"][0].weight, mobile.features[0][0].weight)

    with pytest.raises(CheckpointError, match=f"{path}: does not match a torchvision resnet50"):
        build_model(cfg.model_copy(update={"backbone": "resnet50"}), num_classes=2)
    with pytest.raises(CheckpointError, match=f"{path}: the 'tiny' backbone has no classification weights"):
        build_model(cfg.model_copy(update={"backbone": "tiny", "arch": "fcos"}), num_classes=2)


def test_old_detector_format_is_refused_by_name(tmp_path):
    path = tmp_path / "old.pt"
    save_payload(path, {"format": "detkd.detector/1", "model": {}, "state_dict": {}})
    with pytest.raises(CheckpointError, match=f"{path}: checkpoint format detkd.detector/1 is not one"):
        load_detector(path)
