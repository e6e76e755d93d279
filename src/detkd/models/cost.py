"""What a detector costs before it runs anywhere: FLOPs on one image at its input size, and parameters.

Counted with ``torch.utils.flop_counter`` over the detector's whole forward in eval mode on one
square image of the model's input size (normalisation, backbone, neck, head; box decoding and NMS
have no matrix products and count zero). A config's cost is its untrained network's, so a sweep
can rule a trial out before it trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from detkd.config import Config

COST_KEYS = ("mflops", "params")


@dataclass(frozen=True)
class ModelCost:
    mflops: float  # million floating-point operations (a multiply-add counts 2) per image
    params: int
    input_px: int  # the side of the square image it was counted on

    def metrics(self) -> dict[str, float]:
        return {"mflops": round(self.mflops, 3), "params": float(self.params)}


def detector_cost(model: nn.Module, *, input_px: int) -> ModelCost:
    """The cost of ``model`` (a detkd detector: a list of CHW images in, detections out) at ``input_px``."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model([torch.rand(3, input_px, input_px, generator=torch.Generator().manual_seed(0))])
    finally:
        model.train(was_training)
    params = sum(p.numel() for p in model.parameters())
    return ModelCost(mflops=counter.get_total_flops() / 1e6, params=params, input_px=input_px)


def checkpoint_cost(path: Path) -> ModelCost:
    """The cost of a detkd checkpoint's network at the input view it was trained with."""
    from detkd.models.checkpoint import checkpoint_input, load_detector

    model, meta = load_detector(Path(path))
    return detector_cost(model, input_px=checkpoint_input(path, meta).model_size)


def config_cost(cfg: Config, *, num_classes: int) -> ModelCost:
    """The cost of the network ``cfg`` trains (no weights loaded: the architecture decides it)."""
    from detkd.models.detectors import build_detector_from_config

    model_cfg = cfg.model.model_copy(update={"weights": None, "backbone_weights": None, "trainable_layers": None})
    model = build_detector_from_config(model_cfg, num_classes=num_classes)
    return detector_cost(model, input_px=int(round(cfg.input.size * cfg.input.scale)))  # InputSpec.model_size
