"""``pipelines/transformer_teacher.yaml``: it validates, each distilled student names its teachers and methods,
and a missing backbone-teacher folder stops ``detkd run`` before any step trains, naming the command that makes it.

Skipped without the ``hf`` extra, unless ``DETKD_REQUIRE_HF=1`` (CI sets it)."""

from __future__ import annotations

from pathlib import Path

import pytest
from factories import require_hf

require_hf()  # before anything imports transformers

from detkd.config import ConfigError  # noqa: E402
from detkd.pipeline.dag import build_dag, format_dag  # noqa: E402
from detkd.pipeline.runner import run_pipeline  # noqa: E402
from detkd.pipeline.spec import check_backbone_teachers, model_config, read_pipeline  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = ROOT / "pipelines/transformer_teacher.yaml"
BACKBONE = "runs/transformer_teacher/vit_dino"


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A working directory with the repo's configs and no runs/: the pipeline's relative paths resolve here."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_missing_backbone_folder_is_refused_naming_the_command_that_makes_it(workdir):
    spec = read_pipeline(PIPELINE)  # plan and pretrain-vit --pipeline read it before the folder exists
    with pytest.raises(ConfigError) as info:
        check_backbone_teachers(spec)
    message = str(info.value)
    assert "students[2] (student_vit)" in message
    assert f"detkd models pretrain-vit --pipeline <this pipeline> --out {BACKBONE}" in message
    with pytest.raises(ConfigError, match="pretrain-vit"):  # detkd run: before the data, MLflow or Ray
        run_pipeline(spec)
    assert not (workdir / "runs").exists() and not (workdir / "mlflow.db").exists()
    (workdir / BACKBONE).mkdir(parents=True)
    check_backbone_teachers(spec)


def test_the_students_name_their_teachers_and_methods(workdir):
    (workdir / BACKBONE).mkdir(parents=True)
    spec = read_pipeline(PIPELINE)
    teacher = model_config(spec, spec.teachers[0], role="teacher")
    assert teacher.model.arch == "hf" and teacher.input.size == 128
    students = {entry.name: model_config(spec, entry, role="student") for entry in spec.students}
    assert list(students) == ["student_baseline", "student_rtdetr", "student_vit", "student_both"]
    assert all(cfg.input.model_size == 64 and cfg.model.design == "lite" for cfg in students.values())
    assert students["student_baseline"].distill is None
    both = students["student_both"].distill
    assert [ref.label for ref in both.teachers] == ["rtdetr_teacher", f"backbone {BACKBONE}"]
    assert (both.ssim.teacher, both.cosine.teacher) == (0, 1)
    assert students["student_vit"].distill.teachers[0].backbone == BACKBONE
    plan = format_dag(build_dag(spec))
    assert "kd_off, hf/rtdetr_tiny, 128 px" in plan and "P3-P7" not in plan  # the plan names the transformers config
