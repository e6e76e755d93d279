"""A frozen vision transformer (DINOv2, DINOv3, ViT) as a feature teacher: its patch tokens as one map.

Foundation backbones teach features, not boxes: ``ViTFeatureTeacher`` runs a Hugging Face
vision transformer on the batch (normalised as its image processor would, padded to a
multiple of the patch size), takes the patch tokens of the chosen ``layers`` (each through
the model's final LayerNorm, as its last layer is; their mean when several), drops the class
and register tokens, and reshapes them to one (N, C, H/patch, W/patch) map named ``vit`` of
stride ``patch_size`` (14 or 16). The Distiller pairs that map with the student level of the
nearest footprint and resamples it onto that level's grid, padding-aware
(``detkd.distill.align``).

Weights come from local folders only: a ``save_pretrained`` folder, or the names ``dinov2`` /
``dinov3`` looked up in the local Hugging Face cache (``DINO_MODELS``); nothing is downloaded.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from detkd.models.hf_detector import CONFIG_FILE, PROCESSOR_FILE, WEIGHTS_FILE, import_transformers, read_pretrained

VIT_TYPES = ("dinov2", "dinov2_with_registers", "dinov3_vit", "vit")
LEVEL = "vit"
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
# The published checkpoints the short names stand for, read from the local Hugging Face cache only.
DINO_MODELS = {"dinov2": "facebook/dinov2-small", "dinov3": "facebook/dinov3-vits16-pretrain-lvd1689m"}


def read_vit_config(path: Path) -> dict[str, Any]:
    """The config of a vision transformer (a ``save_pretrained`` folder, or its ``config.json``), refused naming it
    when it is not one detkd reads."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no such vision-transformer config (a save_pretrained folder, or its {CONFIG_FILE})"
        )
    file = path / CONFIG_FILE if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"{path}: no {CONFIG_FILE}; a vision transformer is a folder written by save_pretrained")
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file}: not a readable JSON model config ({exc})") from None
    kind = data.get("model_type") if isinstance(data, dict) else None
    if kind not in VIT_TYPES:
        raise ValueError(
            f"{file}: model_type {kind!r} is not a vision transformer detkd reads ({', '.join(VIT_TYPES)})"
        )
    return data


def backbone_folder(backbone: str) -> Path:
    """The local folder of ``distill.teachers[].backbone``: a folder as given, or ``dinov2``/``dinov3`` from the
    local Hugging Face cache (a clear error, and no download, when it is not there)."""
    if backbone not in DINO_MODELS:
        folder = Path(backbone).expanduser().resolve()
        if not folder.is_dir():
            raise ValueError(
                f"backbone {backbone!r}: no such folder (a save_pretrained folder of a vision transformer, or one "
                f"of {sorted(DINO_MODELS)} from the local Hugging Face cache); `detkd models pretrain-vit --out "
                f"{backbone}` pretrains a small one on your images"
            )
        return folder
    import_transformers()
    from huggingface_hub import snapshot_download

    repo = DINO_MODELS[backbone]
    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except Exception:  # huggingface_hub raises LocalEntryNotFoundError (and OSError kinds) when it is not cached
        raise ValueError(
            f"backbone {backbone!r} is {repo}, which is not in the local Hugging Face cache: download it where "
            f"there is internet (`huggingface-cli download {repo}`; DINOv3 needs its licence accepted on the Hub) "
            "or give the folder"
        ) from None


def vit_normalisation(folder: Path | None) -> dict[str, list[float]]:
    """The folder's image-processor mean and std (``preprocessor_config.json``), else ImageNet's."""
    if folder is not None and (Path(folder) / PROCESSOR_FILE).is_file():
        try:
            settings = json.loads((Path(folder) / PROCESSOR_FILE).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{Path(folder) / PROCESSOR_FILE}: not readable JSON ({exc})") from None
        if not settings.get("do_normalize", True):
            return {}
        return {k: [float(v) for v in settings.get(f"image_{k}", IMAGENET[k])] for k in ("mean", "std")}
    return dict(IMAGENET)


class ViTFeatureTeacher(nn.Module):
    """A vision transformer (``self.vit``) whose patch tokens are a one-level pyramid (see the module)."""

    def __init__(self, *, vit: nn.Module, layers: Sequence[int], pixel_norm: Mapping[str, list[float]]) -> None:
        super().__init__()
        self.vit = vit
        config = vit.config
        depth = int(config.num_hidden_layers)
        for layer in layers:
            if not -depth <= layer < depth:
                raise ValueError(f"layers: {layer} is not a block of this {depth}-block {config.model_type}")
        self.layers = [int(k) for k in layers]
        patch = config.patch_size
        self.patch = int(patch[0] if isinstance(patch, (list, tuple)) else patch)
        self.out_channels = int(config.hidden_size)
        self.skip_tokens = 1 + int(getattr(config, "num_register_tokens", 0) or 0)  # class token, then registers
        self.norm = getattr(vit, "layernorm", None) or getattr(vit, "norm", None)
        mean, std = pixel_norm.get("mean", [0.0] * 3), pixel_norm.get("std", [1.0] * 3)
        self.register_buffer("pixel_mean", torch.tensor(mean).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(3, 1, 1), persistent=False)

    @property
    def strides(self) -> dict[str, int]:
        return {LEVEL: self.patch}

    def prepare(self, images: list[Tensor]) -> Tensor:
        """[0, 1] RGB images -> the normalised batch, zero-padded (the mean colour) to a multiple of the patch."""
        height = -(-max(int(im.shape[-2]) for im in images) // self.patch) * self.patch
        width = -(-max(int(im.shape[-1]) for im in images) // self.patch) * self.patch
        batch = images[0].new_zeros((len(images), 3, height, width))
        for i, image in enumerate(images):
            batch[i, :, : image.shape[-2], : image.shape[-1]] = (image - self.pixel_mean) / self.pixel_std
        return batch

    def pyramid(self, images: list[Tensor]) -> OrderedDict[str, Tensor]:
        batch = self.prepare(images)
        kwargs = {"interpolate_pos_encoding": True} if self.vit.config.model_type == "vit" else {}
        outputs = self.vit(pixel_values=batch, output_hidden_states=True, **kwargs)
        hidden = outputs.hidden_states[1:]  # the blocks' outputs (index 0 is the patch embedding)
        tokens = [self.norm(hidden[k]) if self.norm is not None else hidden[k] for k in self.layers]
        patches = torch.stack(tokens).mean(0)[:, self.skip_tokens :]
        n, _, channels = patches.shape
        rows, cols = batch.shape[-2] // self.patch, batch.shape[-1] // self.patch
        if patches.shape[1] != rows * cols:
            raise RuntimeError(
                f"{self.vit.config.model_type}: {patches.shape[1]} patch tokens for a {rows}x{cols} grid "
                f"(after dropping {self.skip_tokens} class/register tokens)"
            )
        return OrderedDict([(LEVEL, patches.transpose(1, 2).reshape(n, channels, rows, cols))])

    def forward(self, images: list[Tensor], targets: Any = None):
        raise TypeError("a backbone teacher gives features only (extract_features), it does not detect")


def build_vit_teacher(
    *,
    hf_config: Mapping[str, Any],
    layers: Sequence[int] = (-1,),
    source: str | None = None,
    pixel_norm: Mapping[str, list[float]] | None = None,
) -> ViTFeatureTeacher:
    """A vision transformer from its config data (random weights; :func:`load_vit_weights` fills them)."""
    transformers = import_transformers()
    data = dict(hf_config)
    model_type = data.pop("model_type")
    if model_type not in VIT_TYPES:
        raise ValueError(f"{source or 'hf_config'}: model_type {model_type!r} is not one of {', '.join(VIT_TYPES)}")
    try:
        config = transformers.AutoConfig.for_model(model_type, **data)
        vit = transformers.AutoModel.from_config(config)
    except Exception as exc:  # transformers raises many kinds for a config it cannot build
        raise ValueError(f"{source or 'hf_config'}: transformers cannot build this {model_type}: {exc}") from None
    if pixel_norm is None:
        pixel_norm = vit_normalisation(Path(source) if source else None)
    model = ViTFeatureTeacher(vit=vit, layers=layers, pixel_norm=pixel_norm)
    model.detkd_config = dict(
        arch="vit",
        hf_config={**data, "model_type": model_type},
        layers=list(model.layers),
        source=source,
        pixel_norm=dict(pixel_norm),
    )
    return model


def load_vit_weights(model: ViTFeatureTeacher, folder: Path) -> None:
    """Every tensor of the folder's ``model.safetensors`` into ``model.vit`` (transformers reads it, local files
    only); anything missing, unexpected or of another shape is refused naming the folder."""
    transformers = import_transformers()
    folder = Path(folder)
    if not (folder / WEIGHTS_FILE).is_file():
        raise ValueError(f"{folder}: no {WEIGHTS_FILE}; a backbone teacher needs trained weights")
    what = f"a {model.vit.config.model_type}"
    loaded, info = read_pretrained(transformers.AutoModel, folder, model.vit.config, what=what)
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        detail = "; ".join(f"{k.replace('_', ' ')}: {sorted(map(str, v))[:2]}" for k, v in problems.items())
        raise ValueError(f"{folder}: its weights do not fit its {model.vit.config.model_type} config: {detail}")
    model.vit.load_state_dict(loaded.state_dict())
