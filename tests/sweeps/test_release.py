"""A trial Tune ended before its Train run finished gives its placement group back (real local Ray)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from detkd.engine.worker import PLACEMENT_GROUP
from detkd.sweeps.tuner import ReleaseTrialPlacementGroups


@pytest.mark.ray
def test_the_group_of_an_ended_trial_is_removed_and_a_removed_one_is_left_alone(ray_cluster):
    import ray
    from ray.util.placement_group import placement_group

    group = placement_group([{"CPU": 0.5}])  # what a killed Train controller leaves: a group with no worker in it
    assert group.wait(30)
    before = ray.available_resources().get("CPU", 0.0)
    trial = SimpleNamespace(trial_id="t1", last_result={PLACEMENT_GROUP: group.id.hex(), "val/AP": 0.5})
    ReleaseTrialPlacementGroups().on_trial_complete(0, [], trial)
    assert ray.util.placement_group_table(group)["state"] == "REMOVED"
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0.0) < before + 0.5 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0.0) >= before + 0.5  # its CPUs are free for the next trial
    ReleaseTrialPlacementGroups().on_trial_error(0, [], trial)  # already removed (by Ray Train, say): nothing to do
    ReleaseTrialPlacementGroups().on_trial_complete(0, [], SimpleNamespace(trial_id="t2", last_result={}))
