"""Knowledge-distillation losses for detector feature pyramids (plain PyTorch).

One module per method: ``mse`` (baseline), ``cosine`` (paper-free, for ViT feature teachers),
``ssim`` (structural), ``mgd`` (MTPD's per-stage loss), ``msad`` (low-resolution aligned
distillation) and ``dsamkd`` (our interpretation).
Every loss is a ``DistillLoss`` (``base``) called as ``loss(student_pyramid, teacher_pyramid,
masks=..., step=..., student_logits=..., teacher_logits=...)`` that returns a dict of named,
already-weighted scalar terms; ``uses_logits`` says whether it needs the logits. ``align``
pairs padded batches cell by cell; ``functional`` holds the stateless pieces for custom loops.
"""

from detkd.distill.adapters import adapt, make_adapters
from detkd.distill.align import LevelGrid, align_level, level_grids, valid_mask
from detkd.distill.base import DistillLoss
from detkd.distill.cosine import FeatureCosineLoss
from detkd.distill.dsamkd import DSAMKDLoss
from detkd.distill.functional import (
    cosine_distance,
    gaussian_window,
    is_pyramid_shift,
    masked_mean,
    minmax_normalize,
    msad_loss,
    mse_loss,
    pair_levels,
    pair_nearest,
    resize_to,
    ssim_loss,
    ssim_map,
)
from detkd.distill.mgd import MGDLoss
from detkd.distill.msad import MSADLoss
from detkd.distill.mse import FeatureMSELoss
from detkd.distill.ssim import SSIMFeatureLoss

__all__ = [
    "DSAMKDLoss",
    "DistillLoss",
    "FeatureCosineLoss",
    "FeatureMSELoss",
    "LevelGrid",
    "MGDLoss",
    "MSADLoss",
    "SSIMFeatureLoss",
    "adapt",
    "align_level",
    "cosine_distance",
    "gaussian_window",
    "is_pyramid_shift",
    "level_grids",
    "make_adapters",
    "masked_mean",
    "minmax_normalize",
    "msad_loss",
    "mse_loss",
    "pair_levels",
    "pair_nearest",
    "resize_to",
    "ssim_loss",
    "ssim_map",
    "valid_mask",
]
