"""A command stopped by a permanent OS error ends in one ``error:`` line naming the path and the errno, exit 1."""

from __future__ import annotations

import errno

import typer
from typer.testing import CliRunner

from detkd.cli.common import _fail_pipeline, _os_errors
from detkd.oserrors import PermanentOSError
from detkd.pipeline.dag import Execution
from detkd.pipeline.runner import PipelineFailed

STOP = PermanentOSError(errno.ENOSPC, "/w/ray/tiny-1/checkpoint_3", notes=("training stopped at step 6 of 8",))


def _invoke(body) -> tuple[int, str]:
    app = typer.Typer()

    @app.command()
    def command() -> None:
        body()

    @app.command()
    def other() -> None:  # two commands: typer then expects the command's name
        pass

    result = CliRunner().invoke(app, ["command"])
    return result.exit_code, result.output


def _raise_while_ending():
    try:
        raise STOP
    except PermanentOSError:  # what SQLite does when the full disk also refuses to mark the run FAILED
        raise RuntimeError("(sqlite3.OperationalError) database or disk is full") from None


def test_the_first_permanent_error_ends_the_command_in_one_line():
    def body():
        with _os_errors():
            _raise_while_ending()

    code, output = _invoke(body)
    assert code == 1 and "Traceback" not in output
    assert output.strip().splitlines() == [f"error: {STOP}"]


def test_a_raw_permanent_os_error_is_named_too():
    def body():
        with _os_errors():
            raise OSError(errno.EROFS, "Read-only file system", "/w/models/tiny/.model.pt.tmp")

    code, output = _invoke(body)
    assert code == 1 and output.strip() == (
        "error: read-only file system (EROFS) writing /w/models/tiny/.model.pt.tmp; "
        "make it writable and run the same command again to resume"
    )


def test_other_errors_pass_through():
    def body():
        with _os_errors():
            raise ZeroDivisionError("a bug")

    app = typer.Typer()
    app.command()(body)
    result = CliRunner().invoke(app, [])
    assert isinstance(result.exception, ZeroDivisionError)


def test_a_pipeline_step_stopped_by_a_full_disk_gives_one_error_line_and_the_summary():
    execution = Execution(results={"data": None}, failed={"teacher": STOP}, blocked=["student"])

    def body():
        _fail_pipeline(PipelineFailed(execution))

    code, output = _invoke(body)
    lines = output.strip().splitlines()
    assert code == 1 and "Traceback" not in output
    assert [line for line in lines if line.startswith("error:")] == [f"error: step teacher: {STOP}"]
    assert "not run, they need a failed step: student" in output and "finished and kept: data" in output
