"""The per-worker training loop run by Ray Train (teachers and plain students).

Everything the loop needs travels in one JSON-able dict (the resolved config
plus tracking ids), so the same function runs on a laptop or on any cluster node.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
from torch.utils.data import DataLoader

from detkd.config import Config
from detkd.data.dataset import collate_detection
from detkd.engine import rng
from detkd.engine.datasets import build_dataset
from detkd.engine.evaluate import evaluate_distributed
from detkd.engine.loop import (
    RunningMeans,
    Throughput,
    build_optimizer,
    build_scheduler,
    format_eta,
    move_targets,
    reduce_means,
    scaled_lr,
    train_step,
)
from detkd.engine.rng import seed_everything
from detkd.engine.sampler import EpochBatchSampler
from detkd.models.checkpoint import load_payload, save_detector, save_payload
from detkd.models.detectors import build_detector

TRAIN_STATE = "train_state.pt"
MODEL_FILE = "model.pt"
# Ray Train routes worker logging to the driver console and its log files; print() may be echoed twice.
log = logging.getLogger("detkd.train")


def quiet_ray_train_reports() -> None:
    """Ray Train logs every report and checkpoint at INFO; that drowns the progress lines.

    Its loggers are named by file path (``logging.getLogger(__file__)``), so match on that.
    """
    for name in list(logging.root.manager.loggerDict):
        if name.endswith(("execution/context.py", "execution/storage.py")) or name.startswith("ray.train"):
            logging.getLogger(name).setLevel(logging.WARNING)


def model_kwargs(cfg: Config, num_classes: int) -> dict[str, Any]:
    kwargs = cfg.model.model_dump()
    kwargs["num_classes"] = cfg.model.num_classes or num_classes
    for key in ("weights", "backbone_weights"):
        kwargs[key] = str(kwargs[key]) if kwargs[key] else None
    return kwargs


def build_trainable(
    cfg: Config, num_classes: int, teachers: list[list[Any]]
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(module to optimise, student detector): the detector itself, or a Distiller around it."""
    from detkd.distill.distiller import Distiller, Teacher
    from detkd.distill.msad import copy_matching_weights
    from detkd.models.checkpoint import load_detector

    torch.manual_seed(cfg.seed)  # identical initial weights on every worker
    student = build_detector(**model_kwargs(cfg, num_classes))
    if cfg.distill is None or not cfg.distill.teachers:
        return student, student
    loaded = [Teacher(load_detector(Path(path))[0], float(scale)) for path, scale in teachers]
    first = getattr(loaded[0].model, "detector", loaded[0].model)  # a multi-scale teacher's shared network
    first_state = first.state_dict()
    if cfg.distill.init_from_teacher:
        copied = copy_matching_weights(student, first_state)
        log.info(f"[{cfg.name}] initialised {len(copied)} student tensors from the teacher")
    if cfg.distill.copy_neck_head:
        copied = copy_matching_weights(student, first_state, prefixes=("backbone.fpn", "backbone.extra", "head"))
        log.info(f"[{cfg.name}] copied {len(copied)} neck/head tensors from the first teacher")
    methods = {name: method.model_dump() for name, method in cfg.distill.methods().items()}
    distiller = Distiller(
        student=student,
        student_scale=cfg.input.scale,
        teachers=loaded,
        methods=methods,
        teacher_bf16=cfg.distill.teacher_bf16,
        teacher_channels_last=cfg.distill.teacher_channels_last,
    )
    return distiller, student


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point: train, evaluate, checkpoint through ``ray.train.report``."""
    cfg = Config.model_validate(loop_config["config"])
    quiet_ray_train_reports()
    log.setLevel(logging.INFO)
    tracking_uri, run_id = loop_config.get("tracking_uri"), loop_config.get("run_id")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(int(loop_config.get("threads_per_worker", 1)))
    device = ray.train.torch.get_device()
    seed_everything(cfg.seed + rank)

    train_set = build_dataset(cfg, "train", train=True)
    val_set = build_dataset(cfg, "val", train=False) if cfg.data.val is not None else None
    num_classes = train_set.source.num_classes
    if cfg.model.num_classes is not None and cfg.model.num_classes != num_classes:
        raise ValueError(
            f"model.num_classes={cfg.model.num_classes} but the training data has {num_classes} categories"
        )

    trainable, student = build_trainable(cfg, num_classes, loop_config.get("teachers", []))
    model = ray.train.torch.prepare_model(trainable)  # device placement + DDP (student + adapters only) when world > 1
    inner = getattr(model, "module", model)

    sampler = EpochBatchSampler(
        size=len(train_set), batch_size=cfg.train.batch_size, rank=rank, world_size=world, seed=cfg.seed
    )
    if sampler.batches_per_epoch == 0:
        raise ValueError(
            f"training split has {len(train_set)} images, fewer than one batch of "
            f"{cfg.train.batch_size} per worker x {world} workers"
        )
    loader = DataLoader(
        train_set,
        batch_sampler=sampler,
        collate_fn=collate_detection,
        num_workers=cfg.data.loader_workers,
        persistent_workers=cfg.data.loader_workers > 0,
    )
    steps_per_epoch = sampler.batches_per_epoch
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    global_batch = sampler.global_batch
    optimizer = build_optimizer(model.parameters(), cfg.optim, lr=scaled_lr(cfg.optim, global_batch))
    scheduler = build_scheduler(optimizer, total_steps=total_steps, optim=cfg.optim)
    use_amp = cfg.train.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp and not torch.cuda.is_bf16_supported() else None

    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load_payload(Path(folder) / TRAIN_STATE)
        inner.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
        if len(state["rng"]) == world:  # same world size: every worker continues its own random stream
            rng.restore(state["rng"][rank])
        if rank == 0:
            log.info(f"[{cfg.name}] resumed from step {step}/{total_steps} (epoch {step // steps_per_epoch + 1})")

    logger = None
    if rank == 0 and tracking_uri and run_id:
        from detkd.tracking import RunLogger

        logger = RunLogger(tracking_uri=tracking_uri, run_id=run_id)

    def save(metrics: dict[str, Any]) -> None:
        report_checkpoint(
            metrics,
            rank=rank,
            model=inner,
            student=student,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            step=step,
            meta=loop_config.get("meta", {}),
        )

    fault = cfg.debug.fail_at_step
    fault_rank = cfg.debug.fail_rank % world
    fault_marker = Path(loop_config.get("fault_marker", ".detkd-fault"))
    means, epoch_means, speed = RunningMeans(), RunningMeans(), Throughput()
    while step < total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch, start_batch=offset)
        model.train()
        epoch_means.reset()
        for images, targets in loader:
            images = [img.to(device, non_blocking=True) for img in images]
            result = train_step(
                model,
                images,
                move_targets(targets, device),
                optimizer=optimizer,
                scaler=scaler,
                device=device,
                amp=use_amp,
                clip_grad_norm=cfg.optim.clip_grad_norm,
            )
            scheduler.step()
            step += 1
            speed.add(len(images) * world)
            terms = {"loss": result.loss, **{f"loss_{k}": v for k, v in result.terms.items()}}
            means.add(terms)
            epoch_means.add(terms)
            if fault == step and rank == fault_rank and not fault_marker.exists():
                fault_marker.write_text(str(step))  # once: the restarted worker must get past this step
                log.warning(f"[{cfg.name}] debug.fail_at_step: killing worker {rank} after step {step}")
                # Ray's controller collects reports every health-check interval (2 s); a crash sooner than
                # that after a checkpoint loses the checkpoint too. Model a crash some time after the last one.
                time.sleep(float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2.0")) + 1.0)
                os._exit(1)
            if step % cfg.train.log_every == 0 or step == total_steps:
                running = reduce_means(means.means())
                if rank == 0:
                    log_progress(
                        cfg,
                        logger,
                        running,
                        step=step,
                        epoch=epoch,
                        total_steps=total_steps,
                        lr=scheduler.get_last_lr()[0],
                        rate=speed.rate(),
                        global_batch=global_batch,
                    )
                means.reset()
                speed.reset()
            epoch_end = step % steps_per_epoch == 0 or step == total_steps
            if cfg.train.checkpoint_every_steps and step % cfg.train.checkpoint_every_steps == 0 and not epoch_end:
                save({"epoch": epoch + step % steps_per_epoch / steps_per_epoch, "step": step})
            if step >= total_steps:
                break
        epochs_done = step // steps_per_epoch
        last = step >= total_steps
        metrics: dict[str, Any] = {
            "epoch": epochs_done,
            "step": step,
            **{f"train/{k}": v for k, v in reduce_means(epoch_means.means()).items()},
        }
        if val_set is not None and (last or (cfg.train.eval_every and epochs_done % cfg.train.eval_every == 0)):
            scores = evaluate_distributed(
                student,
                val_set,
                device=device,
                batch_size=cfg.eval.batch_size,
                score_thresh=cfg.eval.score_thresh,
                detections_per_img=cfg.eval.detections_per_img,
                rank=rank,
                world_size=world,
            )
            if scores is not None:
                metrics.update({f"val/{k}": v for k, v in scores.items()})
                log.info(
                    f"[{cfg.name}] epoch {epochs_done} val AP {scores['AP']:.4f} AP50 {scores['AP50']:.4f} "
                    f"APs {scores['APs']:.4f}"
                )
                if logger:  # per-step train/* curves are logged above; the epoch adds the validation scores
                    logger.metrics({k: v for k, v in metrics.items() if k.startswith("val/")}, step=step)
        if last or epochs_done % cfg.train.checkpoint_every == 0:
            save(metrics)
        else:
            ray.train.report(metrics)


def log_progress(
    cfg: Config,
    logger,
    running: dict[str, float],
    *,
    step: int,
    epoch: int,
    total_steps: int,
    lr: float,
    rate: float,
    global_batch: int,
) -> None:
    eta = (total_steps - step) * global_batch / max(rate, 1e-9)
    parts = " ".join(f"{k.removeprefix('loss_')} {v:.3f}" for k, v in running.items() if k != "loss")
    log.info(
        f"[{cfg.name}] epoch {epoch + 1}/{cfg.train.epochs} step {step}/{total_steps} "
        f"loss {running['loss']:.3f} ({parts}) lr {lr:.2e} {rate:.0f} img/s eta {format_eta(eta)}"
    )
    if logger:
        logger.metrics(
            {f"train/{k}": v for k, v in running.items()} | {"train/lr": lr, "train/images_per_s": rate}, step=step
        )


def report_checkpoint(
    metrics: dict[str, Any], *, rank: int, model, student, optimizer, scheduler, scaler, step: int, meta: dict[str, Any]
) -> None:
    """Rank 0 writes training state (every worker's RNG included) + a student-only checkpoint; every rank reports."""
    states = gather_objects(rng.capture())
    with tempfile.TemporaryDirectory(prefix="detkd-ckpt-") as folder:
        checkpoint = None
        if rank == 0:
            save_payload(
                Path(folder) / TRAIN_STATE,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler else None,
                    "step": step,
                    "rng": states,
                },
            )
            save_detector(
                Path(folder) / MODEL_FILE,
                student,
                meta={**meta, "step": step, **{k: v for k, v in metrics.items() if k.startswith("val/")}},
            )
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)


def gather_objects(obj: Any) -> list[Any]:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out
