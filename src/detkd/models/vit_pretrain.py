"""DINO self-distillation of a small vision transformer on unlabelled images: a foundation-backbone stand-in.

A backbone teacher with random weights teaches nothing, and the published DINOv2/DINOv3 weights are
not always at hand, so ``pretrain_vit`` pretrains a ViT from its config on the user's own images with
the recipe of Caron et al. 2021 ("Emerging Properties in Self-Supervised Vision Transformers"): a
student and a teacher of the same architecture, each a backbone plus a projection head (3-layer MLP,
L2-normalised bottleneck, weight-normalised prototype layer); the teacher is an exponential moving
average of the student (momentum rising from 0.996 to 1 on a cosine); the teacher's outputs are
centred (the centre is an EMA of their batch mean) and sharpened (a low temperature), which together
keep the outputs from collapsing to one prototype or to the uniform distribution; the student sees
every multi-crop view (2 global, a few small local ones) and is trained to predict, with cross-entropy,
the teacher's distribution on each *other* global view. The head input is the class token.

The result is a ``save_pretrained`` folder of the teacher backbone (``config.json``,
``model.safetensors``), a ``preprocessor_config.json`` with the mean and std the images were
normalised with (``detkd.models.vit_teacher.vit_normalisation`` reads it), ``pretrain.json`` (settings,
images, per-epoch loss and collapse statistics, seconds) and ``pretrain_loss.png``. The folder is
written beside ``out`` and renamed onto it, so a failed run leaves nothing half-written.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from detkd.data.image_files import IMG_FORMATS, is_image_file
from detkd.models.hf_detector import PROCESSOR_FILE, import_transformers
from detkd.models.vit_teacher import IMAGENET, read_vit_config

log = logging.getLogger(__name__)

RECORD_FILE = "pretrain.json"
PLOT_FILE = "pretrain_loss.png"


@dataclass(frozen=True)
class PretrainSettings:
    """The recipe's knobs; the defaults suit a 48-wide, 3-block ViT on a thousand 128 px images."""

    epochs: int = 50
    size: int = 112  # global crop side, a multiple of the patch size
    local_crops: int = 4  # local crops at half the global side (rounded to the patch)
    global_scale: tuple[float, float] = (0.35, 1.0)
    local_scale: tuple[float, float] = (0.1, 0.35)
    batch_size: int = 64
    lr: float = 1e-3  # peak AdamW learning rate, after a linear warmup; cosine decay to min_lr
    min_lr: float = 1e-5
    warmup_epochs: int = 3
    weight_decay: float = 0.04  # on weight matrices only, not on biases and norms
    clip_grad_norm: float = 3.0
    prototypes: int = 256  # K, the output dimension of the head
    head_hidden: int = 256
    bottleneck: int = 64
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    center_momentum: float = 0.9
    teacher_momentum: float = 0.996  # start of the cosine rise to 1
    seed: int = 0


class DINOHead(nn.Module):
    """Projection head: MLP -> L2-normalised bottleneck -> prototype layer with unit-norm rows (weight
    normalisation with its gain fixed at 1, as in the paper), so the logits are cosine similarities."""

    def __init__(self, *, in_dim: int, hidden: int, bottleneck: int, prototypes: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, bottleneck)
        )
        self.prototypes = nn.Parameter(torch.randn(prototypes, bottleneck) * bottleneck**-0.5)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.normalize(self.mlp(x), dim=-1), F.normalize(self.prototypes, dim=-1))


class DINONetwork(nn.Module):
    """A backbone and its head: the class token of each view through the head."""

    def __init__(self, *, backbone: nn.Module, head: DINOHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self._kwargs = {"interpolate_pos_encoding": True} if backbone.config.model_type == "vit" else {}

    def forward(self, views: list[Tensor]) -> list[Tensor]:
        # One backbone call per crop size (the sizes differ in token count), then split back per view.
        out: list[Tensor] = []
        start = 0
        while start < len(views):
            end = start
            while end < len(views) and views[end].shape == views[start].shape:
                end += 1
            batch = torch.cat(views[start:end])
            cls = self.backbone(pixel_values=batch, **self._kwargs).last_hidden_state[:, 0]
            out.extend(self.head(cls).chunk(end - start))
            start = end
        return out


def find_images(*, folder: Path) -> list[Path]:
    """Every image file under ``folder`` (the suffixes the YOLO reader searches for), recursively, sorted so a
    seed means the same order everywhere."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such image folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p))
    if not files:
        raise ValueError(f"{folder}: no images ({', '.join(sorted(IMG_FORMATS))}) under it")
    return files


def build_vit(*, hf_config: dict[str, Any], seed: int) -> nn.Module:
    """A randomly initialised transformers backbone of this config (seeded: the same seed, the same weights)."""
    transformers = import_transformers()
    data = dict(hf_config)
    model_type = data.pop("model_type")
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(model_type, **data)
    return transformers.AutoModel.from_config(config)


class MultiCrop:
    """The views of one image: 2 global crops and ``local_crops`` half-size ones, each flipped, colour-jittered
    and blurred at random, then normalised. Crop sides are multiples of the patch, so no token is padding."""

    def __init__(self, *, settings: PretrainSettings, patch: int, mean: list[float], std: list[float]) -> None:
        from torchvision.transforms import v2

        size = settings.size
        if size % patch or size < 2 * patch:
            raise ValueError(f"size {size}: the global crop side must be a multiple of the patch size {patch}, >= 2x")
        local = max(patch, round(size / 2 / patch) * patch)

        def view(side: int, scale: tuple[float, float], blur: float) -> Any:
            return v2.Compose([
                v2.RandomResizedCrop(side, scale=scale, antialias=True),
                v2.RandomHorizontalFlip(),
                v2.RandomApply([v2.ColorJitter(0.3, 0.3, 0.2)], p=0.8),  # no hue: 40x the cost of the rest
                v2.RandomGrayscale(p=0.1),
                v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 1.5))], p=blur),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean, std),
            ])  # fmt: skip

        self.global_view = view(size, settings.global_scale, 0.5)
        self.local_view = view(local, settings.local_scale, 0.3)
        self.local_crops = settings.local_crops
        self.local_size = local

    def __call__(self, images: list[Tensor]) -> list[Tensor]:
        """uint8 (3, H, W) images -> one (B, 3, s, s) batch per view: the 2 global views first."""
        views = [self.global_view] * 2 + [self.local_view] * self.local_crops
        return [torch.stack([view(image) for image in images]) for view in views]


def dino_loss(
    *, student: list[Tensor], teacher: list[Tensor], center: Tensor, student_temp: float, teacher_temp: float
) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy of each student view against the centred, sharpened teacher distribution of every *other*
    global view, averaged over the pairs; with the statistics that show collapse (see ``pretrain_vit``)."""
    targets = [F.softmax((t - center) / teacher_temp, dim=-1) for t in teacher]
    log_probs = [F.log_softmax(s / student_temp, dim=-1) for s in student]
    total, kl, pairs = student[0].new_zeros(()), 0.0, 0
    for i, q in enumerate(targets):
        for v, log_p in enumerate(log_probs):
            if v == i:  # a global view is not asked to predict itself
                continue
            ce = -(q * log_p).sum(-1).mean()
            total = total + ce
            with torch.no_grad():
                kl += float((q * (q.clamp_min(1e-12).log() - log_p)).sum(-1).mean())
            pairs += 1
    q = torch.cat(targets).detach()
    stats = {
        "teacher_entropy": float(-(q * q.clamp_min(1e-12).log()).sum(-1).mean()),
        "batch_entropy": float(-(q.mean(0) * q.mean(0).clamp_min(1e-12).log()).sum()),
        "kl_teacher_student": kl / pairs,
    }
    return total / pairs, stats


def cosine(*, step: int, total: int, start: float, end: float) -> float:
    """``start`` at step 0 to ``end`` at ``total`` on a half cosine (the paper's schedule for lr and momentum)."""
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


def load_images(*, files: list[Path]) -> list[Tensor]:
    """The images as uint8 (3, H, W) RGB tensors, decoded once (a small set fits in memory)."""
    out = []
    for file in files:
        try:
            with Image.open(file) as image:
                rgb = image.convert("RGB")
        except OSError as exc:
            raise ValueError(f"{file}: not a readable image ({exc})") from None
        out.append(torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1))
    return out


def pretrain_vit(
    *,
    config: Path,
    images: list[Path],
    out: Path,
    settings: PretrainSettings,
    image_source: str,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Pretrain the ViT of ``config`` on ``images`` (see the module) and write its teacher folder to ``out``.

    Collapse shows in ``pretrain.json``'s per-epoch statistics: ``teacher_entropy`` (of each teacher
    distribution; ``log K`` means every output is uniform) and ``batch_entropy`` (of their batch mean; 0
    means every image maps to the same prototype); a healthy run keeps the first well below ``log K`` and
    the second well above 0. Returns the record."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists (pass --overwrite to replace it)")
    if not images:
        raise ValueError(f"{image_source}: no images to pretrain on")
    hf_config = read_vit_config(config)
    began = time.perf_counter()
    student_backbone = build_vit(hf_config=hf_config, seed=settings.seed)
    vit_config = student_backbone.config
    patch = int(vit_config.patch_size[0] if isinstance(vit_config.patch_size, (list, tuple)) else vit_config.patch_size)
    norm = dict(IMAGENET)
    crops = MultiCrop(settings=settings, patch=patch, mean=norm["mean"], std=norm["std"])
    pixels = load_images(files=images)
    head = DINOHead(
        in_dim=int(vit_config.hidden_size), hidden=settings.head_hidden, bottleneck=settings.bottleneck,
        prototypes=settings.prototypes,
    )  # fmt: skip
    student = DINONetwork(backbone=student_backbone, head=head)
    teacher = copy.deepcopy(student).requires_grad_(False)
    center = torch.zeros(settings.prototypes)
    decay = [p for p in student.parameters() if p.ndim >= 2]
    no_decay = [p for p in student.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
    )
    batch = min(settings.batch_size, len(pixels))
    steps_per_epoch = len(pixels) // batch
    total = settings.epochs * steps_per_epoch
    warmup = min(settings.warmup_epochs * steps_per_epoch, total // 2)
    generator = torch.Generator().manual_seed(settings.seed)
    log.info(
        "DINO pretraining of a %s (%d blocks, width %d) on %d images: %d epochs of %d steps, crops %d/%d px",
        vit_config.model_type, vit_config.num_hidden_layers, vit_config.hidden_size, len(pixels), settings.epochs,
        steps_per_epoch, settings.size, crops.local_size,
    )  # fmt: skip
    epochs: list[dict[str, float]] = []
    step = 0
    for epoch in range(1, settings.epochs + 1):
        started = time.perf_counter()
        order = torch.randperm(len(pixels), generator=generator)
        sums: dict[str, float] = {}
        for k in range(steps_per_epoch):
            lr = settings.lr * (step + 1) / warmup if step < warmup else cosine(
                step=step - warmup, total=total - warmup, start=settings.lr, end=settings.min_lr
            )  # fmt: skip
            for group in optimizer.param_groups:
                group["lr"] = lr
            views = crops([pixels[int(i)] for i in order[k * batch : (k + 1) * batch]])
            with torch.no_grad():
                targets = teacher(views[:2])
            loss, stats = dino_loss(
                student=student(views), teacher=targets, center=center,
                student_temp=settings.student_temp, teacher_temp=settings.teacher_temp,
            )  # fmt: skip
            if not torch.isfinite(loss):
                raise FloatingPointError(f"DINO loss is {loss.item()} at epoch {epoch}, step {k + 1}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(student.parameters(), settings.clip_grad_norm)
            optimizer.step()
            momentum = cosine(step=step, total=total, start=settings.teacher_momentum, end=1.0)
            with torch.no_grad():
                for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
                    t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)
                batch_center = torch.cat(targets).mean(0)
                center.mul_(settings.center_momentum).add_(batch_center, alpha=1 - settings.center_momentum)
            for key, value in {"loss": loss.item(), **stats}.items():
                sums[key] = sums.get(key, 0.0) + value
            step += 1
        row = {"epoch": epoch, **{k: v / steps_per_epoch for k, v in sums.items()}}
        row.update(lr=lr, momentum=momentum, seconds=time.perf_counter() - started)
        epochs.append(row)
        log.info(
            "epoch %d/%d loss %.4f teacher entropy %.3f batch entropy %.3f (log K %.3f) KL %.4f %.1fs",
            epoch, settings.epochs, row["loss"], row["teacher_entropy"], row["batch_entropy"],
            math.log(settings.prototypes), row["kl_teacher_student"], row["seconds"],
        )  # fmt: skip
    record = {
        "method": "DINO self-distillation (Caron et al. 2021); the saved backbone is the EMA teacher",
        "config": str(config),
        "model_type": vit_config.model_type,
        "settings": {**asdict(settings), "local_size": crops.local_size},
        "seed": settings.seed,
        "image_source": image_source,
        "images": len(images),
        "image_files": [str(p) for p in images],
        "log_prototypes": math.log(settings.prototypes),
        "epochs": epochs,
        "seconds": time.perf_counter() - began,
        "loss_fell": bool(epochs[-1]["loss"] < epochs[0]["loss"]),
    }
    _write_folder(backbone=teacher.backbone, norm=norm, record=record, out=out, overwrite=overwrite)
    log.info("wrote %s (%.0f s)", out, record["seconds"])
    return record


def _write_folder(
    *, backbone: nn.Module, norm: dict[str, list[float]], record: dict[str, Any], out: Path, overwrite: bool
) -> None:
    """Everything into a temporary folder beside ``out``, then renamed onto it (the old one removed last)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        backbone.save_pretrained(str(tmp), safe_serialization=True)
        processor = {
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": norm["mean"], "image_std": norm["std"],
        }  # fmt: skip
        (tmp / PROCESSOR_FILE).write_text(json.dumps(processor, indent=1))
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=1))
        _plot(record=record, path=tmp / PLOT_FILE)
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            if not overwrite:
                raise FileExistsError(f"{out}: already exists (pass --overwrite to replace it)")
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _plot(*, record: dict[str, Any], path: Path) -> None:
    """Loss and teacher entropies per epoch: a glance shows whether it learned and whether it collapsed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["epochs"]
    x = [r["epoch"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    left.plot(x, [r["loss"] for r in rows], marker=".")
    left.set(xlabel="epoch", ylabel="DINO loss (cross-entropy)", title="loss")
    right.plot(x, [r["teacher_entropy"] for r in rows], label="teacher entropy")
    right.plot(x, [r["batch_entropy"] for r in rows], label="entropy of batch mean")
    right.axhline(record["log_prototypes"], color="grey", linestyle=":", label="log K (uniform)")
    right.set(xlabel="epoch", ylabel="nats", title="collapse check")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
