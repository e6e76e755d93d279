"""Typed records import neither Ray, MLflow nor torch."""

from __future__ import annotations

import subprocess
import sys


def test_records_import_no_ray_mlflow_or_torch():
    code = (
        "import sys, detkd.records; "
        "bad = [m for m in ('ray', 'mlflow', 'torch') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
