"""``pipelines/transformer_teacher.yaml``: it validates, each distilled student names its teachers and methods,
and a missing backbone-teacher folder stops it before any step trains, naming the command that makes it.

Skipped without the ``hf`` extra, unless ``DETKD_REQUIRE_HF=1`` (CI sets it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

try:
    import transformers  # noqa: F401
except ImportError as exc:
    if os.environ.get("DETKD_REQUIRE_HF") == "1":
        raise RuntimeError(f"DETKD_REQUIRE_HF=1 but the hf extra is missing: {exc}") from None
    pytest.skip("the hf extra: pip install -c constraints.txt -e '.[hf]'", allow_module_level=True)

from detkd.config import ConfigError  # noqa: E402
from detkd.pipeline.spec import model_config, read_pipeline  # noqa: E402

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
    with pytest.raises(ConfigError) as info:
        read_pipeline(PIPELINE)
    message = str(info.value)
    assert "student_vit" in message
    assert f"detkd models pretrain-vit --pipeline <this pipeline> --out {BACKBONE}" in message
    read_pipeline(PIPELINE, backbones=False)  # what pretrain-vit reads to find the train images


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
