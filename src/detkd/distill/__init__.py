"""Knowledge-distillation losses for detector feature pyramids (plain PyTorch).

One module per method: ``mse`` (baseline), ``ssim`` (structural), ``mgd`` (MTPD's per-stage
loss), ``msad`` (low-resolution aligned distillation) and ``dsamkd`` (our interpretation).
Every loss is an ``nn.Module`` called as ``loss(student_pyramid, teacher_pyramid, **context)``
and returns a dict of named, already-weighted scalar terms. ``functional`` holds the
stateless pieces for custom loops.
"""

from detkd.distill.adapters import adapt, make_adapters
from detkd.distill.dsamkd import DSAMKDLoss
from detkd.distill.functional import (
    gaussian_window,
    is_pyramid_shift,
    minmax_normalize,
    msad_loss,
    mse_loss,
    pair_levels,
    resize_to,
    ssim_loss,
    ssim_map,
)
from detkd.distill.mgd import MGDLoss
from detkd.distill.msad import MSADLoss, copy_matching_weights
from detkd.distill.mse import FeatureMSELoss
from detkd.distill.ssim import SSIMFeatureLoss

__all__ = [
    "DSAMKDLoss",
    "FeatureMSELoss",
    "MGDLoss",
    "MSADLoss",
    "SSIMFeatureLoss",
    "adapt",
    "copy_matching_weights",
    "gaussian_window",
    "is_pyramid_shift",
    "make_adapters",
    "minmax_normalize",
    "msad_loss",
    "mse_loss",
    "pair_levels",
    "resize_to",
    "ssim_loss",
    "ssim_map",
]
