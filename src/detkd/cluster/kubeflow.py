"""Kubeflow Pipelines v2: one component per kind of step, and a pipeline compiled from a spec's DAG.

Every component runs ``detkd step SPEC STEP`` in the project's image (a lightweight Python component
whose base image is ``detkd:<version>``, which holds detkd and kfp), so a KFP run does what
``detkd run`` does, step by step: the ``data`` task opens the pipeline's MLflow run and passes its
id on; model tasks output their checkpoint as a Model artifact with its MLflow run id and
validation AP as parameters; ``evaluate`` outputs the summary (a Metrics artifact and the rows
as JSON) and the gate's verdict; registration runs under ``dsl.If(gate == "pass")`` (the version
may become champion), ``dsl.Elif(gate == "speed-at-registration")`` (AP floors met; the register
step measures deployed speed and its gate decides) or ``dsl.Else`` (it is registered as challenger). A model task with a
``ray_address`` hands its training to that Ray cluster through ``detkd submit`` (Ray Jobs API)
instead of training inside its own pod. Tasks share the pipeline's workdir (a volume on a
cluster, a folder with ``kfp.local``) and are named after their steps.

Every task runs inside a ``dsl.ExitHandler`` whose exit task ``finish`` runs after them whatever
happened: it gets the group's ``dsl.PipelineTaskFinalStatus`` and marks the pipeline's MLflow run
FAILED when a task failed (KILLED when the run was cancelled). An exit task may not take another
task's output, so it finds that MLflow run by KFP's run id (``dsl.PIPELINE_JOB_ID_PLACEHOLDER``),
which the data task tagged it with (``detkd.run_key``).

Needs the ``kfp`` extra: ``pip install -c constraints.txt -e ".[kfp]"``.
"""

# no `from __future__ import annotations`: KFP reads the components' annotations as types
from pathlib import Path
from typing import Any, NamedTuple

from kfp import compiler, dsl
from kfp.dsl import Artifact, Dataset, Metrics, Model, Output

from detkd import __version__
from detkd.pipeline.dag import PipelineDag
from detkd.pipeline.step import GATE_AT_REGISTRATION, GATE_PASS

IMAGE = f"detkd:{__version__}"


def detkd_step(
    spec: str, step: str, overrides: list, pipeline_run: str, ray_address: str = "", run_key: str = ""
) -> dict:
    """Run `detkd step` here, or through `detkd submit --follow` on a Ray cluster; its outputs (a dict)."""
    import json
    import subprocess
    import sys

    command = [sys.executable, "-m", "detkd.cli"]
    if ray_address:
        command += ["submit", spec, "--address", ray_address, "--follow", "--step", step]
    else:
        command += ["step", spec, step]
    for item in overrides:
        command += ["--set", item]
    if pipeline_run:
        command += ["--pipeline-run", pipeline_run]
    if run_key:
        command += ["--run-key", run_key]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    print(done.stdout, flush=True)
    if done.returncode != 0:
        raise RuntimeError(f"detkd step {step} failed (exit code {done.returncode})")
    marker = "DETKD_STEP_OUTPUTS "  # detkd.pipeline.step.OUTPUTS_MARKER (a component's code must be self-contained)
    lines = [line for line in done.stdout.splitlines() if line.startswith(marker)]
    if not lines:
        raise RuntimeError(f"detkd step {step} printed no outputs")
    return json.loads(lines[-1][len(marker) :])


@dsl.component(base_image=IMAGE, install_kfp_package=False, additional_funcs=[detkd_step])
def data_component(spec: str, overrides: list, data: Output[Dataset], run_key: str = "") -> NamedTuple(
    "DataOutputs", pipeline_run=str
):
    """Synthesize or check the data and open the pipeline's MLflow run (tagged ``detkd.run_key=run_key``)."""
    import json
    from collections import namedtuple

    outputs = detkd_step(spec, "data", overrides, "", run_key=run_key)  # noqa: F821 (embedded with the component)
    data.metadata.update(folder=outputs["data"], pipeline_run=outputs["pipeline_run"])
    with open(data.path, "w") as handle:
        json.dump(outputs, handle)
    return namedtuple("DataOutputs", ["pipeline_run"])(outputs["pipeline_run"])


def _model_component(kind: str):
    """A component that trains one model step (teacher, student, stage or sweep) and outputs its checkpoint."""

    @dsl.component(base_image=IMAGE, install_kfp_package=False, additional_funcs=[detkd_step])
    def model_component(
        spec: str,
        step: str,
        overrides: list,
        pipeline_run: str,
        data: dsl.Input[Dataset],
        model: Output[Model],
        ray_address: str = "",
    ) -> NamedTuple("ModelOutputs", run_id=str, val_ap=float):
        import shutil
        from collections import namedtuple

        outputs = detkd_step(spec, step, overrides, pipeline_run, ray_address)  # noqa: F821
        shutil.copyfile(outputs["model"], model.path)
        model.metadata.update(mlflow_run_id=outputs["run_id"] or "", checkpoint=outputs["model"])
        val_ap = float(outputs["metrics"].get("val/AP", -1.0))
        return namedtuple("ModelOutputs", ["run_id", "val_ap"])(outputs["run_id"] or "", val_ap)

    model_component.component_spec.name = f"{kind}-step"
    model_component.name = f"{kind}-step"
    return model_component


teacher_component = _model_component("teacher")
student_component = _model_component("student")
stage_component = _model_component("stage")
tune_component = _model_component("tune")


@dsl.component(base_image=IMAGE, install_kfp_package=False, additional_funcs=[detkd_step])
def evaluate_component(
    spec: str, overrides: list, pipeline_run: str, metrics: Output[Metrics], summary: Output[Artifact]
) -> NamedTuple("EvaluateOutputs", gate=str):
    """Score every model on the scoring split; the summary rows and the register gate's verdict."""
    import json
    from collections import namedtuple

    outputs = detkd_step(spec, "evaluate", overrides, pipeline_run)  # noqa: F821
    for row in outputs["rows"]:
        metrics.log_metric(f"{row['name']}/AP", row["AP"])
        metrics.log_metric(f"{row['name']}/images_per_s", row["images_per_s"])
    with open(summary.path, "w") as handle:
        json.dump(outputs["rows"], handle, indent=2)
    return namedtuple("EvaluateOutputs", ["gate"])(outputs["gate"])


@dsl.component(base_image=IMAGE, install_kfp_package=False, additional_funcs=[detkd_step])
def register_component(spec: str, overrides: list, pipeline_run: str) -> NamedTuple(
    "RegisterOutputs", version=str, alias=str
):
    """Register the chosen student; champion only if it passed the gate and beats the current champion."""
    from collections import namedtuple

    outputs = detkd_step(spec, "register", overrides, pipeline_run)  # noqa: F821
    return namedtuple("RegisterOutputs", ["version", "alias"])(str(outputs["version"]), outputs["alias"])


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def finish_component(spec: str, overrides: list, run_key: str, status: dsl.PipelineTaskFinalStatus) -> str:
    """The exit task: mark the pipeline's MLflow run FAILED (KILLED when cancelled) unless every task succeeded."""
    from detkd.pipeline.load import load_pipeline
    from detkd.pipeline.runner import end_pipeline_run_by_key

    state = {"SUCCEEDED": "FINISHED", "CANCELLED": "KILLED"}.get(status.state, "FAILED")
    error = f"{status.pipeline_task_name}: {status.state} {status.error_code or ''} {status.error_message or ''}"
    print(f"pipeline tasks ended {status.state}; the MLflow run of KFP run {run_key} becomes {state}", flush=True)
    found = end_pipeline_run_by_key(load_pipeline(spec, overrides), run_key, status=state, error=error.strip())
    return found or ""


COMPONENTS = {
    "data": data_component,
    "teacher": teacher_component,
    "student": student_component,
    "stage": stage_component,
    "tune": tune_component,
    "evaluate": evaluate_component,
    "register": register_component,
    "finish": finish_component,
}


def build_pipeline(dag: PipelineDag, *, spec: str, overrides: list[str], ray_address: str = ""):
    """A KFP pipeline function whose tasks are ``dag``'s steps, named after them, with the same dependencies."""

    @dsl.pipeline(name=f"detkd-{dag.pipeline}".replace("_", "-"), description=f"detkd pipeline {dag.pipeline}")
    def pipeline() -> None:
        finish = finish_component(spec=spec, overrides=overrides, run_key=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
        finish.set_display_name("finish").set_caching_options(False)
        with dsl.ExitHandler(finish, name="steps"):
            _step_tasks(dag, spec=spec, overrides=overrides, ray_address=ray_address)

    return pipeline


def _step_tasks(dag: PipelineDag, *, spec: str, overrides: list[str], ray_address: str) -> None:
    """One task per step of ``dag`` (inside the pipeline function), with the step's dependencies."""
    tasks: dict[str, Any] = {}
    data = data_component(spec=spec, overrides=overrides, run_key=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
    data.set_display_name("data").set_caching_options(False)
    tasks["data"] = data
    run_id = data.outputs["pipeline_run"]
    for step in dag.steps[1:]:
        others = [tasks[n] for n in step.needs if n != "data"]
        if step.kind in ("teacher", "student", "stage", "tune"):
            task = COMPONENTS[step.kind](
                spec=spec,
                step=step.name,
                overrides=overrides,
                pipeline_run=run_id,
                data=data.outputs["data"],
                ray_address=ray_address,
            )
        elif step.kind == "evaluate":
            task = evaluate_component(spec=spec, overrides=overrides, pipeline_run=run_id)
        else:  # register: champion possible only behind the gate; a failed gate still files a challenger
            gate = tasks["evaluate"].outputs["gate"]
            with dsl.If(gate == GATE_PASS, name="gate-passed"):
                task = register_component(spec=spec, overrides=overrides, pipeline_run=run_id)
            with dsl.Elif(gate == GATE_AT_REGISTRATION, name="gate-speed-at-registration"):
                # AP floors met; the register step measures deployed speed and its gate decides the alias
                measured = register_component(spec=spec, overrides=overrides, pipeline_run=run_id)
                measured.set_display_name("register (speed gate)").set_caching_options(False)
            with dsl.Else(name="gate-failed"):
                challenger = register_component(spec=spec, overrides=overrides, pipeline_run=run_id)
                challenger.set_display_name("register (challenger)").set_caching_options(False)
        task.set_display_name(step.name).set_caching_options(False)  # detkd reuses finished steps itself
        if others:
            task.after(*others)
        tasks[step.name] = task


def compile_pipeline(dag: PipelineDag, out: Path, *, spec: str, overrides: list[str], ray_address: str = "") -> Path:
    """Write the KFP IR YAML of ``dag`` (``spec`` is the spec's path as the tasks will see it)."""
    from detkd.models.checkpoint import atomic_write_bytes

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.compiling.yaml")
    try:
        compiler.Compiler().compile(
            build_pipeline(dag, spec=spec, overrides=overrides, ray_address=ray_address), str(tmp)
        )
        atomic_write_bytes(out, tmp.read_bytes())
    finally:
        tmp.unlink(missing_ok=True)
    return out


def write_components(folder: Path) -> list[Path]:
    """Each component as a KFP component YAML (``components/<kind>.yaml``), for pipelines written by hand."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, component in COMPONENTS.items():
        path = folder / f"{kind}.yaml"
        compiler.Compiler().compile(component, str(path))
        written.append(path)
    return written


if __name__ == "__main__":  # python -m detkd.cluster.kubeflow components/  (regenerate the shipped component files)
    import sys

    for written in write_components(Path(sys.argv[1] if len(sys.argv) > 1 else "components")):
        print(written)
