"""The training loop in plain PyTorch, shaped like torchvision's ``references/detection/engine.py``.

``setup`` builds data, model, optimizer and schedule from a run plan; ``train_one_epoch``
runs one pass over the loader and calls small hooks after each step (progress, step
checkpoints, test-only fault injection). The Ray worker (``engine/worker.py``) only adds
the distributed context, checkpoint reporting and MLflow. Benchmarks use the same pieces.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader

from detkd.config import OptimConfig
from detkd.data.dataset import DetectionDataset, collate_detection
from detkd.engine.datasets import readable_batch
from detkd.engine.ema import ModelEMA
from detkd.engine.sampler import EpochBatchSampler
from detkd.models.detectors import unwrap_model
from detkd.records import RunPlan

# the Ray worker's logger: Ray routes its lines to the driver console (see engine/worker.py)
log = logging.getLogger("detkd.train")


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

    def named(self) -> dict[str, float]:
        """``loss`` plus each term as ``loss_<term>`` (the names logged to MLflow)."""
        return {"loss": self.loss, **{f"loss_{k}": v for k, v in self.terms.items()}}


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


@dataclass
class TrainState:
    """What a checkpoint must hold to continue exactly where training stopped."""

    model: nn.Module  # what the optimizer trains: a detector or a Distiller, maybe DDP-wrapped
    student: nn.Module  # the detector being trained (inside ``model``)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    step: int = 0
    ema: ModelEMA | None = None  # train.ema: the student's weight average

    @property
    def published(self) -> nn.Module:
        """The detector that is evaluated and saved as the model file: the EMA's average when on, else the student."""
        return self.ema.module if self.ema is not None else self.student

    def ema_metrics(self) -> dict[str, float]:
        """``ema/decay`` (of the last update) and ``ema/updates`` when EMA is on, else nothing."""
        if self.ema is None:
            return {}
        return {"ema/decay": self.ema.current_decay(), "ema/updates": float(self.ema.updates)}

    def state_dict(self) -> dict[str, Any]:
        state = {
            "model": unwrap_model(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "step": self.step,
        }
        if self.ema is not None:  # absent when off: such checkpoints are as before
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` stopped, EMA included.

        With EMA on, a checkpoint without EMA state is refused (ValueError): the average cannot be rebuilt,
        and since ``train.ema`` enters the config digest, such a file was never written by this run."""
        if self.ema is not None and "ema" not in state:
            raise ValueError("train.ema is on, but the checkpoint holds no EMA state (it was written without EMA)")
        unwrap_model(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.step = int(state["step"])


@dataclass
class TrainRun:
    """Everything ``setup`` builds for one worker."""

    state: TrainState
    loader: DataLoader
    sampler: EpochBatchSampler
    val_set: DetectionDataset | None
    device: torch.device
    amp: bool
    total_steps: int

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch


def setup(
    plan: RunPlan,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
    wrap: Callable[[nn.Module], nn.Module] = lambda module: module,
) -> TrainRun:
    """Datasets, loader, model, optimizer and schedule of one worker. ``wrap`` places the
    trainable module on its device and in DDP (Ray's ``prepare_model``); the teachers stay outside."""
    from detkd.engine.build import build_trainable
    from detkd.engine.datasets import TrainingImages, build_dataset

    cfg = plan.config
    device = device or torch.device("cpu")
    train_set = TrainingImages(build_dataset(plan, "train", train=True), skip_invalid=cfg.data.skip_invalid)
    val_set = build_dataset(plan, "val", train=False) if cfg.data.val is not None else None
    trainable, student = build_trainable(plan)
    model = wrap(trainable)
    sampler = EpochBatchSampler(
        size=len(train_set), batch_size=cfg.train.batch_size, rank=rank, world_size=world_size, seed=cfg.seed
    )
    loader = DataLoader(
        train_set,
        batch_sampler=sampler,
        collate_fn=collate_detection,
        num_workers=cfg.data.loader_workers,
        persistent_workers=cfg.data.loader_workers > 0,
        # its own generator: starting an epoch's iterator then draws nothing from the global RNG that checkpoints
        # capture, so a run resumed mid-epoch (loader_workers 0) flips the same images as an uninterrupted one
        generator=torch.Generator().manual_seed(cfg.seed + rank),
    )
    total_steps = cfg.train.epochs * sampler.batches_per_epoch
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    optimizer = build_optimizer(model.parameters(), cfg.optim, lr=scaled_lr(cfg.optim, sampler.global_batch))
    scheduler = build_scheduler(optimizer, total_steps=total_steps, optim=cfg.optim)
    amp = cfg.train.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if amp and not torch.cuda.is_bf16_supported() else None
    ema = None
    if cfg.train.ema is not None:  # after ``wrap``: the copy lives on the student's device; teachers stay out
        ema = ModelEMA(student, decay=cfg.train.ema.decay, warmup=cfg.train.ema.warmup)
    state = TrainState(model=model, student=student, optimizer=optimizer, scheduler=scheduler, scaler=scaler, ema=ema)
    return TrainRun(
        state=state, loader=loader, sampler=sampler, val_set=val_set, device=device, amp=amp, total_steps=total_steps
    )


StepHook = Callable[[TrainState, StepResult, int], None]
"""Called after every optimizer step with (state, step result, images in this worker's batch)."""


def train_one_epoch(run: TrainRun, *, clip_grad_norm: float | None, hooks: Sequence[StepHook] = ()) -> dict[str, float]:
    """One pass over this epoch's remaining batches (or up to ``run.total_steps``); returns the mean loss terms."""
    state = run.state
    state.model.train()
    means = RunningMeans()
    for batch in run.loader:
        images, targets = readable_batch(*batch)  # an image that cannot be read stops the run, naming it
        images = [img.to(run.device, non_blocking=True) for img in images]
        result = train_step(
            state.model,
            images,
            move_targets(targets, run.device),
            optimizer=state.optimizer,
            scaler=state.scaler,
            device=run.device,
            amp=run.amp,
            clip_grad_norm=clip_grad_norm,
        )
        state.scheduler.step()
        state.step += 1
        if state.ema is not None:
            state.ema.update(state.student)
        means.add(result.named())
        for hook in hooks:
            hook(state, result, len(images))
        if state.step >= run.total_steps:
            break
    return means.means()


class ProgressLog:
    """Step hook: every ``every`` steps, average the loss terms over workers, log a line on rank 0
    (the ``detkd.train`` logger) and hand the numbers to ``sink`` (MLflow on rank 0 in the Ray worker)."""

    def __init__(
        self,
        *,
        name: str,
        every: int,
        total_steps: int,
        steps_per_epoch: int,
        epochs: int,
        world_size: int,
        rank: int,
        sink: Callable[[dict[str, float], int], None] | None = None,
    ) -> None:
        self.name, self.every, self.total_steps = name, every, total_steps
        self.steps_per_epoch, self.epochs = steps_per_epoch, epochs
        self.world_size, self.rank, self.sink = world_size, rank, sink
        self.means, self.speed = RunningMeans(), Throughput()

    def __call__(self, state: TrainState, result: StepResult, batch_images: int) -> None:
        self.means.add(result.named())
        self.speed.add(batch_images * self.world_size)
        if state.step % self.every and state.step != self.total_steps:
            return
        running = reduce_means(self.means.means())  # a collective: every rank takes part
        if self.rank == 0:
            rate, lr = self.speed.rate(), state.scheduler.get_last_lr()[0]
            global_batch = batch_images * self.world_size
            eta = (self.total_steps - state.step) * global_batch / max(rate, 1e-9)
            parts = " ".join(f"{k.removeprefix('loss_')} {v:.3f}" for k, v in running.items() if k != "loss")
            epoch = (state.step - 1) // self.steps_per_epoch + 1
            log.info(
                f"[{self.name}] epoch {epoch}/{self.epochs} step {state.step}/{self.total_steps} "
                f"loss {running['loss']:.3f} ({parts}) lr {lr:.2e} {rate:.0f} img/s eta {format_eta(eta)}"
            )
            if self.sink is not None:
                values = {f"train/{k}": v for k, v in running.items()}
                self.sink(values | {"train/lr": lr, "train/images_per_s": rate}, state.step)
        self.means.reset()
        self.speed.reset()
