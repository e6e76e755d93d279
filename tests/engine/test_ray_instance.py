"""Which Ray a detkd process uses: where its address comes from, and an address nothing answers at (no Ray started;
tests/faults/test_two_drivers.py runs two drivers side by side on real Ray instances)."""

from __future__ import annotations

import json

import pytest
from factories import tiny_pipeline_spec, write_yaml
from servers import free_port
from typer.testing import CliRunner

from detkd.cli import app
from detkd.config import ConfigError
from detkd.engine.ray_instance import _cause, _unreachable, check_reachable, recorded_head_file, resolve_address


@pytest.fixture()
def machine(tmp_path, monkeypatch):
    """This test's own Ray temp dir (RAY_TMPDIR), where ``ray start --head`` records its address; no RAY_ADDRESS."""
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return tmp_path


def test_the_address_comes_from_the_flag_then_ray_address_then_a_recorded_head(machine, monkeypatch):
    assert resolve_address(None) == (None, "a private local instance")
    record = recorded_head_file()
    assert record == machine / "ray" / "ray_current_cluster"
    record.parent.mkdir()
    record.write_text("10.1.2.3:6379\n")
    assert resolve_address(None) == ("10.1.2.3:6379", f"the head `ray start` recorded in {record}")
    assert resolve_address("local") == (None, "--address")  # Ray's word for a private instance
    monkeypatch.setenv("RAY_ADDRESS", "10.9.9.9:6379")
    assert resolve_address(None) == ("10.9.9.9:6379", "RAY_ADDRESS")
    assert resolve_address("head:6379") == ("head:6379", "--address")
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert resolve_address(None) == (None, "RAY_ADDRESS")


def test_an_address_nothing_answers_at_is_refused_at_once():
    port = free_port()  # bound and released: nothing listens there
    with pytest.raises(ConfigError, match=rf"^cannot reach the Ray cluster at 127.0.0.1:{port} \(RAY_ADDRESS\): "):
        check_reachable(f"127.0.0.1:{port}", source="RAY_ADDRESS")
    with pytest.raises(ConfigError, match=rf"at ray://127.0.0.1:{port} \(--address\): Connection refused"):
        check_reachable(f"ray://127.0.0.1:{port}", source="--address")
    check_reachable("auto", source="--address")  # no port: Ray's own lookup


def test_a_dashboard_url_is_not_a_cluster_address():
    with pytest.raises(ConfigError, match=r"http://127.0.0.1:8265 \(--address\): not a Ray cluster address.*submit"):
        check_reachable("http://127.0.0.1:8265", source="--address")


def test_the_error_gives_the_cause_ray_wrapped_and_what_to_do():
    """Ray wraps the reason in a ConnectionError, whose cause carries a traceback's text."""
    inner = RuntimeError(
        "Failed to connect to GCS. Last connection error: Traceback (most recent call last):\n"
        '  File "node.py", line 996, in _init_gcs_client\n'
        "ray.exceptions.AuthenticationError: RPC error: InvalidAuthToken: Authentication token is missing\n"
    )
    try:
        try:
            raise inner
        except RuntimeError as exc:
            raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.5:6379") from exc
    except ConnectionError as exc:
        cause = _cause(exc)
    assert cause == (
        "Failed to connect to GCS. Last connection error: "
        "ray.exceptions.AuthenticationError: RPC error: InvalidAuthToken: Authentication token is missing"
    )
    message = str(_unreachable("10.0.0.5:6379", "RAY_ADDRESS", cause))
    assert message.startswith("cannot reach the Ray cluster at 10.0.0.5:6379 (RAY_ADDRESS): it refused this process's")
    assert "RAY_AUTH_TOKEN" in message and "\n" not in message
    recorded = str(_unreachable("10.0.0.5:6379", "the head `ray start` recorded in /x", "Connection refused"))
    assert recorded.endswith(
        f"Connection refused; if that head is gone, delete {recorded_head_file()} (or pass --address local)"
    )


def test_train_and_step_with_an_unreachable_address_end_in_one_error_line(tiny_dataset, tiny_config, tmp_path, machine):
    import ray

    if ray.is_initialized():  # a Ray test of this session connected this process already: --address is moot
        pytest.skip("this process is connected to Ray")
    port = free_port()
    config = tmp_path / "run.json"
    data = tiny_config(tiny_dataset, tmp_path / "work", tracking={"tracking_uri": f"sqlite:///{tmp_path / 't.db'}"})
    config.write_text(json.dumps(data))
    spec = tiny_pipeline_spec("p", tmp_path / "p", f"sqlite:///{tmp_path / 'p.db'}", teachers=[{"name": "t"}])
    commands = {
        "train": ["train", str(config)],
        "step": ["step", str(write_yaml(tmp_path / "p.yaml", spec)), "t", "--pipeline-run", "0" * 32],
    }
    for name, command in commands.items():
        result = CliRunner().invoke(app, [*command, "--address", f"127.0.0.1:{port}"])
        assert result.exit_code == 2, f"{name}: {result.output}"
        assert result.output.strip().splitlines() == [
            f"error: cannot reach the Ray cluster at 127.0.0.1:{port} (--address): Connection refused"
        ], name
