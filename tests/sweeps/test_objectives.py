"""Objectives, constraints, the Pareto front and the constrained Optuna searcher (no Ray trials)."""

from __future__ import annotations

import math

import pytest
import yaml

from detkd.config import ConfigError
from detkd.sweeps.objectives import Constraint, Objective, pareto_front, parse_constraint, parse_objectives, unmet
from detkd.sweeps.space import load_space


def test_constraints_parse_and_say_what_they_miss():
    speed, errors = parse_constraint("speedup", ">= 3.0", where="s.yaml")
    assert errors == [] and speed == Constraint("speedup", ">=", 3.0) and speed.key == "speed/speedup"
    flops, _ = parse_constraint("mflops", "<=55", where="s.yaml")
    assert flops.before_training and not speed.before_training
    assert unmet({"speed/speedup": 3.2, "cost/mflops": 50.0}, [speed, flops]) == []
    assert unmet({"speed/speedup": 2.41, "cost/mflops": 50.0}, [speed, flops]) == ["speedup >= 3 (2.41)"]
    assert unmet({"cost/mflops": 50.0}, [speed]) == ["speedup >= 3 (not measured)"]
    assert speed.violation(2.5) == pytest.approx(0.5) and flops.violation(50.0) == pytest.approx(-5.0)
    assert speed.violation(float("nan")) == 1.0
    _, errors = parse_constraint("speed", "> 3", where="s.yaml")
    assert len(errors) == 2 and errors[0].startswith("s.yaml: constraints.speed: unknown metric")
    assert 'give a bound as a string such as ">= 3.0"' in errors[1]


def test_objectives_need_exactly_one_accuracy_metric():
    objectives, errors = parse_objectives({"AP": "max", "speedup": "max"}, where="s.yaml")
    assert errors == [] and [o.key for o in objectives] == ["val/AP", "speed/speedup"]
    _, errors = parse_objectives({"speedup": "max", "latency_ms": "min"}, where="s.yaml")
    assert errors and "exactly one accuracy metric" in errors[0]
    _, errors = parse_objectives({"AP": "max", "AP50": "max"}, where="s.yaml")
    assert errors and "['AP', 'AP50']" in errors[0]
    _, errors = parse_objectives({"AP": "up"}, where="s.yaml")
    assert errors == ["s.yaml: objectives.AP: give max or min, found 'up'"]


def test_the_front_keeps_what_nothing_beats_in_every_objective():
    points = [[0.60, 1.0], [0.55, 3.1], [0.50, 3.0], [0.58, 2.0], [0.60, 0.9], [0.40, 4.0]]
    assert pareto_front(points, ["max", "max"]) == [0, 1, 3, 5]
    # a minimised objective: latency (lower is better)
    assert pareto_front([[0.6, 10.0], [0.5, 4.0], [0.5, 5.0]], ["max", "min"]) == [0, 1]
    assert pareto_front([[0.5, 1.0], [0.5, 1.0]], ["max", "max"]) == [0, 1]  # equal points both stay


def space_file(tmp_path, tiny_dataset, tiny_config, **space):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tiny_dataset, tmp_path)))
    data = {"name": "s", "target": {"config": str(config)}, "parameters": {"optim.lr": {"choice": [0.001, 0.002]}}}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({**data, **space}, sort_keys=False))
    return path


def test_a_space_with_objectives_and_constraints_loads_and_bad_ones_name_their_key(tmp_path, tiny_dataset, tiny_config):
    reference = tmp_path / "reference.pt"
    reference.write_bytes(b"a checkpoint file")
    path = space_file(
        tmp_path,
        tiny_dataset,
        tiny_config,
        objectives={"AP": "max", "speedup": "max"},
        constraints={"speedup": ">= 2.0", "mflops": "<= 30"},
        speed={"reference": str(reference), "turns": 3},
    )
    loaded = load_space(path)
    assert loaded.metric_key == "val/AP" and loaded.needs_speed
    assert [str(c) for c in loaded.constraints] == ["speedup >= 2", "mflops <= 30"]
    assert loaded.space.speed.turns == 3

    single = load_space(space_file(tmp_path, tiny_dataset, tiny_config, metric="AP50"))
    assert [o.key for o in single.objectives] == ["val/AP50"] and not single.constraints

    path = space_file(tmp_path, tiny_dataset, tiny_config, objectives={"AP": "max", "speedup": "max"})
    with pytest.raises(ConfigError, match=r"space.yaml: speed.reference: speedup is measured against a reference"):
        load_space(path)  # a teacher trained from scratch: nothing to be faster than
    path = space_file(
        tmp_path,
        tiny_dataset,
        tiny_config,
        objectives={"AP": "max"},
        constraints={"flops": "<= 3"},
        speed={"reference": "no_such_teacher"},
    )
    with pytest.raises(ConfigError) as info:
        load_space(path)
    lines = str(info.value).splitlines()
    assert any("constraints.flops: unknown metric" in line for line in lines)
    assert any("speed.reference: 'no_such_teacher' is neither a teacher" in line for line in lines)
    path = space_file(tmp_path, tiny_dataset, tiny_config, metric="AP", objectives={"AP": "max"})
    with pytest.raises(ConfigError, match="give metric .one objective. or objectives, not both"):
        load_space(path)


def test_the_constrained_optuna_searcher_tells_optuna_violations_and_prunes_unmeasured_trials():
    pytest.importorskip("optuna")
    from optuna.trial import TrialState
    from ray import tune

    from detkd.sweeps.search import ConstrainedOptunaSearch

    objectives = [Objective("AP", "max"), Objective("speedup", "max")]
    constraints = [Constraint("speedup", ">=", 3.0)]
    searcher = ConstrainedOptunaSearch(objectives=objectives, constraints=constraints, sampler_name="nsga2", seed=0)
    assert searcher.set_search_properties(None, None, {"width": tune.choice([16, 32, 64])})
    for trial_id in ("fast", "slow", "stopped"):
        assert searcher.suggest(trial_id)["width"] in (16, 32, 64)
    searcher.on_trial_complete("fast", {"val/AP": 0.5, "speed/speedup": 3.4})
    searcher.on_trial_complete("slow", {"val/AP": 0.7, "speed/speedup": 1.2})
    searcher.on_trial_complete("stopped", {"val/AP": 0.2})  # ASHA stopped it: no speed
    study = searcher._ot_study
    by_state = {t.number: t for t in study.trials}
    fast, slow, stopped = by_state[0], by_state[1], by_state[2]
    assert fast.state == slow.state == TrialState.COMPLETE and stopped.state == TrialState.PRUNED
    assert fast.values == [0.5, 3.4] and not math.isnan(fast.values[0])
    # the violations Optuna's samplers read (<= 0: met): infeasible trials rank behind feasible ones
    assert fast.constraints == {"speedup >= 3": pytest.approx(-0.4)}
    assert slow.constraints == {"speedup >= 3": pytest.approx(1.8)}  # 1.8 short of the bound
    assert stopped.constraints == {"speedup >= 3": 1.0}  # never measured
    # one objective: the same searcher, Optuna single-objective
    single = ConstrainedOptunaSearch(objectives=objectives[:1], constraints=[], sampler_name="tpe", seed=0)
    assert single.metric == "val/AP" and single.mode == "max"
