"""Feature cosine distance: the paper-free option for teachers whose feature scale says nothing.

A vision transformer's patch tokens (DINOv2, DINOv3) and a CNN student's pyramid live on
unrelated scales; MSE against them mostly teaches magnitudes. The cosine distance compares
directions only: weight * mean over levels and valid cells of 1 - cos(adapter(S), T), the
adapter (always there: it maps the student's channels onto the teacher's) trained with the
student.
"""

from __future__ import annotations

from detkd.distill.functional import cosine_distance
from detkd.distill.mse import LevelDistanceLoss

__all__ = ["FeatureCosineLoss"]


class FeatureCosineLoss(LevelDistanceLoss):
    """weight * mean over levels of the mean cosine distance of adapter(S_l) and T_l over valid cells."""

    term = "cosine"
    distance = staticmethod(cosine_distance)
    force_adapters = True
