"""What a sweep optimises and what a trial must meet: objectives, constraints, feasibility, the Pareto front.

A space names its objectives (``{AP: max, speedup: max}``) and constraints
(``{speedup: ">= 3.0", mflops: "<= 55"}``) by short names; each short name is one key of the
trial's reports (``val/AP``, ``speed/speedup``, ``cost/mflops``). Accuracy is the validation
split's; speed is the trial's deployed speed against its reference (``detkd.serving.speed``); cost is
the network's FLOPs and parameters (``detkd.models.cost``), known before the trial trains.

Plain Python: no Ray, no MLflow.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

ACCURACY = ("AP", "AP50", "AP75", "APs", "APm", "APl")
SPEED = ("speedup", "latency_ms", "images_per_s")
COST = ("mflops", "params")
KNOWN = ACCURACY + SPEED + COST
Mode = Literal["max", "min"]
INFEASIBLE = "infeasible"  # a trial's report key: 1.0 when a constraint ruled it out


def metric_key(name: str) -> str:
    """The report key of a short metric name: ``AP`` -> ``val/AP``, ``speedup`` -> ``speed/speedup``."""
    if name in ACCURACY:
        return f"val/{name}"
    if name in SPEED:
        return f"speed/{name}"
    if name in COST:
        return f"cost/{name}"
    raise KeyError(name)


@dataclass(frozen=True)
class Objective:
    name: str
    mode: Mode

    @property
    def key(self) -> str:
        return metric_key(self.name)


@dataclass(frozen=True)
class Constraint:
    """``name op bound``: ``speedup >= 3.0``."""

    name: str
    op: Literal[">=", "<="]
    bound: float

    @property
    def key(self) -> str:
        return metric_key(self.name)

    @property
    def before_training(self) -> bool:
        """A cost bound is known from the untrained network: a trial that breaks it never trains."""
        return self.name in COST

    def holds(self, value: float | None) -> bool:
        if value is None or math.isnan(value):
            return False
        return value >= self.bound if self.op == ">=" else value <= self.bound

    def violation(self, value: float | None) -> float:
        """How far ``value`` is outside the bound (<= 0: met); 1.0 when it was never measured (Optuna's convention)."""
        if value is None or math.isnan(value):
            return 1.0
        return self.bound - value if self.op == ">=" else value - self.bound

    def __str__(self) -> str:
        return f"{self.name} {self.op} {self.bound:g}"


CONSTRAINT_TEXT = re.compile(r"^\s*(>=|<=)\s*([-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?)\s*$")


def parse_constraint(name: str, text: object, *, where: str) -> tuple[Constraint | None, list[str]]:
    """``name: ">= 3.0"`` -> (Constraint, []) or (None, [errors naming ``where`` and the key])."""
    key = f"{where}: constraints.{name}"
    errors = []
    if name not in KNOWN:
        errors.append(f"{key}: unknown metric (known: {', '.join(KNOWN)})")
    match = CONSTRAINT_TEXT.match(str(text)) if isinstance(text, str) else None
    if match is None:
        errors.append(f'{key}: give a bound as a string such as ">= 3.0" or "<= 50", found {text!r}')
    if errors:
        return None, errors
    return Constraint(name=name, op=match.group(1), bound=float(match.group(2))), []


def parse_objectives(objectives: Mapping[str, str], *, where: str) -> tuple[list[Objective], list[str]]:
    """``{AP: max, speedup: max}`` -> objectives, checked: known names, max/min, exactly one accuracy metric
    (the one trials are stopped and chosen on)."""
    errors = []
    parsed = []
    for name, mode in objectives.items():
        key = f"{where}: objectives.{name}"
        if name not in KNOWN:
            errors.append(f"{key}: unknown metric (known: {', '.join(KNOWN)})")
        elif mode not in ("max", "min"):
            errors.append(f"{key}: give max or min, found {mode!r}")
        else:
            parsed.append(Objective(name=name, mode=mode))
    accuracy = [o for o in parsed if o.name in ACCURACY]
    if not errors and len(accuracy) != 1:
        errors.append(
            f"{where}: objectives: name exactly one accuracy metric ({', '.join(ACCURACY)}): trials are stopped "
            f"early and chosen on it; found {[o.name for o in accuracy] or 'none'}"
        )
    if not errors and any(o.name in ACCURACY and o.mode != "max" for o in parsed):
        errors.append(f"{where}: objectives.{accuracy[0].name}: accuracy is maximised (max)")
    return parsed, errors


def unmet(values: Mapping[str, float | None], constraints: Sequence[Constraint]) -> list[str]:
    """The constraints ``values`` (report key -> value) break, as text with the measured value."""
    reasons = []
    for c in constraints:
        value = values.get(c.key)
        if not c.holds(value):
            measured = "not measured" if value is None or math.isnan(value) else f"{value:.4g}"
            reasons.append(f"{c} ({measured})")
    return reasons


def pareto_front(points: Sequence[Sequence[float]], modes: Sequence[Mode]) -> list[int]:
    """Indices of the points no other point dominates (at least as good in every objective, better in one)."""

    def better_or_equal(a: float, b: float, mode: Mode) -> bool:
        return a >= b if mode == "max" else a <= b

    front = []
    for i, p in enumerate(points):
        dominated = any(
            all(better_or_equal(q[k], p[k], m) for k, m in enumerate(modes))
            and any(q[k] != p[k] for k in range(len(modes)))
            for j, q in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return front
