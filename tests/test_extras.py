"""A command that needs a missing optional extra ends in one ``error:`` line naming the extra and its
install command, exit code 2, no traceback: each extra's modules are made unimportable in a real
``detkd`` subprocess by a ``sitecustomize`` import blocker first on PYTHONPATH."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

from detkd.extras import EXTRAS

REPO = Path(__file__).resolve().parents[1]
BLOCKER = """
import importlib.machinery

BLOCKED = {blocked!r}
_find_spec = importlib.machinery.PathFinder.find_spec.__func__


def find_spec(cls, name, path=None, target=None):
    # as if not installed: imports raise ModuleNotFoundError, importlib.util.find_spec answers None
    if name.partition(".")[0] in BLOCKED:
        return None
    return _find_spec(cls, name, path, target)


importlib.machinery.PathFinder.find_spec = classmethod(find_spec)
"""


def test_extras_table_matches_pyproject():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(EXTRAS) == set(declared) - {"test"}
    for name, extra in EXTRAS.items():
        assert name in extra.install
        assert all(extra.modules)


def _run_without(extra: str, args: list[str], tmp_path: Path, *, python: str | None = None):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER.format(blocked=set(EXTRAS[extra].modules)))
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(blocker), str(REPO / "src")]), "COLUMNS": "200"}
    command = [sys.executable, "-c", python] if python else [sys.executable, "-m", "detkd.cli", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def _assert_one_error(result, extra: str) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    assert f"`{extra}` extra" in errors[0]
    assert EXTRAS[extra].install in errors[0]
    return errors[0]


def test_export_onnx_without_the_export_extra(tmp_path):
    # the extra is checked before the checkpoint is read: none is needed to reach the check
    out = tmp_path / "model.onnx"
    result = _run_without(
        "export", ["export", str(tmp_path / "model.pt"), "--format", "onnx", "--out", str(out)], tmp_path
    )
    line = _assert_one_error(result, "export")
    assert "exporting to ONNX" in line
    assert not out.exists()


def test_compile_without_the_kfp_extra(tmp_path):
    out = tmp_path / "quickstart.kfp.yaml"
    result = _run_without("kfp", ["compile", "pipelines/quickstart.yaml", "--out", str(out)], tmp_path)
    assert "detkd compile" in _assert_one_error(result, "kfp")
    assert not out.exists()


def test_tune_optuna_without_the_optuna_extra(tmp_path):
    result = _run_without("optuna", ["tune", "search_spaces/loss_weights.yaml", "--search", "optuna"], tmp_path)
    assert "--search optuna" in _assert_one_error(result, "optuna")


def test_postgresql_tracking_without_the_server_extra(tmp_path):
    uri = "postgresql://detkd:hunter2@127.0.0.1:1/mlflow"
    result = _run_without("server", ["lineage", "some-run", "--tracking-uri", uri], tmp_path)
    line = _assert_one_error(result, "server")
    assert "psycopg" in line and "hunter2" not in line


def test_s3_artifacts_without_the_server_extra(tmp_path):
    """An experiment whose artifacts go to s3:// straight from this process (MLflow's S3 client: boto3)."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.MlflowClient(uri).create_experiment("s3-artifacts", artifact_location="s3://bucket/artifacts")
    script = (
        "import typer\n"
        "from detkd.cli.common import _fail, _user_errors\n"
        "from detkd.tracking.runs import experiment_id\n"
        "try:\n"
        f"    experiment_id({uri!r}, 's3-artifacts')\n"
        "except _user_errors() as exc:\n"
        "    try:\n"
        "        _fail(exc)\n"
        "    except typer.Exit as stop:\n"
        "        raise SystemExit(stop.exit_code)\n"
    )
    line = _assert_one_error(_run_without("server", [], tmp_path, python=script), "server")
    assert "boto3" in line and "s3://bucket/artifacts" in line


def test_mmdet_model_without_the_mmdet_extra(tmp_path, tiny_dataset, tiny_config):
    import yaml

    cfg = tiny_config(tiny_dataset, tmp_path / "work")
    cfg["model"] = {"arch": "mmdet", "mmdet_config": str(REPO / "configs/mmdet/fcos_r18_tiny.py")}
    path = tmp_path / "mmdet.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = _run_without("mmdet", ["train", str(path)], tmp_path)
    line = _assert_one_error(result, "mmdet")
    assert "bash scripts/install_mmdet.sh" in line
    assert not (tmp_path / "work" / "ray").exists()
