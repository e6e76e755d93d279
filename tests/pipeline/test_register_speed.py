"""The register step measures the student's deployed speed against its reference, the gate's speed floor
decides on it, and the version, the register run and ``detkd lineage`` carry it. Real MLflow (SQLite),
real ONNX Runtime; untrained models (what registering needs, without training)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from factories import registrable_model, write_yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from detkd.cli import app
from detkd.config import ConfigError
from detkd.pipeline.dag import build_dag
from detkd.pipeline.runner import run_register_step
from detkd.pipeline.spec import read_pipeline
from detkd.pipeline.step import gate_verdict
from detkd.records import SummaryRow, TrainOutcome
from detkd.tracking.registry import CHALLENGER, CHAMPION
from detkd.tracking.runs import experiment_id

# short turns: the student against itself is ~1.0x, far from the floors 0.5 and 2.0 (2 turns of 3 calls left it
# outside them once on a machine loaded by a sweep beside the tests)
QUICK_SPEED = {"turns": 4, "calls": 10, "images": 2}


def write_spec(path, *, dataset, uri: str, work) -> object:
    """A pipeline of two students ``a`` and ``b`` on ``dataset`` that registers ``a`` as ``m``."""
    return write_yaml(
        path,
        {
            "name": "gated",
            "workdir": str(work),
            "tracking": {"experiment": "detkd", "tracking_uri": uri},
            "data": {
                split: {"coco": f"{dataset}/annotations/instances_{split}.json", "images": f"{dataset}/images/{split}"}
                for split in ("train", "val")
            },
            "defaults": {"model": {"arch": "fcos", "backbone": "tiny", "fpn_channels": 32, "head_convs": 1}},
            "students": [{"name": "a"}, {"name": "b"}],
            "register": {"model": "m", "student": "a", "gate": {"speed": QUICK_SPEED}},
        },
    )  # fmt: skip


def rows_of(run_ids: dict[str, str | None]) -> list[SummaryRow]:
    return [SummaryRow(name, "student", 64, "val", 0.3, 0.5, 0.1, 10.0, run_id) for name, run_id in run_ids.items()]


@pytest.fixture(scope="module")
def students(tiny_dataset, tiny_config, tmp_path_factory):
    """Two untrained students ``a`` and ``b`` (each a finished run with a logged model), their pipeline spec,
    and ``register(*overrides)``: the register step of that spec with ``overrides``."""
    work = tmp_path_factory.mktemp("register-speed")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    outcomes = {}
    for seed, name in enumerate(("a", "b")):
        path = work / "models" / name / "model.pt"
        run_id, _ = registrable_model(tiny_config(tiny_dataset, work), path, tracking_uri=uri, seed=seed)
        outcomes[name] = TrainOutcome(name, "student", path, run_id)
    spec_file = write_spec(work / "p.yaml", dataset=tiny_dataset, uri=uri, work=work / "work")
    run_ids = {name: outcome.run_id for name, outcome in outcomes.items()}
    client = MlflowClient(uri)

    def register(*overrides: str):
        spec = read_pipeline(spec_file, list(overrides))
        parent = client.create_run(experiment_id(uri, "detkd"), run_name="pipeline").info.run_id
        rows = rows_of(run_ids)
        return run_register_step(spec, rows, outcomes, None, "val", "one-split", parent_run_id=parent, configs={})

    return SimpleNamespace(uri=uri, client=client, register=register, run_ids=run_ids)


def test_the_speed_floor_decides_on_the_measured_speedup(students):
    client = students.client
    # each student against itself: ~1.0x, which meets a floor of 0.5 and misses a floor of 2.0
    fast = students.register("register.gate.min_speedup=0.5", "register.gate.speed.reference=a")
    assert (fast.alias, fast.gate.passed) == (CHAMPION, True)
    tags = client.get_model_version("m", fast.version).tags
    assert 0.5 < float(tags["detkd.speed.speedup"]) < 2.0
    assert float(tags["detkd.speed.latency_ms"]) > 0 and float(tags["detkd.speed.reference_latency_ms"]) > 0
    assert float(tags["detkd.speed.images_per_s"]) > 0 and "detkd.speed.speedup_spread" in tags
    assert tags["detkd.speed.reference"] == "a" and tags["detkd.speed.turns"] == "4 x 10 calls"
    assert tags["detkd.speed.machine"] and "1 thread(s)" in tags["detkd.speed.backend"]
    assert float(tags["detkd.cost.mflops"]) > 0 and int(tags["detkd.cost.params"]) > 0
    assert (tags["detkd.gate.min_speedup"], tags["detkd.gate.max_latency_ms"]) == ("0.5", "None")
    # the register run logs the same numbers
    registered_from = f"tags.`detkd.candidate_run` = '{students.run_ids['a']}'"
    (run,) = client.search_runs(
        [experiment_id(students.uri, "detkd")], f"attributes.run_name = 'register' and {registered_from}"
    )
    assert run.data.metrics["speed/speedup"] == pytest.approx(float(tags["detkd.speed.speedup"]))
    assert run.data.metrics["cost/params"] == int(tags["detkd.cost.params"])
    assert run.data.tags["detkd.speed.reference"] == "a"

    slow = students.register("register.student=b", "register.gate.min_speedup=2.0", "register.gate.speed.reference=b")
    assert (slow.alias, slow.gate.passed) == (CHALLENGER, False)
    (reason,) = slow.gate.reasons
    assert reason.startswith("speedup ") and reason.endswith("x < floor 2x against b (onnxruntime, 1 thread)")
    assert client.get_model_version("m", slow.version).tags["detkd.gate.reasons"] == reason

    # detkd lineage shows the version's speed and cost on lines of their own
    shown = CliRunner().invoke(app, ["lineage", f"models:/m/{fast.version}", "--tracking-uri", students.uri])
    assert shown.exit_code == 0, shown.output
    speed_line = next(line for line in shown.output.splitlines() if "speed:" in line)
    assert f"{float(tags['detkd.speed.speedup']):.2f}x a (" in speed_line and "ms/image" in speed_line
    assert "onnxruntime" in shown.output and tags["detkd.speed.machine"].split()[0] in shown.output
    assert "cost:" in shown.output and "MFLOPs" in shown.output


def test_a_speed_floor_without_a_reference_fails_and_says_why(students):
    """No teacher anywhere and no reference named: nothing to measure against, so the floor cannot pass."""
    result = students.register("register.model=m-unmeasured", "register.gate.max_latency_ms=1000")
    assert (result.alias, result.gate.passed) == (CHALLENGER, False)
    (reason,) = result.gate.reasons
    assert reason.startswith("deployed speed not measured, so the speed floor cannot pass (no reference:")
    tags = students.client.get_model_version("m-unmeasured", result.version).tags
    assert tags["detkd.speed.unavailable"].startswith("no reference:") and "detkd.speed.speedup" not in tags
    assert int(tags["detkd.cost.params"]) > 0  # the cost is recorded all the same


def test_the_evaluate_steps_verdict_leaves_a_speed_floor_to_registration(tiny_dataset, tmp_path):
    spec_file = write_spec(tmp_path / "p.yaml", dataset=tiny_dataset, uri=f"sqlite:///{tmp_path}/db", work=tmp_path)
    evaluation = SimpleNamespace(rows=rows_of({"a": "ra", "b": "rb"}), split="val")
    assert gate_verdict(read_pipeline(spec_file), evaluation) == "pass"
    floored = read_pipeline(spec_file, ["register.gate.min_speedup=3"])
    assert gate_verdict(floored, evaluation) == "speed-at-registration"  # never "pass" for an unmeasured floor
    failing = read_pipeline(spec_file, ["register.gate.min_speedup=3", "register.gate.min_ap=0.9"])
    assert gate_verdict(failing, evaluation) == "fail"
    # detkd plan says what the register step will measure
    assert "speedup >= 3x a's teacher (ONNX Runtime, 1 thread(s), measured at registration)" in (
        build_dag(floored).step("register").detail
    )


def test_the_gate_speaks_only_the_deployed_speed(tiny_dataset, tmp_path):
    spec_file = write_spec(tmp_path / "p.yaml", dataset=tiny_dataset, uri=f"sqlite:///{tmp_path}/db", work=tmp_path)
    with pytest.raises(ConfigError, match=r"register\.gate: .*min_images_per_s is gone .* give min_speedup"):
        read_pipeline(spec_file, ["register.gate.min_images_per_s=10"])
    with pytest.raises(ConfigError, match=r"register\.gate\.speed\.reference: 'nobody' is neither a model"):
        read_pipeline(spec_file, ["register.gate.speed.reference=nobody"])
    checkpoint = tmp_path / "teacher.pt"
    checkpoint.write_bytes(b"any file")
    spec = read_pipeline(spec_file, [f"register.gate.speed.reference={checkpoint}"])  # a checkpoint file will do
    assert spec.registration.gate.speed.reference == str(checkpoint)
