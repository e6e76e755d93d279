"""Search spaces are checked before any trial: one clear error per problem, naming file and key."""

from __future__ import annotations

import pytest

from detkd.config import ConfigError
from detkd.sweeps.space import TEACHER_SEQUENCE, apply_trial, levels_for_scale, load_space, trial_settings
from detkd.sweeps.tuner import param_space


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        ({"optim.learning_rate": {"choice": [0.001]}}, r"parameters\.optim\.learning_rate: unknown config key"),
        ({"optim.lr": {"choice": ["fast"]}}, r"parameters\.optim\.lr: value 'fast': optim\.lr: .*valid number"),
        ({"distill.mgd.weight": {"choice": []}}, r"parameters\.distill\.mgd\.weight: choice needs a non-empty list"),
        ({"optim.lr": {"uniform": [0.01, 0.001]}}, r"parameters\.optim\.lr: uniform needs low < high"),
        ({"optim.lr": {"loguniform": [0.0, 0.1]}}, r"parameters\.optim\.lr: loguniform needs low > 0"),
        ({TEACHER_SEQUENCE: {"grid": [["t_small", "t_huge"]]}}, r"teacher_sequence: unknown teacher 't_huge'"),
        (
            {"input.scale": {"choice": [0.5, 0.0]}},
            r"parameters\.input\.scale: value 0\.0: input\.scale: .*greater than 0",
        ),
        ({"optim.lr": {"between": [1, 2]}}, r"parameters\.optim\.lr: give exactly one of choice, grid"),
        ({"res": {"choice": [{"input.scale": 0.5, "model.levels": 3}]}}, r"parameters\.res: unknown config key"),
    ],
)
def test_a_bad_space_names_the_file_and_the_key(sweep_files, parameters, expected):
    space, _ = sweep_files(parameters)
    with pytest.raises(ConfigError, match=expected) as caught:
        load_space(space)
    assert str(space) in str(caught.value)


def test_every_problem_is_reported_at_once(sweep_files):
    space, _ = sweep_files(
        {
            "optim.lr": {"uniform": [0.01, 0.001]},
            "distill.mgd.weight": {"choice": []},
            "model.fpn_channel": {"choice": [32]},
        }
    )
    with pytest.raises(ConfigError) as caught:
        load_space(space)
    lines = str(caught.value).splitlines()
    assert len(lines) == 3
    assert {line.split(": ")[1] for line in lines} == {
        "parameters.optim.lr",
        "parameters.distill.mgd.weight",
        "parameters.model.fpn_channel",
    }


def test_an_unknown_target_student_is_refused(sweep_files, tmp_path):
    space, _ = sweep_files({"optim.lr": {"choice": [0.001]}})
    text = space.read_text().replace("student: student", "student: pupil")
    space.write_text(text)
    with pytest.raises(ConfigError, match=r"target\.student: 'pupil' is not a student of pipeline tiny"):
        load_space(space)


def test_a_teacher_sequence_becomes_stages_in_order_with_the_budget_split(sweep_files):
    space, _ = sweep_files({TEACHER_SEQUENCE: {"grid": [["t_small", "t_wide"], ["t_wide"]]}})
    loaded = load_space(space)
    assert loaded.needed_teachers == ("t_small", "t_wide")
    two = apply_trial(
        loaded.base,
        *trial_settings(loaded.base, loaded.parameters, {TEACHER_SEQUENCE: ["t_small", "t_wide"]}),
        source="t",
    )
    assert [s.teacher.source for s in two.distill.stages] == ["t_small", "t_wide"]
    assert [s.settings["train"]["epochs"] for s in two.distill.stages] == [2, 1]  # 3 epochs in all
    assert two.distill.teachers == [] and two.distill.mgd.weight == 2.0e-5
    one = apply_trial(loaded.base, {}, ["t_wide"], source="t")
    assert [t.source for t in one.distill.teachers] == ["t_wide"] and not one.distill.stages


def test_a_mapping_value_sets_several_keys_and_null_removes_a_section(sweep_files):
    choice = [{"distill.mgd": None, "distill.ssim.weight": 2.0}, {"distill.mgd.weight": 4.0e-5}]
    space, _ = sweep_files({"method": {"choice": choice}})
    loaded = load_space(space)
    ssim = apply_trial(loaded.base, *trial_settings(loaded.base, loaded.parameters, {"method": choice[0]}), source="t")
    assert ssim.distill.mgd is None and ssim.distill.ssim.weight == 2.0
    assert ssim.method == "ssim"


@pytest.mark.parametrize(
    ("scale", "levels"),
    [(1.0, (3, 7)), (0.5, (2, 6)), (0.25, (2, 5)), (0.75, (3, 7)), (0.3, (2, 5))],
)
def test_pyramid_levels_follow_the_scale_unless_the_space_sets_them(sweep_files, scale, levels):
    space, _ = sweep_files({"input.scale": {"choice": [scale]}})
    loaded = load_space(space)
    assert levels_for_scale(loaded.base, scale) == levels  # the base is P2-P6 at 0.5, i.e. P3-P7 at scale 1
    cfg = apply_trial(loaded.base, {"input.scale": scale}, None, source="t")
    assert (cfg.model.min_level, cfg.model.max_level) == levels
    fixed = apply_trial(
        loaded.base, {"input.scale": scale, "model.min_level": 3, "model.max_level": 5}, None, source="t"
    )
    assert (fixed.model.min_level, fixed.model.max_level) == (3, 5)


def test_searches_refuse_what_they_cannot_enumerate(sweep_files):
    space, _ = sweep_files({"optim.lr": {"loguniform": [1e-4, 1e-2]}, "train.epochs": {"grid": [2, 3]}})
    loaded = load_space(space)
    with pytest.raises(ConfigError, match=r"optim\.lr: loguniform cannot be enumerated by --search grid"):
        param_space(loaded.parameters, "grid", where=str(space))
    with pytest.raises(ConfigError, match=r"train\.epochs: grid cannot be searched by optuna"):
        param_space(loaded.parameters, "optuna", where=str(space))
    assert set(param_space(loaded.parameters, "random", where=str(space))) == {"optim.lr", "train.epochs"}


def test_every_shipped_space_loads_against_its_target(monkeypatch):
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)  # targets are relative to the repository root, where the README runs them
    spaces = sorted(Path("search_spaces").glob("*.yaml"))
    assert {p.stem for p in spaces} >= {"teacher_sequence", "resolution", "loss_weights"}
    for path in spaces:
        assert load_space(path).parameters, path


def test_optuna_searches_the_ranges_and_choices_through_ray_tune(sweep_files):
    pytest.importorskip("optuna", reason="the optuna extra is not installed")
    from ray.tune.search.optuna import OptunaSearch

    from detkd.sweeps.tuner import SweepOptions, tune_config

    space, _ = sweep_files({"optim.lr": {"loguniform": [1e-4, 1e-2]}, "distill.mgd.weight": {"choice": [1e-5, 2e-5]}})
    loaded = load_space(space)
    options = SweepOptions.from_budget(loaded.space.budget, search="optuna", samples=3)
    config = tune_config(loaded, options)
    assert isinstance(config.search_alg, OptunaSearch) and config.num_samples == 3
    assert config.max_concurrent_trials == options.max_concurrent
    assert set(param_space(loaded.parameters, "optuna", where=str(space))) == {"optim.lr", "distill.mgd.weight"}


def test_the_cli_ends_a_bad_space_or_option_with_error_lines_and_exit_2(sweep_files):
    from typer.testing import CliRunner

    from detkd.cli import app

    space, _ = sweep_files({"optim.lr": {"uniform": [0.01, 0.001]}, "model.fpn_channel": {"choice": [32]}})
    result = CliRunner().invoke(app, ["tune", str(space)])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and all(str(space) in line for line in errors)

    good, _ = sweep_files({"optim.lr": {"choice": [0.001]}}, name="good")
    result = CliRunner().invoke(app, ["tune", str(good), "--scheduler", "hyperband"])
    assert result.exit_code == 2 and "error: detkd tune: scheduler:" in result.output
    result = CliRunner().invoke(app, ["tune", str(good), "--resume"])
    assert result.exit_code == 2 and "--resume: no sweep to resume" in " ".join(result.output.split())


def test_relative_paths_of_the_target_become_absolute_for_the_trials(sweep_files, sweep_store, tmp_path, monkeypatch):
    space, pipeline = sweep_files({"optim.lr": {"choice": [0.001]}})
    monkeypatch.chdir(tmp_path)
    pipeline.write_text(pipeline.read_text().replace(str(sweep_store[0]), "work"))  # workdir relative to the cwd
    loaded = load_space(space)
    assert loaded.base.data.train.coco == tmp_path / "work/data/annotations/instances_train.json"
    assert str(loaded.base.run.storage_path).startswith(str(tmp_path))
