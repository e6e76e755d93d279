"""The typed result rows (summary.json, trials.parquet, outcome.json), the registry's alias decision and
the CLI's one log handler: fast, no Ray, no MLflow server."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from detkd.records import SummaryRow, TrainOutcome, TrialRow

METRICS = {"AP": 0.123456, "AP50": 0.5, "APs": 0.0412345}


def test_summary_rows_keep_the_file_layout() -> None:
    row = SummaryRow.measured(
        name="s", role="student", input_size=32, metrics=METRICS, images_per_s=12.345, run_id="r1", split="test",
        method="ssim",
    )  # fmt: skip
    assert list(row.to_dict()) == [
        "name", "role", "input_size", "split", "AP", "AP50", "APs", "images_per_s", "mlflow_run_id", "method",
    ]  # fmt: skip
    assert row.AP == 0.1235 and row.images_per_s == 12.3
    plain = SummaryRow.measured(
        name="r", role="results", input_size=0, metrics=METRICS, images_per_s=0.0, run_id=None, split="gt.json"
    )
    assert "method" not in plain.to_dict() and plain.to_dict()["mlflow_run_id"] is None
    row.registered = "m v1 @champion"
    assert list(row.to_dict())[-1] == "registered"
    assert SummaryRow.from_dict(json.loads(json.dumps(row.to_dict()))) == row


def test_write_summary_and_read_it_back(tmp_path: Path) -> None:
    from detkd.pipeline.runner import read_summary, summary_table, write_summary

    rows = [
        SummaryRow.measured(
            name=n, role="student", input_size=32, metrics=METRICS, images_per_s=1.0, run_id=None, split="val"
        )
        for n in ("a", "b")
    ]
    path = tmp_path / "summary.json"
    write_summary(rows, path)
    assert path.read_text() == json.dumps([r.to_dict() for r in rows], indent=2) + "\n"
    assert read_summary(path) == rows
    assert [c.header for c in summary_table(rows).columns][:2] == ["name", "role"]


def test_trial_rows_round_trip_through_parquet(tmp_path: Path) -> None:
    from detkd.sweeps.report import choose_best, read_trials

    def trial(tid: str, ap: float, *, early: bool = False, model: str | None = "m.pt") -> TrialRow:
        return TrialRow(tid, "TERMINATED", early, 2, 4, "val/AP", ap, ap, {"lr": "0.01"}, 1, None, model)

    rows = [trial("a", 0.3), trial("b", 0.5, early=True), trial("c", float("nan")), trial("d", 0.4, model=None)]
    rows[0].measures = {"cost/mflops": 22.4, "cost/params": 1.2e5, "speed/speedup": 3.1}
    rows[0].design, rows[0].pareto = "lite tiny 64px fpn64 h2 P2-P4 ssim", True
    fast_but_wrong = trial("e", 0.7)
    fast_but_wrong.feasible, fast_but_wrong.unmet = False, "speedup >= 3 (2.4)"
    rows.append(fast_but_wrong)
    frame = pd.DataFrame([r.to_dict() for r in rows])
    assert list(frame.columns) == [
        "trial_id", "state", "stopped_early", "epochs", "planned_epochs", "val/AP", "best_val/AP", "param.lr",
        "attempts", "mlflow_run_id", "model_path", "design", "cost/mflops", "cost/params", "speed/speedup",
        "feasible", "unmet", "ruled_out", "pareto",
    ]  # fmt: skip
    frame.to_parquet(tmp_path / "trials.parquet", index=False)
    back = read_trials(tmp_path / "trials.parquet", metric_key="val/AP")
    assert [r.trial_id for r in back] == ["a", "b", "c", "d", "e"] and math.isnan(back[2].metric)
    assert back[0] == rows[0] and back[1].measures == {}  # a measure missing from a row stays missing
    assert not back[4].feasible and back[4].unmet == "speedup >= 3 (2.4)"
    assert choose_best(rows).trial_id == "a"  # b stopped early, c has no score, d no model, e breaks a constraint
    assert choose_best([rows[1]]).trial_id == "b"  # only early-stopped ones: the best of them
    assert choose_best([rows[2], rows[3]]) is None
    assert choose_best([rows[4]]) is None  # nothing that meets the constraints


def test_train_outcome_round_trips_as_outcome_json() -> None:
    outcome = TrainOutcome("t", "teacher", Path("/w/models/t/model.pt"), "r", {"val/AP": 0.5}, 64, 3.5, "kd_off")
    data = json.loads(json.dumps(outcome.to_dict()))
    assert data["model_path"] == "/w/models/t/model.pt"
    assert TrainOutcome.from_dict(data) == outcome


def test_choose_alias() -> None:
    from detkd.tracking.registry import GateVerdict, choose_alias

    passed, failed = GateVerdict(True, [], {}), GateVerdict(False, ["AP 0.1 < 0.5"], {})
    assert choose_alias(failed, 0.9, None) == ("challenger", "gate failed: AP 0.1 < 0.5")
    assert choose_alias(passed, 0.6, None) == ("champion", "gate passed; first champion")
    assert choose_alias(passed, 0.6, ("3", 0.7))[0] == "challenger"
    assert choose_alias(passed, 0.7, ("3", 0.7))[0] == "challenger"  # a tie keeps the champion
    assert choose_alias(passed, 0.8, ("3", 0.7)) == ("champion", "gate passed; beats champion v3 (0.7000)")


def test_the_cli_shows_library_log_records_as_plain_lines() -> None:
    import typer

    from detkd.cli import install_log_handler

    app = typer.Typer()

    @app.command()
    def talk() -> None:
        install_log_handler()
        logging.getLogger("detkd.pipeline.runner").info("data: [synthesizing] 8 images")
        logging.getLogger("detkd.cluster.jobs").warning("note: steps not listed")
        logging.getLogger("detkd.pipeline.runner").error("it broke\nsecond line")
        logging.getLogger("detkd.pipeline.runner").debug("not shown")

    result = CliRunner().invoke(app, [])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines == ["data: [synthesizing] 8 images", "note: steps not listed", "error: it broke", "error: second line"]


def test_sweep_tables_are_log_records_the_cli_draws(caplog) -> None:
    import typer

    from detkd.cli import install_log_handler
    from detkd.sweeps.report import log_table

    app = typer.Typer()

    @app.command()
    def show() -> None:
        install_log_handler()
        log_table([{"trial": "t1", "val/AP": 0.51234, "lr": "[0.1, 0.2]"}], title="trials (val/AP)")

    with caplog.at_level(logging.INFO, logger="detkd.sweeps.report"):
        result = CliRunner().invoke(app, [])
    assert result.exit_code == 0, result.output
    assert "trials (val/AP)" in result.output and "0.5123" in result.output and "[0.1, 0.2]" in result.output
    (record,) = [r for r in caplog.records if r.name == "detkd.sweeps.report"]
    assert "0.5123" in record.getMessage()  # the text, for any other handler


@pytest.mark.parametrize("passed", [True, False])
def test_gate_verdict_reads_the_rows(passed: bool) -> None:
    from types import SimpleNamespace

    from detkd.pipeline.runner import registration_candidates

    reg = SimpleNamespace(student="s", baseline="b")
    spec = SimpleNamespace(registration=reg)
    ap = 0.6 if passed else 0.1
    rows = [
        SummaryRow("b", "student", 32, "test", 0.5, 0.7, 0.1, 10.0, "rb"),
        SummaryRow("s", "student", 32, "test", ap, 0.7, 0.1, 10.0, "rs"),
    ]
    student, baseline = registration_candidates(spec, rows, "test")
    assert (student.name, student.run_id, student.ap, baseline.name) == ("s", "rs", ap, "b")
    outcomes = {"s": TrainOutcome("s", "student", Path("s.pt"), None), "b": TrainOutcome("b", "student", Path(), "x")}
    with pytest.raises(Exception, match="no MLflow run to register from"):
        registration_candidates(spec, rows, "test", outcomes=outcomes)
