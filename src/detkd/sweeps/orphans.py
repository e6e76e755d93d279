"""Give back the CPUs of Ray placement groups that no actor uses any more (a sweep's guard).

Each trial's Ray Train controller creates a placement group for its workers. The group belongs to
the sweep's Ray job, not to the controller: when Tune stops a trial (ASHA) the controller dies
with the trial, and Ray Train's detached cleaner is meant to remove the group. It misses some (a
group created while the worker group was starting is not yet registered with it; a state-API
call that fails ends its watch), and a missed group keeps its CPUs reserved with no worker in
it. On a cluster sized for ``max_concurrent`` trials the next trial's workers then wait for
those CPUs forever: a 32-trial ASHA sweep on 2 CPUs stalled twice that way.

``OrphanedGroups`` is a Tune callback on the sweep's driver. Every ``every_s`` it lists the job's
created, non-detached groups and the actors still alive or starting in them; a group that has
had none for ``grace_s`` is removed. A group in use always holds an actor: Tune's trial
actor, or Ray Train's workers from the moment its group is ready. So an empty group that
stays empty is one nobody will use.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ray import tune

log = logging.getLogger(__name__)

GRACE_S = 120.0
EVERY_S = 20.0
LIST_LIMIT = 10_000  # the state API's lists stop at 100 by default; its server refuses more than 10 000
TRIES = 3  # state-API failures in a row before the guard gives up (a loaded head may time out once)


class StateUnavailable(RuntimeError):
    """Ray's state API did not answer (no dashboard on this cluster, or it timed out)."""


def empty_groups(address: str, job_id: str) -> set[str]:
    """Ids of the job's created, non-detached placement groups with no actor alive or starting in them."""
    from ray.util.state import list_actors, list_placement_groups

    try:
        groups = list_placement_groups(
            address=address,
            filters=[("state", "=", "CREATED"), ("creator_job_id", "=", job_id)],
            detail=True,
            limit=LIST_LIMIT,
            raise_on_missing_output=False,
        )
        actors = list_actors(
            address=address,
            filters=[("state", "!=", "DEAD")],
            detail=True,
            limit=LIST_LIMIT,
            raise_on_missing_output=False,
        )
    except Exception as exc:  # the state API raises several kinds (no dashboard, HTTP errors, timeouts)
        raise StateUnavailable(f"{type(exc).__name__}: {exc}") from exc
    in_use = {a.placement_group_id for a in actors if a.placement_group_id}
    return {g.placement_group_id for g in groups if not g.is_detached and g.placement_group_id not in in_use}


def remove_group(group_id: str) -> None:
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(group_id))))


class OrphanedGroups(tune.Callback):
    """Removes the sweep job's placement groups that stay empty for ``grace_s`` (see the module)."""

    def __init__(
        self,
        *,
        grace_s: float = GRACE_S,
        every_s: float = EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.grace_s = grace_s
        self.every_s = every_s
        self.clock = clock
        self.empty_since: dict[str, float] = {}
        self.released: list[str] = []
        self.last_scan = float("-inf")
        self.failures = 0
        self.disabled = False

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        if self.disabled or self.clock() - self.last_scan < self.every_s:
            return
        self.scan()

    def scan(self) -> list[str]:
        """One look: the groups removed now (their ids)."""
        import ray

        now = self.clock()
        self.last_scan = now
        context = ray.get_runtime_context()
        try:
            empty = empty_groups(context.gcs_address, context.get_job_id())
        except StateUnavailable as exc:
            self.failures += 1
            if self.failures >= TRIES:
                self.disabled = True
                log.warning(
                    "Ray's state API did not answer %d times in a row (%s): this sweep cannot give back placement "
                    "groups a stopped trial leaves behind; on a cluster with no spare CPUs for them, later trials "
                    "may wait",
                    self.failures,
                    exc,
                )
            return []
        self.failures = 0
        self.empty_since = {group: self.empty_since.get(group, now) for group in empty}
        removed = []
        for group, since in list(self.empty_since.items()):
            if now - since < self.grace_s:
                continue
            try:
                remove_group(group)
            except Exception as exc:  # removed meanwhile (by Ray Train's cleaner, say): nothing left to give back
                log.debug("placement group %s: not removed (%s)", group, exc)
            else:
                removed.append(group)
                log.info(
                    "released placement group %s: no actor has used it for %.0f s (a stopped trial's Train "
                    "workers left it behind)",
                    group,
                    now - since,
                )
            del self.empty_since[group]
        self.released.extend(removed)
        return removed
