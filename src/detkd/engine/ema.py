"""Exponential moving average of the student's weights, as modern detectors train (YOLOv5, YOLOX).

After every optimizer step ``ema = d_t * ema + (1 - d_t) * weights``, with the decay warmed up
as in YOLOv5's and YOLOX's ``ModelEMA``: ``d_t = decay * (1 - exp(-t / warmup))`` at update
``t`` (1, 2, ...), so the early average follows the fast-moving weights instead of remembering
the random initialisation (``warmup`` 0: the constant ``decay``). The average is what a run
evaluates, saves as its model file and so publishes; the raw weights keep training.

Only the student detector is averaged: a Distiller's frozen teachers, adapters and loss modules
never are. DDP keeps every worker's parameters identical after each step, so every worker
averages the same parameters without communicating; BatchNorm running statistics are the one
exception (each worker updates its own in its forward pass; DDP re-broadcasts rank 0's only at
the next forward), so :meth:`ModelEMA.sync` makes every worker's average rank 0's before it is
evaluated or checkpointed: rank 0's is the one saved, and the one every worker resumes from.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from detkd.models.detectors import unwrap_model


def ema_decay(update: int, *, decay: float, warmup: int) -> float:
    """The decay applied at update ``update`` (counted from 1): YOLOv5/YOLOX's ``decay * (1 - exp(-t / tau))``."""
    if warmup == 0:
        return decay
    return decay * (1.0 - math.exp(-update / warmup))


class ModelEMA:
    """An fp32 copy of a detector on its device, without gradients, moved towards the detector after each step.

    Floating-point parameters and buffers (BatchNorm running statistics) are averaged; integer
    buffers (``num_batches_tracked``) are copied. ``module`` is a detector like the one given, in
    eval mode, so it is evaluated and saved like any other.
    """

    def __init__(self, model: nn.Module, *, decay: float, warmup: int) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema.decay: {decay} is not in (0, 1)")
        if warmup < 0:
            raise ValueError(f"train.ema.warmup: {warmup} is negative")
        self.decay, self.warmup = decay, warmup
        self.updates = 0
        self.module = copy.deepcopy(unwrap_model(model)).float().eval()  # floating tensors in fp32, ints kept
        self.module.requires_grad_(False)

    def current_decay(self) -> float:
        """The decay of the last update (0.0 before any)."""
        return ema_decay(self.updates, decay=self.decay, warmup=self.warmup) if self.updates else 0.0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of the average towards ``model``'s current weights (the same detector, maybe DDP-wrapped)."""
        self.updates += 1
        weight = 1.0 - ema_decay(self.updates, decay=self.decay, warmup=self.warmup)
        source = unwrap_model(model).state_dict()
        averaged: list[Tensor] = []
        targets: list[Tensor] = []
        for name, tensor in self.module.state_dict().items():
            value = source[name].detach()
            if tensor.is_floating_point():
                averaged.append(tensor)
                targets.append(value.to(tensor.dtype))
            else:
                tensor.copy_(value)
        if averaged:
            torch._foreach_lerp_(averaged, targets, weight)  # ema += (1 - d) * (weights - ema)

    @torch.no_grad()
    def sync(self, *, src: int = 0) -> None:
        """Every worker's average becomes rank ``src``'s (a collective; nothing when not distributed)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        for tensor in self.module.state_dict().values():
            dist.broadcast(tensor, src)

    def state_dict(self) -> dict[str, Any]:
        """The averaged tensors and the update count (the decay schedule's position): all a resume needs."""
        return {
            "weights": {k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()},
            "updates": self.updates,
            "decay": self.decay,
            "warmup": self.warmup,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["weights"])
        self.updates = int(state["updates"])
