"""``detkd tune``: a Ray Tune sweep."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from detkd.cli.common import RayAddressOption, _fail, _user_errors, app, console, err_console
from detkd.config import format_validation_error


@app.command("tune")
def tune_command(
    space: Annotated[Path, typer.Argument(help="search space YAML (search_spaces/*.yaml)")],
    samples: Annotated[
        int | None, typer.Option(min=1, help="trials to draw (random/optuna) or repeats of the grid (grid)")
    ] = None,
    max_concurrent: Annotated[int | None, typer.Option(min=1, help="trials running at once")] = None,
    scheduler: Annotated[str | None, typer.Option(help="asha (stops weak trials early) or fifo")] = None,
    search: Annotated[str | None, typer.Option(help="random, grid or optuna")] = None,
    sampler: Annotated[str | None, typer.Option(help="optuna sampler: tpe or nsga2 (both honour constraints)")] = None,
    address: RayAddressOption = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue the interrupted sweep (the same command again does too)")
    ] = False,
    fresh: Annotated[bool, typer.Option("--fresh", help="discard the sweep's folder and start over")] = False,
) -> None:
    """Ray Tune sweep: one Ray Train run per trial, ranked on val, the chosen one scored on test."""
    from detkd.sweeps.space import load_space
    from detkd.sweeps.tuner import SweepFailed, SweepOptions, run_sweep

    if resume and fresh:
        _fail(ValueError("--resume and --fresh contradict each other"))
    try:
        loaded = load_space(space)
        options = SweepOptions.from_budget(
            loaded.space.budget,
            samples=samples,
            max_concurrent=max_concurrent,
            scheduler=scheduler,
            search=search,
            sampler=sampler,
        )
        outcome = run_sweep(loaded, options=options, address=address, resume=resume, fresh=fresh)
    except _user_errors() as exc:
        _fail(exc)
    except ValidationError as exc:
        _fail(ValueError(format_validation_error(exc, "detkd tune")))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except SweepFailed as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    front = ", pareto.md" if (outcome.workdir / "pareto.md").is_file() else ""
    console.print(f"results: {outcome.workdir} (trials.parquet, best_config.yaml{front}, plots/)")
