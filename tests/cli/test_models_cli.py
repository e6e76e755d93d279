"""``detkd models torchvision-config``: the model settings that build a torchvision detector, as YAML."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from detkd.cli import app
from detkd.config import ModelConfig
from detkd.models.torchvision_zoo import TORCHVISION_FILES, TORCHVISION_ZOO, torchvision_model_config

runner = CliRunner()


@pytest.mark.parametrize("name", list(TORCHVISION_ZOO))
def test_torchvision_config_prints_a_model_section_that_validates(name):
    result = runner.invoke(app, ["models", "torchvision-config", name])
    assert result.exit_code == 0, result.output
    assert TORCHVISION_FILES[name] in result.output.splitlines()[0]
    section = yaml.safe_load(result.output)["model"]
    assert section.pop("weights") == f"path/to/{TORCHVISION_FILES[name]}"
    assert section == torchvision_model_config(name)
    ModelConfig.model_validate(section)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("fasterrcnn_mobilenet_v3_large_fpn", "cannot be built by detkd: its FPN reads MobileNetV3-Large"),
        ("maskrcnn_resnet50_fpn", "unknown torchvision detector 'maskrcnn_resnet50_fpn'; detkd builds fcos_resnet50"),
    ],
)
def test_torchvision_config_refuses_what_detkd_does_not_build(name, message):
    result = runner.invoke(app, ["models", "torchvision-config", name])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]
