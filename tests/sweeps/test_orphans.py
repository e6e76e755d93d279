"""A sweep gives back the placement groups no actor uses any more (real local Ray, a clock the test moves)."""

from __future__ import annotations

import time

import pytest

from detkd.sweeps.orphans import OrphanedGroups


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def free_cpus() -> float:
    import ray

    return ray.available_resources().get("CPU", 0.0)


def wait_for(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.2)
    return condition()


@pytest.mark.ray
def test_an_empty_group_is_released_after_the_grace_and_a_used_one_is_kept(ray_cluster):
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    @ray.remote(num_cpus=0.25)
    class Holder:
        def ping(self) -> str:
            return "ok"

    left = placement_group([{"CPU": 0.5}])  # what a killed Train controller leaves: CPUs reserved, no worker
    used = placement_group([{"CPU": 0.25}])
    assert left.wait(30) and used.wait(30)
    holder = Holder.options(
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=used, placement_group_bundle_index=0)
    ).remote()
    assert ray.get(holder.ping.remote(), timeout=60) == "ok"
    clock = Clock()
    guard = OrphanedGroups(grace_s=100.0, every_s=10.0, clock=clock)
    before = free_cpus()
    try:
        assert guard.scan() == []  # first seen empty: not yet
        clock.now = 50.0
        guard.on_step_end(0, [])
        assert guard.released == []  # within the grace
        clock.now = 55.0
        guard.on_step_end(0, [])  # not a scan: less than every_s since the last
        assert guard.last_scan == 50.0
        clock.now = 101.0
        guard.on_step_end(0, [])
        assert guard.released == [left.id.hex()]
        assert ray.util.placement_group_table(left)["state"] == "REMOVED"
        assert ray.util.placement_group_table(used)["state"] == "CREATED"  # its actor still lives in it
        assert wait_for(lambda: free_cpus() >= before + 0.5)  # the next trial's workers can have them
        clock.now = 500.0
        assert guard.scan() == []  # the group in use stays, however long
        ray.kill(holder)
        assert wait_for(lambda: used.id.hex() in _empty(ray))  # its actor gone: empty from now on
        assert guard.scan() == []
        clock.now = 601.0
        assert guard.scan() == [used.id.hex()]
    finally:
        for group in (left, used):
            if ray.util.placement_group_table(group)["state"] != "REMOVED":
                remove_placement_group(group)


def _empty(ray) -> set[str]:
    from detkd.sweeps.orphans import empty_groups

    context = ray.get_runtime_context()
    return empty_groups(context.gcs_address, context.get_job_id())


@pytest.mark.ray
def test_a_state_api_that_keeps_failing_is_reported_once_and_the_guard_stops_looking(ray_cluster, monkeypatch, caplog):
    from detkd.sweeps import orphans

    answers = iter([RuntimeError("timed out"), set(), RuntimeError("no dashboard")])

    def flaky(address: str, job_id: str) -> set[str]:
        answer = next(answers, RuntimeError("no dashboard"))
        if isinstance(answer, Exception):
            raise orphans.StateUnavailable(f"ConnectionError: {answer}")
        return answer

    monkeypatch.setattr(orphans, "empty_groups", flaky)
    clock = Clock()
    guard = OrphanedGroups(every_s=10.0, clock=clock)
    with caplog.at_level("WARNING", logger="detkd.sweeps.orphans"):
        for k in range(8):
            clock.now = 10.0 * k
            guard.on_step_end(0, [])
    # one failure, an answer (the count starts again), then three in a row: given up, said once
    assert guard.disabled and guard.last_scan == 40.0
    assert len(caplog.records) == 1
    assert "3 times in a row" in caplog.records[0].getMessage() and "no dashboard" in caplog.records[0].getMessage()
