"""Submit pipelines and runs to a Ray cluster through the Ray Jobs API.

The job ships the project folder (code, configs, pipeline specs; not data, git
history, MLflow stores, checkpoints, what .gitignore lists, or files that usually
hold credentials) as its working directory and runs the same ``detkd`` command
there that you would run locally. Secrets travel as ``--env`` values, never in the
command line (job metadata).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from detkd.config import ConfigError
from detkd.pipeline.events import MARKER, STEPS_METADATA
from detkd.tracking.redact import has_credentials

log = logging.getLogger(__name__)

# gitignore syntax, relative to the project root ("/data" would otherwise also drop src/detkd/data)
EXCLUDES = [
    "/.git",
    "/.venv",
    "/venv",
    "/data",
    "/runs",
    "/mlruns",
    "/mlartifacts",
    "/mlflow.db",
    "/ray_results",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.parquet",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "*.egg-info",
]
# Never shipped, whatever .gitignore says (Ray also leaves out what the project's .gitignore lists):
# files that usually hold credentials. Pass secrets to a job with --env instead.
SECRET_EXCLUDES = [
    ".env",
    ".env.*",
    "*.env",
    ".envrc",
    ".netrc",
    ".pgpass",
    ".git-credentials",
    ".aws/",
    ".ssh/",
    ".kube/",
    ".docker/",
    "kubeconfig",
    "*.kubeconfig",
    "credentials",
    "credentials.*",
    "*credentials*.json",
    "service-account*.json",
    "secrets.yaml",
    "secrets.yml",
    "*.secret",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "id_rsa*",
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def client(address: str):
    from ray.job_submission import JobSubmissionClient

    from detkd.engine.ray_instance import use_local_token

    use_local_token()
    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # connection errors come in many types
        raise ConfigError(f"cannot reach the Ray cluster at {address}: {str(exc).splitlines()[0]}") from None


def command_for(
    spec: Path,
    project_root: Path,
    overrides: list[str],
    *,
    parallel: int | None = None,
    step: str | None = None,
    pipeline_run: str | None = None,
) -> list[str]:
    """``detkd run|train|distill`` for a pipeline spec or a run config, path relative to the project.

    ``parallel`` (pipelines only) becomes ``detkd run --parallel N``: up to N steps train at once there;
    ``step`` runs one step of a pipeline instead (``detkd step``, joining ``pipeline_run``)."""
    spec = spec.resolve()
    try:
        relative = spec.relative_to(project_root.resolve())
    except ValueError:
        raise ConfigError(
            f"{spec}: must be inside the project folder {project_root} so it travels with the job"
        ) from None
    data = yaml.safe_load(spec.read_text()) if spec.is_file() else None
    if not isinstance(data, dict):
        raise ConfigError(f"{spec}: not a YAML mapping (a pipeline spec or a run config)")
    if "teachers" in data or "students" in data:
        verb = "run"
    elif data.get("distill"):
        verb = "distill"
    else:
        verb = "train"
    for item in overrides:
        if has_credentials(item):  # the command line is job metadata anyone with the dashboard reads
            raise ConfigError(
                f"--set {item.split('=', 1)[0]}=...: the value carries a credential (a password in a URI or a "
                "secret query parameter); it would be stored in the job's metadata. Pass it with --env instead "
                "(e.g. MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, AWS_SECRET_ACCESS_KEY)"
            )
    if (parallel is not None or step is not None) and verb != "run":
        raise ConfigError(f"{spec}: --parallel and --step apply to pipeline specs (teachers/students), not to a run")
    if step is not None and parallel is not None:
        raise ConfigError("--step runs one step; --parallel is for a whole pipeline")
    if step is None:
        command = ["python", "-m", "detkd.cli", verb, str(relative)]
    else:
        command = ["python", "-m", "detkd.cli", "step", str(relative), step]
        if pipeline_run:
            command += ["--pipeline-run", pipeline_run]
    for item in overrides:
        command += ["--set", item]
    if parallel is not None:
        command += ["--parallel", str(parallel)]
    return command


def check_model_references(spec: Path, env: dict[str, str]) -> None:
    """Teachers named ``models:/...`` or ``mlflow:<run_id>`` are fetched on the cluster, from the tracking
    server passed on to the job; a local store (the default ./mlflow.db) is not there to fetch from."""
    text = Path(spec).read_text()
    if "models:/" not in text and "mlflow:" not in text:
        return
    uri = env.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://", "databricks")):
        raise ConfigError(
            f"{spec}: names models:/ or mlflow: teachers, which the job fetches from MLflow on the cluster; "
            "set MLFLOW_TRACKING_URI (or --env MLFLOW_TRACKING_URI=...) to a tracking server the cluster can reach"
        )


def runtime_env(project_root: Path, *, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    env = {"PYTHONPATH": "src", "RAY_TRAIN_V2_ENABLED": "1", **(extra_env or {})}
    if os.environ.get("MLFLOW_TRACKING_URI"):
        env.setdefault("MLFLOW_TRACKING_URI", os.environ["MLFLOW_TRACKING_URI"])
    return {"working_dir": str(project_root), "excludes": EXCLUDES + SECRET_EXCLUDES, "env_vars": env}


def submit(
    spec: Path,
    *,
    address: str,
    project_root: Path,
    overrides: list[str] | None = None,
    extra_env: dict[str, str] | None = None,
    parallel: int | None = None,
    step: str | None = None,
    pipeline_run: str | None = None,
) -> str:
    command = command_for(spec, project_root, overrides or [], parallel=parallel, step=step, pipeline_run=pipeline_run)
    entrypoint = shlex.join(command)
    env = runtime_env(project_root, extra_env=extra_env)
    check_model_references(spec, env["env_vars"])
    metadata = {"detkd.spec": str(spec)}
    if is_pipeline_command(command):  # detkd jobs status lists its steps from the start
        names = [step] if step else pipeline_steps(spec, overrides or [], project_root)
        if names:
            metadata[STEPS_METADATA] = json.dumps(names)
    jobs = client(address)
    deadline = time.monotonic() + 90
    while True:  # a freshly started head answers before its job agent is ready
        try:
            return jobs.submit_job(
                entrypoint=entrypoint,
                runtime_env=env,
                metadata=metadata,
            )
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise ConfigError(f"submitting to {address} failed: {str(exc).splitlines()[0]}") from None
            time.sleep(3)


def pipeline_steps(spec: Path, overrides: list[str], project_root: Path) -> list[str]:
    """The pipeline's step names in DAG order, read as the job will read them (from the project folder).

    A spec that does not load here (a teacher checkpoint that only the cluster has, say) still goes:
    the job's logs then name its steps as they start."""
    from detkd.pipeline.dag import build_dag
    from detkd.pipeline.load import load_pipeline

    here = Path.cwd()
    try:
        os.chdir(project_root)
        return build_dag(load_pipeline(spec.resolve(), overrides)).names
    except ConfigError as exc:
        log.warning(f"note: steps not listed before the job starts ({str(exc).splitlines()[0]})")
        return []
    finally:
        os.chdir(here)


def is_pipeline_command(command: list[str]) -> bool:
    """``python -m detkd.cli run|step ...``: a job whose driver reports step states."""
    return command[:3] == ["python", "-m", "detkd.cli"] and len(command) > 3 and command[3] in ("run", "step")


def steps_of(info, *, address: str) -> list | None:
    """Each step's state of a pipeline job (``info``: its JobDetails), read from its logs; None for other jobs."""
    from detkd.pipeline.events import job_steps

    names = json.loads((info.metadata or {}).get(STEPS_METADATA, "[]"))
    if not names and not is_pipeline_command(shlex.split(info.entrypoint or "")):
        return None  # a single run: no step lines to fetch the logs for
    logs = client(address).get_job_logs(info.submission_id)
    if not names and f"{MARKER} " not in logs:
        return None
    return job_steps(names, logs, job_status=str(info.status.value))


def follow(job_id: str, *, address: str, out=sys.stdout) -> str:
    """Stream the job's logs until it ends; returns its final status."""
    jobs = client(address)

    async def stream() -> None:
        async for chunk in jobs.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(stream())
    return str(jobs.get_job_status(job_id).value)


def find_project_root(start: Path) -> Path:
    """The nearest folder above ``start`` holding pyproject.toml (the code the job needs)."""
    for folder in [start.resolve(), *start.resolve().parents]:
        if (folder / "pyproject.toml").is_file() and (folder / "src" / "detkd").is_dir():
            return folder
    raise ConfigError(f"{start}: no detkd project folder (pyproject.toml + src/detkd) above it to ship with the job")
