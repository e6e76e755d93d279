"""Weight EMA (train.ema): the decay schedule, the update, what is averaged, what evaluation gets, exact resume."""

from __future__ import annotations

import math

import pytest
import torch
from factories import tracking_in
from torch import nn

from detkd.config import Config, ConfigError, validate_config
from detkd.engine import rng
from detkd.engine.ema import ModelEMA, ema_decay
from detkd.engine.evaluate import evaluate_distributed
from detkd.engine.loop import TrainRun, setup, train_one_epoch
from detkd.engine.plan import build_plan, config_digest
from detkd.models import build_detector, save_detector
from detkd.models.checkpoint import load_payload, save_payload


def test_decay_warms_up_as_yolov5_and_yolox():
    assert ema_decay(1, decay=0.9998, warmup=0) == 0.9998
    assert ema_decay(2000, decay=0.9998, warmup=2000) == pytest.approx(0.9998 * (1 - math.exp(-1)))
    assert ema_decay(1, decay=0.9, warmup=3) == pytest.approx(0.9 * (1 - math.exp(-1 / 3)))
    ramp = [ema_decay(t, decay=0.99, warmup=10) for t in (1, 5, 10, 50, 500)]
    assert ramp == sorted(ramp) and ramp[0] < 0.1 and ramp[-1] == pytest.approx(0.99)


def _tiny_module() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def test_update_matches_a_hand_computation_and_copies_integer_buffers():
    model = _tiny_module()
    ema = ModelEMA(model, decay=0.9, warmup=4)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.randn(5, 3))  # train mode: BatchNorm's running stats and num_batches_tracked move
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    d = 0.9 * (1 - math.exp(-1 / 4))
    now = model.state_dict()
    for name, value in ema.module.state_dict().items():
        if name.endswith("num_batches_tracked"):
            assert value.dtype == torch.long and int(value) == int(now[name]) == 1  # copied, not averaged
        else:
            expected = d * start[name] + (1 - d) * now[name]
            torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
    assert ema.updates == 1 and ema.current_decay() == pytest.approx(d)
    # the copy is separate, in eval mode, without gradients
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(ema.module.parameters(), model.parameters(), strict=True))


def test_the_average_is_kept_in_fp32():
    model = _tiny_module().to(torch.bfloat16)
    ema = ModelEMA(model, decay=0.5, warmup=0)
    assert all(v.dtype == torch.float32 for v in ema.module.state_dict().values() if v.is_floating_point())
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    ema.update(model)
    start = _tiny_module()[0].weight.to(torch.bfloat16).float()
    torch.testing.assert_close(ema.module[0].weight, 0.5 * start + 0.5)


def test_bad_settings_are_refused_naming_the_key():
    for key, value in (("decay", 1.0), ("decay", 0.0), ("decay", 1.5), ("warmup", -1)):
        with pytest.raises(ConfigError, match=f"train.ema.{key}"):
            validate_config({"train": {"ema": {key: value}}}, source="run.yaml")
    with pytest.raises(ValueError, match="train.ema.decay"):
        ModelEMA(_tiny_module(), decay=1.0, warmup=0)


def test_ema_off_leaves_config_dumps_and_digests_as_they_were():
    off = Config()
    assert "ema" not in off.model_dump(mode="json")["train"]  # digests, sweep digests and params unchanged
    on = Config.model_validate({"train": {"ema": {"decay": 0.999, "warmup": 100}}})
    assert on.model_dump(mode="json")["train"]["ema"] == {"decay": 0.999, "warmup": 100}
    assert Config.model_validate(on.model_dump(mode="json")) == on
    assert config_digest(on, ()) != config_digest(off, ())  # the published weights differ: another run


def _plan(dataset, work, config, *, ema: dict | None, epochs: int = 2, **sections):
    train = {"epochs": epochs, **({"ema": ema} if ema is not None else {})}
    return build_plan(Config.model_validate(config(dataset, work, train=train, **sections)), tracking=tracking_in(work))


def _train_until(run: TrainRun, stop: int) -> None:
    """The worker's loop (engine/worker.py) without Ray, stopping after step ``stop``."""
    total, run.total_steps = run.total_steps, stop
    while run.state.step < stop:
        epoch, offset = divmod(run.state.step, run.steps_per_epoch)
        run.sampler.set_epoch(epoch, start_batch=offset)
        train_one_epoch(run, clip_grad_norm=10.0)
    run.total_steps = total


def _fresh_worker(plan) -> TrainRun:
    rng.seed_everything(plan.config.seed)  # what train_loop_per_worker does before setup
    return setup(plan)


@pytest.mark.parametrize("stop", [4, 5], ids=["epoch-end", "mid-epoch"])
def test_resumed_run_ends_with_bit_identical_ema(tiny_dataset, tiny_config, tmp_path, stop):
    plan = _plan(tiny_dataset, tmp_path, tiny_config, ema={"decay": 0.9, "warmup": 3})
    whole = _fresh_worker(plan)
    _train_until(whole, whole.total_steps)
    assert whole.total_steps == 8 and whole.state.ema.updates == 8

    first = _fresh_worker(plan)
    _train_until(first, stop)  # 4 steps per epoch: an epoch-end checkpoint, or a step checkpoint
    save_payload(tmp_path / "state.pt", {**first.state.state_dict(), "rng": [rng.capture()]})
    resumed = _fresh_worker(plan)
    state = load_payload(tmp_path / "state.pt")  # weights_only, as the worker reads it
    resumed.state.load_state_dict(state)
    rng.restore(state["rng"][0])
    assert resumed.state.ema.updates == stop
    _train_until(resumed, resumed.total_steps)

    assert resumed.state.ema.updates == 8
    expected, got = whole.state.ema.module.state_dict(), resumed.state.ema.module.state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    raw = whole.state.student.state_dict()
    assert all(torch.equal(raw[k], resumed.state.student.state_dict()[k]) for k in raw)
    logits = "head.classification_head.cls_logits.weight"
    assert not torch.equal(expected[logits], raw[logits])  # the average is not the raw weights


def test_checkpoints_with_and_without_ema_state(tiny_dataset, tiny_config, tmp_path):
    plain = setup(_plan(tiny_dataset, tmp_path, tiny_config, ema=None))
    assert plain.state.ema is None and "ema" not in plain.state.state_dict()  # as before EMA existed
    without = plain.state.state_dict()
    again = setup(_plan(tiny_dataset, tmp_path, tiny_config, ema=None))
    again.state.load_state_dict(without)
    averaged = setup(_plan(tiny_dataset, tmp_path, tiny_config, ema={"decay": 0.99, "warmup": 0}))
    with pytest.raises(ValueError, match="train.ema is on, but the checkpoint holds no EMA state"):
        averaged.state.load_state_dict(without)
    assert averaged.state.step == 0


def test_evaluation_and_the_model_file_get_the_average(tiny_dataset, tiny_config, tmp_path):
    from detkd.engine.worker import end_of_epoch

    # decay so close to 1 that the average stays at the initial weights while the raw weights move
    plan = _plan(tiny_dataset, tmp_path, tiny_config, ema={"decay": 1 - 1e-9, "warmup": 0}, epochs=1)
    run = _fresh_worker(plan)
    initial = {k: v.clone() for k, v in run.state.student.state_dict().items()}
    _train_until(run, run.total_steps)
    ema, raw = run.state.ema.module.state_dict(), run.state.student.state_dict()
    floats = [k for k in initial if initial[k].is_floating_point()]
    assert all(torch.allclose(ema[k], initial[k], rtol=0, atol=1e-6) for k in floats)
    assert max(float((raw[k] - initial[k]).abs().max()) for k in floats) > 1e-3
    assert run.state.published is run.state.ema.module

    metrics = end_of_epoch(plan, run, {}, rank=0, world_size=1)
    kwargs = {"device": run.device, "batch_size": 8, "score_thresh": 0.01, "detections_per_img": 100}
    scores = evaluate_distributed(run.state.ema.module, run.val_set, rank=0, world_size=1, **kwargs)
    raw_scores = evaluate_distributed(run.state.student, run.val_set, rank=0, world_size=1, **kwargs)
    assert metrics["val/AP"] == scores["AP"] and metrics["val/AP_raw"] == raw_scores["AP"]
    assert metrics["ema/updates"] == 4 and metrics["ema/decay"] == pytest.approx(1 - 1e-9)

    # the model file is written from the published detector (CheckpointReport.save): the average
    save_detector(tmp_path / "model.pt", run.state.published)
    saved = load_payload(tmp_path / "model.pt")["state_dict"]
    assert all(torch.equal(saved[k], ema[k]) for k in ema)


def _teacher_checkpoint(path):
    torch.manual_seed(5)
    model = build_detector(
        arch="fcos", backbone="tiny", num_classes=3, min_level=3, max_level=6, fpn_channels=32, head_convs=1
    )
    save_detector(path, model, meta={"role": "teacher"})
    return path


def test_teachers_and_distillation_modules_are_never_averaged(tiny_dataset, tiny_config, tmp_path):
    teacher = _teacher_checkpoint(tmp_path / "teacher.pt")
    distill = {"teachers": [{"source": str(teacher), "input_scale": 1.0}], "mgd": {}}
    plan = _plan(tiny_dataset, tmp_path, tiny_config, ema={"decay": 0.5, "warmup": 0}, distill=distill)
    run = _fresh_worker(plan)
    distiller = run.state.model
    teacher_model = distiller.teachers[0].model
    before = {k: v.clone() for k, v in teacher_model.state_dict().items()}
    _train_until(run, 2)

    averaged = run.state.ema.state_dict()["weights"]
    assert set(averaged) == set(run.state.student.state_dict())  # the student detector's tensors, nothing else
    assert any(k.startswith("losses.") for k in distiller.state_dict())  # the MGD generator: not averaged
    teacher_storage = {t.data_ptr() for t in teacher_model.state_dict().values()}
    assert not teacher_storage & {t.data_ptr() for t in run.state.ema.module.state_dict().values()}
    after = teacher_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # frozen, and untouched by the EMA
    assert run.state.ema.updates == 2


@pytest.mark.slow
@pytest.mark.ray
def test_two_workers_killed_mid_epoch_publish_the_same_average(
    tiny_dataset, tiny_config, ray_cluster, tmp_path, tracking
):
    """Through Ray Train: a worker lost after step 5 (step checkpoints), the run resumed; it publishes,
    bit for bit, the average an uninterrupted run publishes, and that average is the model file."""
    from mlflow.tracking import MlflowClient

    from detkd.data.coco import load_coco
    from detkd.engine.evaluate import evaluate_checkpoint
    from detkd.engine.launch import run_training
    from detkd.engine.worker import TRAIN_STATE

    ema = {"decay": 0.9, "warmup": 3}
    train = {"epochs": 2, "batch_size": 4, "log_every": 1, "checkpoint_every_steps": 1, "ema": ema}
    common = {"train": train, "scaling": {"num_workers": 2}, "tracking": {"log_model": False}}
    killed = tiny_config(tiny_dataset, tmp_path, run={"max_failures": 2}, debug={"fail_at_step": 5}, **common)
    outcome = run_training(Config.model_validate(killed), tracking=tracking)
    assert (tmp_path / "models/tiny/.fault-injected").read_text() == "5"  # the fault really fired
    uninterrupted = Config.model_validate(tiny_config(tiny_dataset, tmp_path, name="whole", **common))
    whole = run_training(uninterrupted, tracking=tracking)

    assert outcome.metrics["step"] == whole.metrics["step"] == 8  # 4 steps per epoch of 2 x 4 images
    assert outcome.metrics["ema/updates"] == 8  # the average resumed, not restarted at the checkpoint
    published, reference = load_payload(outcome.model_path), load_payload(whole.model_path)
    assert all(torch.equal(published["state_dict"][k], v) for k, v in reference["state_dict"].items())
    assert published["meta"]["ema"] == {**ema, "updates": 8}
    assert outcome.metrics["val/AP"] == whole.metrics["val/AP"]  # every worker scored rank 0's average
    assert outcome.metrics["val/AP_raw"] == whole.metrics["val/AP_raw"]

    # the model file is the average of the last checkpoint, and scores as the worker's final val/AP
    folder = next((tmp_path / "ray").glob("tiny-*"))
    state = load_payload(sorted(folder.glob(f"checkpoint_*/{TRAIN_STATE}"))[-1])
    assert state["step"] == 8 and state["ema"]["updates"] == 8
    assert all(torch.equal(published["state_dict"][k], v) for k, v in state["ema"]["weights"].items())
    val = load_coco(tiny_dataset / "annotations/instances_val.json", tiny_dataset / "images/val")
    assert evaluate_checkpoint(outcome.model_path, val).metrics["AP"] == pytest.approx(
        outcome.metrics["val/AP"], abs=1e-9
    )
    run = MlflowClient(tracking.uri).get_run(outcome.run_id)
    assert run.data.metrics["final/ema/updates"] == 8 and run.data.metrics["final/val/AP_raw"] >= 0
