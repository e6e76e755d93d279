"""Test-only fault injection, kept out of the training loop: a step hook that kills one worker once.

Enabled by ``debug.fail_at_step`` (never in real runs). It proves that a lost worker is
restarted from the last checkpoint with no step lost and few repeated.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from detkd.config import DebugConfig

log = logging.getLogger("detkd.train")
MARKER = ".fault-injected"


class FaultInjection:
    """Step hook: the worker of rank ``target_rank`` exits after step ``step``, once per run
    (a marker file in the run's output folder remembers that it fired)."""

    def __init__(self, *, step: int, target_rank: int, rank: int, marker: Path) -> None:
        self.step, self.target_rank, self.rank, self.marker = step, target_rank, rank, Path(marker)

    @classmethod
    def from_config(cls, debug: DebugConfig, *, world_size: int, rank: int, out_dir: Path) -> FaultInjection:
        target = debug.fail_rank % world_size
        return cls(step=debug.fail_at_step, target_rank=target, rank=rank, marker=Path(out_dir) / MARKER)

    def __call__(self, state, result, batch_images: int) -> None:
        if state.step != self.step or self.rank != self.target_rank or self.marker.exists():
            return
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        self.marker.write_text(str(state.step))  # once: the restarted worker must get past this step
        log.warning(f"debug.fail_at_step: killing worker {self.rank} after step {state.step}")
        # Ray's controller collects reports every health-check interval (2 s); a crash sooner than
        # that after a checkpoint loses the checkpoint too. Model a crash some time after the last one.
        time.sleep(float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2.0")) + 1.0)
        os._exit(1)
