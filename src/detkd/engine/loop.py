"""Plain-PyTorch pieces of the training loop, shared by Ray Train workers and benchmarks."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from detkd.config import OptimConfig


def scaled_lr(optim: OptimConfig, global_batch: int) -> float:
    """The configured lr is for ``base_batch_size``; scale it to the global batch."""
    ratio = global_batch / optim.base_batch_size
    if optim.lr_scaling == "linear":
        return optim.lr * ratio
    if optim.lr_scaling == "sqrt":
        return optim.lr * math.sqrt(ratio)
    return optim.lr


def build_optimizer(params: Iterable[nn.Parameter], optim: OptimConfig, *, lr: float) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if optim.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=optim.weight_decay)


def lr_factor(step: int, *, total_steps: int, optim: OptimConfig) -> float:
    """Linear warm-up, then cosine / step / constant; a multiplier of the base lr."""
    warmup = min(optim.warmup_iters, max(0, total_steps - 1))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    if optim.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if optim.schedule == "step":
        passed = sum(1 for m in optim.milestones if step >= m * total_steps)
        return optim.gamma**passed
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, *, total_steps: int, optim: OptimConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps=total_steps, optim=optim))


def autocast_context(device: torch.device, enabled: bool):
    """bf16 autocast on GPUs that support it, fp16 otherwise; a no-op on CPU."""
    if device.type != "cuda" or not enabled:
        return torch.autocast(device_type="cpu", enabled=False)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def move_targets(targets: list[dict], device: torch.device) -> list[dict[str, Tensor]]:
    """Only what the detector's loss needs, on the right device."""
    return [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]


@dataclass
class RunningMeans:
    """Averages of named scalars since the last reset (loss terms, throughput)."""

    sums: dict[str, float] = field(default_factory=dict)
    count: int = 0

    def add(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
        self.count += 1

    def means(self) -> dict[str, float]:
        return {k: v / max(1, self.count) for k, v in self.sums.items()}

    def reset(self) -> None:
        self.sums.clear()
        self.count = 0


def reduce_means(values: dict[str, float]) -> dict[str, float]:
    """Average a dict of scalars over all workers (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return dict(values)
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(tensor)
    tensor /= dist.get_world_size()
    return dict(zip(keys, tensor.tolist(), strict=True))


def format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


@dataclass
class StepResult:
    loss: float
    terms: dict[str, float]
    grad_norm: float


def train_step(
    model: nn.Module,
    images: list[Tensor],
    targets: list[dict[str, Tensor]],
    *,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    device: torch.device,
    amp: bool,
    clip_grad_norm: float | None,
) -> StepResult:
    """One optimizer step on the summed loss dict (a detector's, or a Distiller's with its kd terms)."""
    with autocast_context(device, amp):
        losses = model(images, targets)
        total = sum(losses.values())
    if not torch.isfinite(total):
        raise FloatingPointError(
            f"non-finite loss {float(total)}: terms { ({k: float(v) for k, v in losses.items()}) }"
        )
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(total).backward()
        scaler.unscale_(optimizer)
    else:
        total.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad_norm if clip_grad_norm else float("inf"))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return StepResult(float(total.detach()), {k: float(v.detach()) for k, v in losses.items()}, float(grad_norm))


class Throughput:
    """Images per second since the last reset (the loop resets it at every progress line)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.images = 0

    def add(self, n: int) -> None:
        self.images += n

    def rate(self) -> float:
        return self.images / max(1e-9, time.perf_counter() - self.start)

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.images = 0
