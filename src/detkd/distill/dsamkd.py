"""DSAMKD: dual scale-aware adaptive masked knowledge distillation -- OUR INTERPRETATION.

Only the paper's abstract is public. What follows is our reading of it; every choice the
abstract leaves open is a named constructor parameter of ``DSAMKDLoss``:

Feature branch (per FPN level):
  * teacher spatial attention A = H*W * softmax_{H*W}(mean_c |T| / attention_temperature)
    (mean 1 over positions);
  * a small pyramid of attention maps A_k = max_pool2d(A, k, stride 1, padding k // 2) for
    each k in ``kernel_sizes`` (larger k = coarser, region-level attention: the "scale-aware" part);
  * adaptive mask: the aligned student feature is zeroed at the top ``mask_ratio`` fraction of
    positions of A_k, per sample -- exactly where the teacher attends, so the student must
    encode that content in its context;
  * one generation block G_k (conv3x3 -> ReLU -> conv3x3, teacher channels) per level and
    scale rebuilds T from the masked student;
  * loss_k = sum(A_k / mean(A_k) * (G_k(masked) - T)^2) / N (attention-weighted
    reconstruction, mean(A_k) per sample); feature term = feature_weight * sum over levels
    and scales.

Logit branch (dense one-stage heads, logits (N, A*K, H, W) per level):
  * p = sigmoid(z / logit_temperature) for student and teacher;
  * per-position weight w = sum_c |p_t - p_s| (detached), normalised to sum 1 per sample
    and level: positions where the student disagrees most get most of the weight;
  * per-position distance = mean over channels of the Bernoulli KL(p_t || p_s), i.e. the
    binary cross-entropy BCE(p_s, p_t) minus the teacher's entropy: the same gradient as BCE,
    but 0 when the logits agree;
  * logit term = logit_weight * T^2 * sum_l mean_N sum_positions w * distance.

Padded cells of a batch (``masks``): the attention softmax, the top-``mask_ratio`` count
(floor(mask_ratio * valid cells) per sample), mean(A_k), the reconstruction sum and the logit
weights all run over valid cells only, and the student is zeroed on padded cells before its
generators, so padding never changes the loss or its gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkd.config import DSAMKDConfig
from detkd.distill.adapters import adapt, make_adapters
from detkd.distill.base import DistillLoss, Masks, Pyramid, check_pyramids, level_mask
from detkd.distill.mgd import generate, make_generator

__all__ = ["DSAMKDLoss", "attention_pyramid", "logit_distance", "spatial_attention", "top_attention_mask"]


def spatial_attention(teacher: Tensor, temperature: float, *, mask: Tensor | None = None) -> Tensor:
    """V * softmax over positions of mean_c |T| / temperature: (N, 1, H, W) with mean 1 per sample.

    V is the number of positions, or with ``mask`` (N, 1, H, W) of valid positions; padded
    positions then get attention 0.
    """
    n, _, h, w = teacher.shape
    energy = teacher.abs().mean(dim=1).flatten(1) / temperature  # (N, H*W)
    if mask is None:
        return (h * w * torch.softmax(energy, dim=1)).view(n, 1, h, w)
    valid = mask.bool().flatten(1)
    weights = torch.softmax(energy.masked_fill(~valid, -torch.inf), dim=1)
    return (valid.sum(dim=1, keepdim=True) * weights).view(n, 1, h, w)


def attention_pyramid(attention: Tensor, kernel_sizes: Sequence[int]) -> list[Tensor]:
    """Max-pool the attention map at each (odd) kernel size, stride 1, same spatial size."""
    return [F.max_pool2d(attention, k, stride=1, padding=k // 2) if k > 1 else attention for k in kernel_sizes]


def top_attention_mask(attention: Tensor, mask_ratio: float, *, mask: Tensor | None = None) -> Tensor:
    """Keep-mask (N, 1, H, W): 0 at the floor(mask_ratio * H*W) most attended positions per sample, else 1.

    Ties (plateaus of max-pooled maps) are broken by ``torch.topk``. With ``mask`` (N, 1, H, W),
    only valid positions are ranked, floor(mask_ratio * valid positions) of them are dropped
    per sample, and padded positions are 0 as well.
    """
    n, _, h, w = attention.shape
    count = int(mask_ratio * h * w)  # with a mask: an upper bound of every sample's count
    keep = torch.ones(n, h * w, device=attention.device, dtype=attention.dtype)
    if mask is None:
        if count > 0:
            keep.scatter_(1, attention.flatten(1).topk(count, dim=1).indices, 0.0)
        return keep.view(n, 1, h, w)
    valid = mask.bool().flatten(1)
    if count > 0:
        counts = (valid.sum(dim=1).double() * mask_ratio).floor().long()  # as Python's int(ratio * cells)
        ranked = attention.flatten(1).masked_fill(~valid, -torch.inf).topk(count, dim=1).indices
        dropped = torch.arange(count, device=attention.device)[None, :] < counts[:, None]
        keep.scatter_(1, ranked, (~dropped).to(keep.dtype))
    return (keep * valid).view(n, 1, h, w)


def logit_distance(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float, *, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Per-position (weight, distance), each (N, H*W), for the logit branch (see the module docstring).

    With ``mask`` (N, 1, H, W) the weights are 0 on padded positions and sum to 1 over valid ones.
    """
    p_s = torch.sigmoid(student_logits / temperature).flatten(2)  # (N, C, HW)
    p_t = torch.sigmoid(teacher_logits / temperature).flatten(2)
    weight = (p_t - p_s.detach()).abs().sum(dim=1)
    if mask is not None:
        weight = weight * mask.flatten(1).to(weight.dtype)
    weight = weight / weight.sum(dim=1, keepdim=True).clamp_min(1e-12)
    # KL(p_t || p_s) for Bernoulli variables, written on logits for stability.
    z_s = (student_logits / temperature).flatten(2)
    z_t = (teacher_logits / temperature).flatten(2)
    bce = F.binary_cross_entropy_with_logits(z_s, p_t, reduction="none")
    entropy = F.binary_cross_entropy_with_logits(z_t, p_t, reduction="none")
    return weight, (bce - entropy).mean(dim=1)


class DSAMKDLoss(DistillLoss):
    """DSAMKD (our interpretation, see module docstring): attention-masked generative features + weighted logits.

    Args:
        levels: pyramid levels to distill.
        student_channels, teacher_channels: feature channels; a 1x1 align conv per level if they differ.
        feature_weight: weight of the feature branch (MGD-sized default, the loss is a sum).
        logit_weight: weight of the logit branch; 0 switches it off (two-stage detectors).
        kernel_sizes: odd max-pool kernels of the attention pyramid; one generator per level and kernel.
        mask_ratio: fraction of positions masked per sample, the most attended first.
        attention_temperature: softmax temperature of the teacher attention (lower = peakier).
        logit_temperature: temperature of the sigmoid in the logit branch.
    """

    def __init__(
        self,
        *,
        levels: Sequence[str],
        student_channels: int,
        teacher_channels: int,
        feature_weight: float = 2e-6,
        logit_weight: float = 1.0,
        kernel_sizes: Sequence[int] = (1, 3, 5),
        mask_ratio: float = 0.5,
        attention_temperature: float = 0.5,
        logit_temperature: float = 1.0,
    ) -> None:
        super().__init__(levels=levels)
        if not kernel_sizes or any(int(k) < 1 or int(k) % 2 == 0 for k in kernel_sizes):
            raise ValueError(f"kernel_sizes must be positive odd integers, got {tuple(kernel_sizes)}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        if attention_temperature <= 0 or logit_temperature <= 0:
            raise ValueError("attention_temperature and logit_temperature must be > 0")
        if logit_weight < 0 or feature_weight < 0:
            raise ValueError("feature_weight and logit_weight must be >= 0")
        self.feature_weight = float(feature_weight)
        self.logit_weight = float(logit_weight)
        self.kernel_sizes = tuple(int(k) for k in kernel_sizes)
        self.mask_ratio = float(mask_ratio)
        self.attention_temperature = float(attention_temperature)
        self.logit_temperature = float(logit_temperature)
        self.align = make_adapters(self.levels, student_channels, teacher_channels)
        self.generators = nn.ModuleDict(
            {lv: nn.ModuleList(make_generator(teacher_channels) for _ in self.kernel_sizes) for lv in self.levels}
        )

    @classmethod
    def from_config(
        cls, cfg: DSAMKDConfig, *, levels: Sequence[str], student_channels: int, teacher_channels: int
    ) -> DSAMKDLoss:
        return cls(
            levels=levels,
            student_channels=student_channels,
            teacher_channels=teacher_channels,
            feature_weight=cfg.feature_weight,
            logit_weight=cfg.logit_weight,
            kernel_sizes=tuple(cfg.kernel_sizes),
            mask_ratio=cfg.mask_ratio,
            attention_temperature=cfg.attention_temperature,
            logit_temperature=cfg.logit_temperature,
        )

    @property
    def uses_logits(self) -> bool:
        """The logit branch is on (``logit_weight > 0``): it needs dense one-stage class logits."""
        return self.logit_weight > 0

    def feature_loss(self, student: Pyramid, teacher: Pyramid, masks: Masks | None = None) -> Tensor:
        """Unweighted feature branch: sum over levels and scales of attention-weighted reconstruction."""
        check_pyramids(self.levels, student, teacher, masks)
        total = student[self.levels[0]].new_zeros(())
        for lv in self.levels:
            s = adapt(self.align, lv, student[lv])
            t = teacher[lv].detach()
            n = s.shape[0]
            valid = level_mask(masks, lv)
            attention = spatial_attention(t, self.attention_temperature, mask=valid)
            for a_k, gen in zip(attention_pyramid(attention, self.kernel_sizes), self.generators[lv], strict=True):
                keep = top_attention_mask(a_k, self.mask_ratio, mask=valid).to(s.dtype)
                rebuilt = generate(gen, s * keep, valid)
                total = total + (_attention_weight(a_k, valid) * (rebuilt - t) ** 2).sum() / n
        return total

    def logit_loss(self, student_logits: Pyramid, teacher_logits: Pyramid, masks: Masks | None = None) -> Tensor:
        """Unweighted logit branch (times T^2): sum over levels, mean over samples."""
        total: Tensor | None = None
        for lv in self.levels:
            if lv not in student_logits or lv not in teacher_logits:
                raise ValueError(
                    f"level {lv!r} missing from logits: student has {sorted(student_logits)}, "
                    f"teacher has {sorted(teacher_logits)}"
                )
            z_s, z_t = student_logits[lv], teacher_logits[lv].detach()
            if z_s.shape != z_t.shape or z_s.dim() != 4:
                raise ValueError(
                    f"level {lv!r}: student logits {tuple(z_s.shape)} and teacher logits {tuple(z_t.shape)} "
                    "must both be (N, A*K, H, W) with the same shape"
                )
            weight, dist = logit_distance(z_s, z_t, self.logit_temperature, mask=level_mask(masks, lv))
            term = (weight * dist).sum(dim=1).mean()
            total = term if total is None else total + term
        assert total is not None
        return self.logit_temperature**2 * total

    def forward(
        self,
        student: Pyramid,
        teacher: Pyramid,
        *,
        masks: Masks | None = None,
        step: int = 0,
        student_logits: Pyramid | None = None,
        teacher_logits: Pyramid | None = None,
    ) -> dict[str, Tensor]:
        out = {"dsamkd_feature": self.feature_weight * self.feature_loss(student, teacher, masks)}
        if self.uses_logits:
            if student_logits is None or teacher_logits is None:
                raise ValueError(
                    "DSAMKD's logit branch needs dense class logits from a one-stage (RetinaNet/FCOS) "
                    "student and teacher (pass student_logits= and teacher_logits=), or set logit_weight=0"
                )
            out["dsamkd_logit"] = self.logit_weight * self.logit_loss(student_logits, teacher_logits, masks)
        return out


def _attention_weight(attention: Tensor, mask: Tensor | None) -> Tensor:
    """A_k / mean(A_k) per sample, the mean and the weight restricted to valid cells when masked."""
    if mask is None:
        return attention / attention.mean(dim=(2, 3), keepdim=True)
    inside = mask.to(attention.dtype)
    mean = (attention * inside).sum(dim=(2, 3), keepdim=True) / inside.sum(dim=(2, 3), keepdim=True)
    return inside * attention / mean
