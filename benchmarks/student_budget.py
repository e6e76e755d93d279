"""Does a budget sweep find a student as accurate as the hand-made one at >= 3x the teacher's deployed speed?

Runs ``detkd tune search_spaces/student_budget.yaml`` (resolution, design, widths, levels, backbone
and method searched together by multi-objective TPE on validation AP and deployed speedup, ASHA
stopping weak trials, a FLOPs bound ruling out networks too big to reach 3x before they train), then compares its
chosen student with the quickstart's hand-made ``lite`` student (``student_ssim``: the design
``benchmarks/student_design.py`` found by hand), both trained 16 epochs with the same data: test AP
on the 150 held-out images, and deployed speedup over the teacher measured the same way in this
process (``detkd.serving.speed`` with the space's ``speed`` settings: ONNX Runtime, batch 1, one
thread, in turns with the teacher). When no trial meets the budget the answer is recorded as such,
with the trial that came closest.

    detkd run pipelines/quickstart.yaml       # first: the teacher, the data and the hand-made student
    python benchmarks/student_budget.py       # ~20 min on 2 CPU cores

Writes ``benchmarks/results/student_budget.{json,md,png}`` (the PNG is the sweep's Pareto plot).
A rerun continues an interrupted sweep; ``--fresh`` starts it again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from repo_paths import repo_command, repo_path  # this folder is on sys.path when run

RESULTS = Path(__file__).resolve().parent / "results"
SPACE = Path("search_spaces/student_budget.yaml")
QUICKSTART = Path("runs/quickstart")
SWEEP = QUICKSTART / "sweeps/student_budget"
HAND_MADE = QUICKSTART / "models/student_ssim/model.pt"


def detkd_command() -> str:
    """The ``detkd`` of the environment running this script, on PATH or not (``.venv/bin/python benchmarks/...``)."""
    beside = Path(sys.executable).parent / "detkd"
    return str(beside) if beside.is_file() else (shutil.which("detkd") or "detkd")


def run_sweep(args: argparse.Namespace) -> tuple[float, bool]:
    """The sweep, as a user runs it: its wall time in minutes, and whether a trial met the budget."""
    command = [detkd_command(), "tune", str(SPACE)]
    if args.samples:
        command += ["--samples", str(args.samples)]
    if args.fresh:
        command.append("--fresh")
    start = time.monotonic()
    done = subprocess.run(command, check=False)
    minutes = (time.monotonic() - start) / 60
    summary = SWEEP / "summary.json"
    if done.returncode == 0:
        return minutes, True
    finished = summary.is_file() and json.loads(summary.read_text()).get("trials")
    if done.returncode == 1 and finished:  # it ran every trial and none met the constraints: an answer too
        return minutes, False
    sys.exit(f"error: {' '.join(command)} failed (exit {done.returncode})")


def side_by_side(teacher: Path, students: dict[str, Path], *, rounds: int = 3) -> dict[str, list[float]]:
    """Each student's speedup over the teacher measured again here, in alternating rounds on a quiet machine,
    with the space's speed settings: the trials measured theirs while another trial trained beside them."""
    from detkd.config import Config
    from detkd.serving.speed import measure_speed, split_images
    from detkd.sweeps.space import load_space

    settings = load_space(SPACE).space.speed  # the trials' speed settings (its score threshold included)
    cfg = Config.model_validate(json.loads((QUICKSTART / "models/student_ssim/outcome.json").read_text())["config"])
    images = split_images(cfg.data.val, count=settings.images)
    out: dict[str, list[float]] = {name: [] for name in students}
    for _ in range(rounds):
        for name, student in students.items():
            report = measure_speed(student, teacher, images, settings=settings, reference_name="teacher")
            out[name].append(round(report.speedup, 3))
    return out


def hand_made() -> dict:
    """The quickstart's hand-made student: its test AP, scored here the way the sweep scores its chosen trial."""
    from detkd.config import Config
    from detkd.engine.evaluate import evaluate_checkpoint
    from detkd.engine.plan import open_split
    from detkd.models.cost import checkpoint_cost

    student = HAND_MADE
    cfg = Config.model_validate(json.loads((QUICKSTART / "models/student_ssim/outcome.json").read_text())["config"])
    test = evaluate_checkpoint(
        student,
        open_split(cfg.data.test, skip_invalid=False),
        batch_size=cfg.eval.batch_size,
        score_thresh=cfg.eval.score_thresh,
    )
    return {
        "design": "lite (hand-made: the quickstart's student_ssim)",
        "test_AP": round(float(test.metrics["AP"]), 4),
        "mflops": round(checkpoint_cost(student).mflops, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=None, help="trials (default: the space's budget)")
    parser.add_argument("--fresh", action="store_true", help="start the sweep again")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--report-only", action="store_true", help="no sweep: measure and write the results of the finished one"
    )
    args = parser.parse_args()
    teacher = QUICKSTART / "models/teacher/model.pt"
    if not teacher.is_file():
        sys.exit(f"error: {teacher}: no teacher; run `detkd run pipelines/quickstart.yaml` first")
    command = repo_command()
    if args.report_only:
        previous = args.out / "student_budget.json"
        meta = json.loads(previous.read_text())["meta"] if previous.is_file() else {}
        minutes = meta.get("wall_minutes")
        if meta.get("command") and "--report-only" not in meta["command"]:
            command = f"{meta['command']}, then {command}"
        met = "best" in json.loads((SWEEP / "summary.json").read_text())
    else:
        minutes, met = run_sweep(args)
    import pandas as pd

    summary = json.loads((SWEEP / "summary.json").read_text())
    trials = pd.read_parquet(SWEEP / "trials.parquet")
    planned = int(trials["planned_epochs"].sum())
    trained = trials[~trials["ruled_out"]]
    pick = chosen(summary["best"]) if met else closest(trials)
    hand = hand_made()
    # the hand-made student, the chosen (or closest) trial and the front again, in turns with the teacher,
    # alternating, on a quiet machine: did the noise of the in-sweep measurement decide what was feasible?
    by_id = trials.set_index("trial_id")
    again_ids = sorted({*summary["front"], *([pick["trial"]] if pick else [])})
    models = {t: Path(by_id.loc[t, "model_path"]) for t in again_ids if by_id.loc[t, "model_path"]}
    again = side_by_side(teacher, {**models, "hand_made": HAND_MADE})
    hand["speedup_remeasured"] = again["hand_made"]
    if pick is not None:
        pick["speedup_remeasured"] = again[pick["trial"]]
    front_again = {
        t: {
            "design": by_id.loc[t, "design"],
            "val_AP": round(float(by_id.loc[t, "val/AP"]), 4),
            "speedup_in_trial": round(float(by_id.loc[t, trial_speed_column(trials)]), 3),
            "speedup_confirmed_by_sweep": round(float(by_id.loc[t, "speed/speedup"]), 3),
            "speedup_remeasured": again[t],
        }
        for t in models
    }
    result = {
        "chosen": pick if met else None,
        "closest": None if met else pick,
        "hand_made": hand,
        "trials": len(trials),
        "ruled_out_before_training": int(trials["ruled_out"].sum()),
        "stopped_early_by_asha": int(trials["stopped_early"].sum()),
        "feasible": int(trials["feasible"].sum()),
        "trial_epochs": int(trials["epochs"].sum()),
        "trial_epochs_without_asha_or_bound": planned,
        "trial_epochs_of_trials_that_trained": int(trained["planned_epochs"].sum()),
        "front": summary["front"],
        "budget": budget(),
        "remeasured": front_again,
        "rows": [
            {k: (None if isinstance(v, float) and v != v else v) for k, v in row.items() if k != "mlflow_run_id"}
            for row in trials.drop(columns=["model_path"]).to_dict("records")
        ],
        "meta": {
            "command": command,
            "sweep": repo_path(SWEEP),
            "wall_minutes": round(minutes, 1) if minutes is not None else None,
            "machine": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, no GPU used",
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "student_budget.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    shutil.copyfile(SWEEP / "plots/pareto.png", args.out / "student_budget.png")
    write_markdown(result, SWEEP / "pareto.md", args.out / "student_budget.md")
    print(f"written: {args.out / 'student_budget.json'}, student_budget.md, student_budget.png")


def trial_speed_column(trials) -> str:
    """The speed each trial measured itself, beside another trial (the sweep keeps it when it measures again)."""
    return "speed/speedup_in_trial" if "speed/speedup_in_trial" in trials else "speed/speedup"


def budget() -> float:
    """The space's speedup floor."""
    from detkd.sweeps.space import load_space

    return next(c.bound for c in load_space(SPACE).constraints if c.name == "speedup")


def chosen(best: dict) -> dict:
    return {
        "trial": best["trial_id"],
        "design": best["design"],
        "val_AP": round(best["scores"]["val/AP"], 4),
        "test_AP": round(best["scores"].get("test/AP", float("nan")), 4),
        "speedup": round(best["measures"]["speed/speedup"], 3),
        "mflops": best["measures"]["cost/mflops"],
    }


def closest(trials) -> dict | None:
    """When no trial met the budget: the fastest trial that trained to the end (validation AP only)."""
    done = trials[trials["speed/speedup"].notna()] if "speed/speedup" in trials else trials.iloc[0:0]
    if done.empty:
        return None
    row = done.sort_values("speed/speedup", ascending=False).iloc[0]
    return {
        "trial": row["trial_id"],
        "design": row["design"],
        "val_AP": round(float(row["val/AP"]), 4),
        "speedup": round(float(row["speed/speedup"]), 3),
        "mflops": float(row["cost/mflops"]),
        "unmet": row["unmet"],
    }


def speeds(values: list[float]) -> str:
    """Re-measured speedups: their median and range."""
    ordered = sorted(values)
    return f"{ordered[len(ordered) // 2]}x ({ordered[0]}-{ordered[-1]} over {len(ordered)} rounds)"


def write_markdown(result: dict, pareto: Path, path: Path) -> None:
    best, hand = result["chosen"], result["hand_made"]
    hand_text = f"the hand-made `lite` student has test AP {hand['test_AP']} at {speeds(hand['speedup_remeasured'])}"
    if best is None:
        near = result["closest"]
        nearest = (
            f" The fastest trial that trained, `{near['design']}`, measured {near['speedup']}x in the sweep "
            f"({speeds(near['speedup_remeasured'])} re-measured) at validation AP {near['val_AP']}."
            if near
            else ""
        )
        answer = f"No: no trial met the budget.{nearest} For comparison, {hand_text}."
    else:
        better = best["test_AP"] >= hand["test_AP"]
        floor = result["budget"]
        hand_meets = sorted(hand["speedup_remeasured"])[len(hand["speedup_remeasured"]) // 2] >= floor
        answer = (
            f"{'Yes' if better else 'No'}: the sweep chose `{best['design']}`, test AP {best['test_AP']} at "
            f"{best['speedup']}x as the sweep measured it, {speeds(best['speedup_remeasured'])} re-measured; "
            f"{hand_text}, {'within' if hand_meets else 'short of'} the {floor:g}x budget on this machine."
        )
    answer += (
        " Re-measured: both students in alternating rounds against the teacher, after the sweep, on an otherwise "
        "idle machine, with the space's speed settings; each trial measured its speed while another trial trained."
    )
    again = [
        f"| {t} | {r['design']} | {r['val_AP']} | {r['speedup_in_trial']} | {r['speedup_confirmed_by_sweep']} | "
        f"{speeds(r['speedup_remeasured'])} |"
        for t, r in result["remeasured"].items()
    ]
    lines = [
        "# The most accurate student at >= 3x the teacher: a budget sweep against the hand-made design",
        "",
        f"`{result['meta']['command']}` · {result['meta']['wall_minutes']} min · {result['meta']['machine']}",
        "",
        answer,
        "",
        f"ASHA and the FLOPs bound: {result['trials']} trials, {result['ruled_out_before_training']} ruled out "
        f"before training, {result['stopped_early_by_asha']} stopped early; {result['trial_epochs']} trial-epochs "
        f"trained of {result['trial_epochs_without_asha_or_bound']} without either "
        f"({result['trial_epochs_of_trials_that_trained']} for the trials that did train).",
        "",
        "The front and the chosen trial, re-measured after the sweep on the quiet machine:",
        "",
        "| trial | design | val/AP | speedup in its trial | measured again by the sweep | re-measured here |",
        "|---|---|---|---|---|---|",
        *again,
        "",
        "Every trial (validation AP chooses; the chosen one alone is scored on the test split):",
        "",
    ]
    table = pareto.read_text().split("\n| trial", 1)[1]
    path.write_text("\n".join(lines) + "\n| trial" + table)


if __name__ == "__main__":
    main()
