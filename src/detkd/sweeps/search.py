"""Optuna through Ray Tune for several objectives under constraints.

Ray Tune's ``OptunaSearch`` takes a list of metrics for a multi-objective study, but it tells
Optuna nothing about constraints, and a trial that ended without every objective (stopped early
by ASHA, or ruled out before training by a FLOPs bound) reaches Optuna with a missing value that
its ``tell`` refuses. :class:`ConstrainedOptunaSearch` records each trial's constraint violations
on the Optuna trial (``Trial.set_constraint``; NSGA-II and TPE rank infeasible trials behind
feasible ones) before telling it, and tells such trials as pruned.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ray.tune.search.optuna import OptunaSearch

from detkd.sweeps.objectives import Constraint, Objective


class ConstrainedOptunaSearch(OptunaSearch):
    """``OptunaSearch`` over ``objectives`` that tells Optuna each trial's ``constraints``."""

    def __init__(
        self,
        *,
        objectives: Sequence[Objective],
        constraints: Sequence[Constraint],
        sampler_name: str,
        seed: int,
        space: dict[str, Any] | None = None,
    ) -> None:
        import optuna

        if sampler_name == "nsga2":
            sampler = optuna.samplers.NSGAIISampler(seed=seed)
        else:
            sampler = optuna.samplers.TPESampler(seed=seed, multivariate=len(objectives) > 1)
        keys = [o.key for o in objectives]
        modes = [o.mode for o in objectives]
        super().__init__(
            space=space,
            metric=keys if len(keys) > 1 else keys[0],
            mode=modes if len(modes) > 1 else modes[0],
            sampler=sampler,
        )
        self.objectives = tuple(objectives)
        self.constraints = tuple(constraints)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or trial_id in self._completed_trials:
            return super().on_trial_complete(trial_id, result, error)
        values = result or {}
        for c in self.constraints:  # <= 0: met
            ot_trial.set_constraint(str(c), c.violation(values.get(c.key)))
        measured = all(_is_number(values.get(o.key)) for o in self.objectives)
        if not error and not measured:  # stopped early or ruled out: no value for every objective
            from optuna.trial import TrialState

            self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
            self._completed_trials.add(trial_id)
            return None
        return super().on_trial_complete(trial_id, result, error)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value)
