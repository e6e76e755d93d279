"""`detkd run` end to end on a shrunken quickstart; lineage in MLflow; both data formats agree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from factories import SUMMARY_COLUMNS
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from detkd.cli import app

QUICKSTART = Path(__file__).resolve().parents[2] / "pipelines" / "quickstart.yaml"


@pytest.mark.ray
def test_quickstart_pipeline_small(quickstart_small, tmp_path):
    uri, rows, work = quickstart_small.uri, quickstart_small.rows, quickstart_small.work
    runner = CliRunner()
    assert [(r["name"], r["role"], r["method"], r["input_size"]) for r in rows] == [
        ("teacher", "teacher", "kd_off", 64),
        ("student_baseline", "student", "kd_off", 32),
        ("student_ssim", "student", "ssim", 32),
    ]
    for row in rows:
        assert set(row) - {"registered"} == SUMMARY_COLUMNS
        assert row["images_per_s"] > 0 and 0 <= row["AP"] <= row["AP50"] <= 1
        assert row["split"] == "test"  # the quickstart has a held-out split: every model is scored on it
    output = quickstart_small.output
    assert "teacher" in output and rows[0]["mlflow_run_id"] in output, output[-4000:]  # the table

    # lineage: one parent run, children for data, each model and evaluation
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("detkd-quickstart")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("detkd.kind") == "pipeline"]
    assert len(parents) == 1
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert set(children) == {"data", "teacher", "student_baseline", "student_ssim", "evaluate", "register"}
    distilled = children["student_ssim"]
    assert distilled.data.tags["detkd.method"] == "ssim"
    teacher_run = children["teacher"].info.run_id
    assert distilled.data.tags["detkd.teacher.0"] == teacher_run  # linked by MLflow run, the file beside it
    assert distilled.data.tags["detkd.teacher.0.path"] == str(work / "models/teacher/model.pt")
    assert json.loads(distilled.data.tags["detkd.teacher_runs"]) == [teacher_run]
    # the same data has the same digest on every component that read it
    data_tags = children["data"].data.tags
    assert {f"detkd.dataset.{s}" for s in ("train", "val", "test")} <= set(data_tags)
    for name in ("teacher", "student_baseline", "student_ssim"):
        tags = children[name].data.tags
        assert tags["detkd.dataset.train"] == data_tags["detkd.dataset.train"]
        assert tags["detkd.dataset.val"] == data_tags["detkd.dataset.val"]
        assert tags["detkd.pipeline_run"] == parents[0].info.run_id and tags["detkd.version"]
    assert children["evaluate"].data.tags["detkd.dataset.test"] == data_tags["detkd.dataset.test"]
    assert children["register"].data.tags["detkd.dataset.test"] == data_tags["detkd.dataset.test"]
    assert "train/loss_kd_ssim" in distilled.data.metrics
    assert all(r.info.status == "FINISHED" for r in runs)
    assert not quickstart_small.decoy.exists()
    assert all(r.info.experiment_id == exp.experiment_id for r in runs) and len(runs) == 7

    # the quickstart ends by registering its distilled student behind the gate
    assert "registered" in rows[2] and "registered" not in rows[1]
    versions = client.search_model_versions("name = 'detkd-quickstart-student'")
    assert len(versions) == 1 and versions[0].run_id == rows[2]["mlflow_run_id"]
    tags = versions[0].tags
    assert tags["detkd.split"] == "test" and float(tags["detkd.ap"]) == pytest.approx(rows[2]["AP"], abs=1e-4)
    assert float(tags["detkd.gate.baseline_ap"]) == pytest.approx(rows[1]["AP"], abs=1e-4)
    passed = rows[2]["AP"] >= max(0.5, rows[1]["AP"] - 0.02)
    assert tags["detkd.gate.passed"] == str(passed).lower()
    alias = "champion" if passed else "challenger"
    assert rows[2]["registered"] == f"detkd-quickstart-student v1 @{alias}"
    assert str(client.get_model_version_by_alias("detkd-quickstart-student", alias).version) == "1"
    assert children["register"].data.tags["detkd.alias"] == alias
    # every version carries its deployed speed against the student's teacher, measured on this machine, or why
    # not (a one-epoch student can fail the export's check against PyTorch: near-threshold boxes) and its cost
    assert int(tags["detkd.cost.params"]) > 0 and children["register"].data.metrics["cost/params"] > 0
    if "detkd.speed.speedup" in tags:
        assert tags["detkd.speed.reference"] == "teacher" and tags["detkd.speed.machine"]
        speedup = children["register"].data.metrics["speed/speedup"]
        assert speedup == pytest.approx(float(tags["detkd.speed.speedup"]))
        speed_line = f"{speedup:.2f}x teacher ("
    else:
        speed_line = f"not measured ({tags['detkd.speed.unavailable']})"
        assert children["register"].data.tags["detkd.speed.unavailable"] == tags["detkd.speed.unavailable"]

    # detkd lineage of the registered version: the tree back to the data, by digest and run
    shown = runner.invoke(app, ["lineage", "models:/detkd-quickstart-student/1", "--json", "--tracking-uri", uri])
    assert shown.exit_code == 0, shown.output
    tree = json.loads(shown.output)
    assert tree["kind"] == "registered" and tree["label"].startswith("registered detkd-quickstart-student v1")
    assert tree["details"]["speed"].startswith(speed_line)
    (student_node,) = tree["children"]
    assert student_node["run_id"] == rows[2]["mlflow_run_id"]
    datasets = {c["label"] for c in student_node["children"] if c["kind"] == "dataset"}
    assert f"dataset train: {data_tags['detkd.dataset.train']}" in datasets
    (teacher_node,) = [c for c in student_node["children"] if c.get("run_id") == teacher_run]
    assert teacher_node["label"].startswith("teacher 0 <- teacher: teacher")
    assert any(c["kind"] == "dataset" for c in teacher_node["children"])
    by_alias = runner.invoke(app, ["lineage", f"models:/detkd-quickstart-student@{alias}", "--tracking-uri", uri])
    assert by_alias.exit_code == 0 and "teacher 0 <- teacher: teacher" in by_alias.output
    unknown = runner.invoke(app, ["lineage", "models:/nobody@champion", "--tracking-uri", uri])
    assert unknown.exit_code == 2 and "models:/nobody@champion: not found" in unknown.output
    assert (work / "lineage.png").is_file()
    assert "lineage.png" in {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    student = client.get_run(rows[1]["mlflow_run_id"])
    assert student.data.metrics["eval/test/AP"] == pytest.approx(rows[1]["AP"], abs=1e-4)
    assert student.data.params["input.scale"] == "0.5" and student.data.params["model.min_level"] == "2"

    # the student checkpoint evaluates identically from COCO JSON and from Parquet shards
    model = work / "models/student_baseline/model.pt"
    data = work / "data"
    dets = tmp_path / "dets.json"
    coco_eval = runner.invoke(
        app,
        [
            "evaluate",
            "--checkpoint",
            str(model),
            "--coco",
            str(data / "annotations/instances_test.json"),
            "--images",
            str(data / "images/test"),
            "--out",
            str(dets),
            "--summary",
            str(tmp_path / "eval.json"),
        ],
    )
    assert coco_eval.exit_code == 0, coco_eval.output
    to_pq = runner.invoke(
        app,
        [
            "data",
            "to-parquet",
            "--coco",
            str(data / "annotations/instances_test.json"),
            "--images",
            str(data / "images/test"),
            "--out",
            str(tmp_path / "pq"),
            "--shard-size",
            "4",
        ],
    )
    assert to_pq.exit_code == 0, to_pq.output
    pq_eval = runner.invoke(
        app,
        [
            "evaluate",
            "--checkpoint",
            str(model),
            "--parquet",
            str(tmp_path / "pq"),
            "--summary",
            str(tmp_path / "eval_pq.json"),
        ],
    )
    assert pq_eval.exit_code == 0, pq_eval.output
    from_coco = json.loads((tmp_path / "eval.json").read_text())[0]
    from_pq = json.loads((tmp_path / "eval_pq.json").read_text())[0]
    assert from_coco["AP"] == from_pq["AP"] == pytest.approx(rows[1]["AP"], abs=1e-4)
    assert from_coco["name"] == "student_baseline" and from_coco["input_size"] == 32
    # ...and re-scoring the written results file gives the same number again
    rescored = runner.invoke(
        app,
        [
            "evaluate",
            "--gt",
            str(data / "annotations/instances_test.json"),
            "--detections",
            str(dets),
            "--summary",
            str(tmp_path / "re.json"),
        ],
    )
    assert rescored.exit_code == 0, rescored.output
    assert json.loads((tmp_path / "re.json").read_text())[0]["AP"] == from_coco["AP"]


def test_pipeline_spec_errors_are_named(tmp_path):
    spec = tmp_path / "p.yaml"
    spec.write_text(
        "name: x\ndata: {synth: {images: 10}}\nteachers:\n  - name: t\n    settings: {model: {arch: yolo}}\n"
    )
    result = CliRunner().invoke(app, ["run", str(spec)])
    assert result.exit_code == 2
    assert "teachers[0] (t): model.arch" in result.output
    spec.write_text("name: x\ndata: {synth: {images: 10}}\nteachers: [{name: a}, {name: a}]\n")
    result = CliRunner().invoke(app, ["run", str(spec)])
    assert result.exit_code == 2 and "unique" in result.output


def test_pipeline_tracking_settings_have_one_source(tmp_path):
    spec = tmp_path / "p.yaml"
    spec.write_text(
        "name: x\ndata: {synth: {images: 10}}\ndefaults: {tracking: {tracking_uri: 'sqlite:///elsewhere.db'}}\n"
        "teachers: [{name: t}]\n"
    )
    result = CliRunner().invoke(app, ["run", str(spec)])
    assert result.exit_code == 2
    assert "defaults.tracking.tracking_uri" in result.output and "tracking.tracking_uri" in result.output
    spec.write_text(
        "name: x\ndata: {synth: {images: 10}}\nteachers: [{name: t, settings: {tracking: {experiment: other}}}]\n"
    )
    result = CliRunner().invoke(app, ["run", str(spec)])
    assert result.exit_code == 2 and "t.settings.tracking.experiment" in result.output


def test_pipeline_refuses_an_unbuildable_model_before_any_step(tmp_path):
    spec = tmp_path / "p.yaml"
    spec.write_text(
        f"name: x\nworkdir: {tmp_path / 'w'}\ndata: {{synth: {{images: 10}}}}\n"
        "teachers: [{name: t, settings: {model: {fpn_channels: 33}}}]\n"
    )
    result = CliRunner().invoke(app, ["run", str(spec)])
    assert result.exit_code == 2 and "teachers[0] (t)" in result.output and "fpn_channels" in result.output
    assert not (tmp_path / "w").exists()  # not even the data step ran


@pytest.mark.parametrize(
    ("register", "message"),
    [
        ("{model: m, student: nobody}", "register.student: 'nobody' is not a student of this pipeline"),
        ("{model: m, student: s, baseline: t}", "register.baseline: 't' is not a student"),
        ("{model: 'a/b', student: s}", "register.model: 'a/b' cannot be a registered model name"),
        ("{model: m, student: s, gate: {min_ap: 2}}", "register.gate.min_ap"),
    ],
)
def test_register_step_errors_are_named(register, message, tmp_path):
    spec = tmp_path / "p.yaml"
    spec.write_text(
        f"name: x\nworkdir: {tmp_path / 'w'}\ndata: {{synth: {{images: 10}}}}\n"
        f"teachers: [{{name: t}}]\nstudents: [{{name: s}}]\nregister: {register}\n"
    )
    result = CliRunner().invoke(app, ["run", str(spec)])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "w").exists()
