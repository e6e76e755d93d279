"""Plain-torch loop parts: batches independent of the worker count, resumable; lr schedules; RNG round trip."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from detkd.config import OptimConfig
from detkd.engine import rng
from detkd.engine.loop import lr_factor, scaled_lr
from detkd.engine.sampler import EpochBatchSampler


def test_global_batches_are_the_same_for_any_worker_count():
    one = list(EpochBatchSampler(size=50, batch_size=8, seed=3))
    two = [list(EpochBatchSampler(size=50, batch_size=4, rank=r, world_size=2, seed=3)) for r in range(2)]
    assert len(one) == len(two[0]) == len(two[1]) == 6  # 50 // 8, the last partial batch dropped
    for k, batch in enumerate(one):
        assert batch == two[0][k] + two[1][k]
    assert len({i for b in one for i in b}) == 48


def test_epochs_reshuffle_and_resume_skips_exactly_the_trained_batches():
    sampler = EpochBatchSampler(size=40, batch_size=4, seed=0)
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0, start_batch=3)
    assert list(sampler) == first[3:]
    assert len(sampler) == len(first) - 3
    with pytest.raises(ValueError):
        EpochBatchSampler(size=10, batch_size=2, rank=2, world_size=2)


def test_lr_warmup_cosine_and_step_schedules():
    cosine = OptimConfig(warmup_iters=10, schedule="cosine")
    assert lr_factor(0, total_steps=110, optim=cosine) == pytest.approx(0.1)
    assert lr_factor(9, total_steps=110, optim=cosine) == pytest.approx(1.0)
    assert lr_factor(60, total_steps=110, optim=cosine) == pytest.approx(0.5)
    assert lr_factor(110, total_steps=110, optim=cosine) == pytest.approx(0.0, abs=1e-12)
    step = OptimConfig(warmup_iters=0, schedule="step", milestones=[0.5, 0.75], gamma=0.1)
    assert [lr_factor(s, total_steps=100, optim=step) for s in (0, 49, 50, 75, 99)] == pytest.approx(
        [1, 1, 0.1, 0.01, 0.01]
    )
    assert scaled_lr(OptimConfig(lr=0.01, base_batch_size=16, lr_scaling="linear"), 64) == pytest.approx(0.04)
    assert scaled_lr(OptimConfig(lr=0.01, base_batch_size=16, lr_scaling="sqrt"), 64) == pytest.approx(0.02)
    assert scaled_lr(OptimConfig(lr=0.01, base_batch_size=16, lr_scaling="none"), 64) == pytest.approx(0.01)


def test_rng_capture_restore_round_trip_through_a_weights_only_checkpoint(tmp_path):
    from detkd.models.checkpoint import load_payload, save_payload

    rng.seed_everything(7)
    save_payload(tmp_path / "s.pt", {"rng": rng.capture()})
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    rng.seed_everything(99)
    rng.restore(load_payload(tmp_path / "s.pt")["rng"])
    got = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]
