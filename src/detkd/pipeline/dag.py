"""A pipeline spec as a DAG of steps: built once, printed by ``detkd plan``, drawn as a PNG.

Steps, in the order the spec gives them: ``data``; each teacher; each student (a progressive
student is its stages, ``NAME-stage1`` .. , with the last stage's checkpoint published under
``NAME``); each tune step (a sweep whose best trial becomes the student ``NAME``);
``evaluate`` when the spec has a split to score on; ``register`` when it has a register
section. A step needs ``data`` and every model of the pipeline it learns from: teachers named
in its distill section (or its space's target student's), the previous stage. Two steps
neither of which needs the other can run at the same time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from detkd.config import Config
    from detkd.pipeline.spec import PipelineSpec, RegisterStep

StepKind = Literal["data", "teacher", "student", "stage", "tune", "evaluate", "register"]


@dataclass(frozen=True)
class Step:
    name: str  # unique in the DAG; a model's name for teachers, students, stages and tune steps
    kind: StepKind
    needs: tuple[str, ...]  # steps that must finish first (direct dependencies only)
    detail: str  # one line for people: what the step does
    model: str = ""  # the spec entry it trains (a stage: its student); "" for data, evaluate, register
    stage: int = 0  # a stage: its number from 1, of ``stages``
    stages: int = 0


@dataclass(frozen=True)
class PipelineDag:
    pipeline: str
    steps: tuple[Step, ...]  # in spec order, which is a topological order

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for step in self.steps:
            missing = [n for n in step.needs if n not in seen]
            if missing:  # build_dag adds steps after their needs; anything else is a bug, not user input
                raise ValueError(f"step {step.name!r} needs {missing}, which do not come before it")
            if step.name in seen:
                raise ValueError(f"two steps are named {step.name!r}")
            seen.add(step.name)

    def step(self, name: str) -> Step:
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(f"no step named {name!r} in pipeline {self.pipeline} ({[s.name for s in self.steps]})")

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.steps]

    def dependants(self, names: Iterable[str]) -> list[str]:
        """Every step that needs one of ``names``, directly or through others (what a failure stops)."""
        blocked = set(names)
        out = []
        for step in self.steps:
            if step.name not in blocked and blocked.intersection(step.needs):
                blocked.add(step.name)
                out.append(step.name)
        return out

    def ready(self, done: Iterable[str], running: Iterable[str] = ()) -> list[str]:
        """Steps not done or running whose needs are all done, in spec order."""
        done, running = set(done), set(running)
        return [s.name for s in self.steps if s.name not in done | running and done.issuperset(s.needs)]

    def ancestors(self, name: str) -> set[str]:
        """Every step ``name`` needs, directly or through others."""
        out: set[str] = set()
        pending = list(self.step(name).needs)
        while pending:
            need = pending.pop()
            if need not in out:
                out.add(need)
                pending.extend(self.step(need).needs)
        return out

    def drawn_needs(self, name: str) -> list[str]:
        """Direct needs not already implied by another need (``data`` before a student that needs a teacher)."""
        needs = self.step(name).needs
        implied = set().union(*(self.ancestors(n) for n in needs)) if needs else set()
        return [n for n in needs if n not in implied]

    def waves(self) -> list[list[str]]:
        """Steps grouped by depth: every step of a wave can run together once the waves before it finished."""
        depth: dict[str, int] = {}
        for step in self.steps:
            depth[step.name] = 1 + max((depth[n] for n in step.needs), default=-1)
        out: list[list[str]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
        for step in self.steps:
            out[depth[step.name]].append(step.name)
        return out

    def to_dict(self) -> dict:
        return {
            "pipeline": self.pipeline,
            "steps": [{"name": s.name, "kind": s.kind, "needs": list(s.needs), "detail": s.detail} for s in self.steps],
        }


def build_dag(spec: PipelineSpec) -> PipelineDag:
    """The steps of a loaded (checked) pipeline spec and what each needs."""
    from detkd.engine.plan import stage_configs
    from detkd.pipeline.spec import data_splits, model_config

    models: set[str] = set()  # names a later step may learn from

    def learns_from(cfg: Config) -> list[str]:
        refs = cfg.distill.teachers if cfg.distill is not None else []
        return [r.source for r in refs if r.source in models]

    steps = [Step("data", "data", (), _data_detail(spec))]
    for role, entries in (("teacher", spec.teachers), ("student", spec.students)):
        for entry in entries:
            cfg = model_config(spec, entry, role=role)
            if cfg.distill is not None and cfg.distill.stages:
                previous: list[str] = []
                stages = stage_configs(cfg)
                for k, stage in enumerate(stages, start=1):
                    name = entry.name if k == len(stages) else stage.name
                    needs = _unique(["data", *previous, *learns_from(stage)])
                    detail = f"stage {k}/{len(stages)} of {entry.name}: {_model_detail(stage)}"
                    steps.append(Step(name, "stage", needs, detail, entry.name, k, len(stages)))
                    previous = [name]
            else:
                steps.append(
                    Step(entry.name, role, _unique(["data", *learns_from(cfg)]), _model_detail(cfg), entry.name)
                )
            models.add(entry.name)
    for tune in spec.tune:
        from detkd.sweeps.space import load_space

        loaded = load_space(tune.space, pipeline=spec)
        teachers = [t for t in loaded.needed_teachers if t in models]
        detail = f"sweep {loaded.name} over {loaded.space.target.student}; its best trial becomes this student"
        steps.append(Step(tune.name, "tune", _unique(["data", *teachers]), detail, tune.name))
        models.add(tune.name)
    scoring = data_splits(spec).scoring()
    if scoring is not None:
        # every model by its name: a progressive student is scored once, as its last stage
        scored = [s.name for s in steps if s.name in models]
        steps.append(Step("evaluate", "evaluate", tuple(scored), f"score every model on the {scoring[0]} split"))
        if spec.registration is not None:
            reg = spec.registration
            gate = reg.gate
            rule = f"AP >= {reg.baseline} {gate.min_gain:+g}" if reg.baseline else "no baseline"
            detail = f"{reg.student} -> {reg.model} (gate: {rule}, AP >= {gate.min_ap:g}{speed_rule(reg)})"
            steps.append(Step("register", "register", ("evaluate",), detail))
    return PipelineDag(spec.name, tuple(steps))


def speed_rule(reg: RegisterStep) -> str:
    """The gate's speed floor as the DAG shows it: ``, speedup >= 3x teacher, <= 5 ms/image``."""
    gate = reg.gate
    reference = gate.speed.reference or f"{reg.student}'s teacher"
    rule = f", speedup >= {gate.min_speedup:g}x {reference}" if gate.min_speedup is not None else ""
    if gate.max_latency_ms is not None:
        rule += f", <= {gate.max_latency_ms:g} ms/image"
    if rule:
        rule += f" (ONNX Runtime, {gate.speed.threads} thread(s), measured at registration)"
    return rule


def _unique(names: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))


def _data_detail(spec: PipelineSpec) -> str:
    if spec.data.synth is not None:
        synth = spec.data.synth
        return f"synthesize {synth.images} images at {synth.size} px under {Path(spec.workdir) / 'data'}"
    from detkd.pipeline.spec import data_splits

    splits = [name for name, split in data_splits(spec)._asdict().items() if split is not None]
    return f"check and log the {', '.join(splits)} splits"


def _model_detail(cfg: Config) -> str:
    model = cfg.model
    if model.arch == "mmdet":
        text = f"{cfg.method}, mmdet/{Path(str(model.mmdet_config)).name}, "
    elif model.arch == "hf":  # the network is its transformers config's, not the torchvision settings
        text = f"{cfg.method}, hf/{Path(str(model.hf_model)).name}, "
    else:
        text = f"{cfg.method}, {model.arch}/{model.backbone} P{model.min_level}-P{model.max_level} "
        text += f"fpn {model.fpn_channels}, "
    return text + f"{cfg.input.model_size} px, {cfg.train.epochs} epochs"


def format_dag(dag: PipelineDag) -> str:
    """The DAG as text: one line per step with what it needs, then the waves that can run together."""
    width = max(len(s.name) for s in dag.steps)
    lines = [f"pipeline {dag.pipeline}: {len(dag.steps)} steps"]
    for step in dag.steps:
        needs = ", ".join(step.needs) if step.needs else "-"
        lines.append(f"  {step.name:<{width}}  {step.kind:<8}  needs: {needs}")
        lines.append(f"  {'':<{width}}  {'':<8}  {step.detail}")
    lines.append("can run together:")
    for k, wave in enumerate(dag.waves(), start=1):
        lines.append(f"  {k}. {', '.join(wave)}")
    return "\n".join(lines)


KIND_COLOURS = {
    "data": "#cfd8dc",
    "teacher": "#ffcc80",
    "student": "#90caf9",
    "stage": "#b39ddb",
    "tune": "#a5d6a7",
    "evaluate": "#fff59d",
    "register": "#ef9a9a",
}


def dag_png(dag: PipelineDag, path: Path) -> Path:
    """Draw the DAG left to right (one column per wave, implied edges left out) and write it atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from detkd.models.checkpoint import atomic_write_bytes

    waves = dag.waves()
    position = {}
    for x, wave in enumerate(waves):
        for y, name in enumerate(wave):
            position[name] = (x, -(y - (len(wave) - 1) / 2))
    tallest = max(len(w) for w in waves)
    figure, axes = plt.subplots(figsize=(2.6 * len(waves) + 1, 1.1 * tallest + 1.2))
    boxes = {}
    for step in dag.steps:
        x, y = position[step.name]
        boxes[step.name] = axes.text(
            x,
            y,
            f"{step.name}\n({step.kind})",
            ha="center",
            va="center",
            fontsize=8,
            zorder=2,
            bbox={"boxstyle": "round,pad=0.4", "facecolor": KIND_COLOURS[step.kind], "edgecolor": "#37474f"},
        )
    for step in dag.steps:
        for need in dag.drawn_needs(step.name):
            skips = position[step.name][0] - position[need][0] > 1  # bend long edges around the columns between
            axes.annotate(
                "",
                xy=position[step.name],
                xytext=position[need],
                zorder=1,
                arrowprops={
                    "arrowstyle": "->",
                    "color": "#546e7a",
                    "patchA": boxes[need].get_bbox_patch(),
                    "patchB": boxes[step.name].get_bbox_patch(),
                    "connectionstyle": f"arc3,rad={0.25 if skips else 0.0}",
                },
            )
    axes.set_xlim(-0.7, len(waves) - 0.3)
    axes.set_ylim(-(tallest / 2) - 0.2, tallest / 2 + 0.2)
    axes.axis("off")
    axes.set_title(f"pipeline {dag.pipeline}: steps left to right; a column can run together", fontsize=9)
    figure.tight_layout()
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())
    return path


# hears a step change state: (step, "running" | "finished" | "failed" | "blocked", the failure or None)
StepListener = Callable[[Step, str, "BaseException | None"], None]


@dataclass
class Execution:
    """What :func:`execute` did: each step's return value, the steps that raised, and the steps they stopped."""

    results: dict[str, Any] = field(default_factory=dict)
    failed: dict[str, BaseException] = field(default_factory=dict)
    blocked: list[str] = field(default_factory=list)
    most_at_once: int = 0  # the largest number of steps that ran at the same time

    @property
    def ok(self) -> bool:
        return not self.failed and not self.blocked


def execute(
    dag: PipelineDag,
    run: Callable[[Step], Any],
    *,
    steps: list[str],
    parallel: int = 1,
    fits: Callable[[Step, list[Step]], bool] | None = None,
    on_change: StepListener | None = None,
    results: dict[str, Any] | None = None,
) -> Execution:
    """Run ``steps`` (a subset of the DAG whose other needs are done) as soon as their needs finish.

    At most ``parallel`` run at once, each in a thread of this process (a step is a blocking call
    such as a Ray Train fit, so threads only wait). ``fits(step, running)`` says whether the
    cluster has room for ``step`` beside ``running``; a step that does not fit waits, unless
    nothing is running (it then runs alone). A step that raises stops every step that needs it;
    the others run on. ``on_change(step, state, error)`` hears each step go ``running``, then
    ``finished``, ``failed`` (with its exception) or ``blocked`` (a need failed). ``results``
    (filled as steps finish, before their dependants start) lets a step read what its needs
    returned. ``parallel=1`` runs every step in this thread, so Ctrl-C
    reaches it as it would without a scheduler; with threads, KeyboardInterrupt propagates at
    once and the caller stops what still runs (for Ray: ``ray.shutdown()``).
    """
    wanted = [s for s in dag.steps if s.name in set(steps)]
    outside = {n for s in wanted for n in s.needs if n not in set(steps)}
    execution = Execution(results=results if results is not None else {})
    tell = on_change or (lambda step, state, error=None: None)
    if parallel <= 1:
        return _execute_inline(wanted, run, execution, tell)
    finished: set[str] = set(outside)
    stopped: set[str] = set()
    running: dict[Future, Step] = {}
    pool = ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="detkd-step")
    try:
        while True:
            for step in wanted:
                if step.name in stopped or step.name in finished or step in running.values():
                    continue
                if stopped.intersection(step.needs):
                    stopped.add(step.name)
                    execution.blocked.append(step.name)
                    tell(step, "blocked", None)
                    continue
                if not finished.issuperset(step.needs) or len(running) >= max(1, parallel):
                    continue
                if running and fits is not None and not fits(step, list(running.values())):
                    continue
                tell(step, "running", None)
                running[pool.submit(run, step)] = step
                execution.most_at_once = max(execution.most_at_once, len(running))
            if not running:
                break
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in done:
                step = running.pop(future)
                error = future.exception()
                if isinstance(error, KeyboardInterrupt):
                    raise error
                if error is not None:
                    execution.failed[step.name] = error
                    stopped.add(step.name)
                    tell(step, "failed", error)
                else:
                    execution.results[step.name] = future.result()
                    finished.add(step.name)
                    tell(step, "finished", None)
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)  # running calls end when the caller stops Ray
        raise
    pool.shutdown()
    return execution


def _execute_inline(
    wanted: list[Step],
    run: Callable[[Step], Any],
    execution: Execution,
    tell: StepListener,
) -> Execution:
    """One step at a time in spec order (a topological order), in the calling thread."""
    stopped: set[str] = set()
    for step in wanted:
        if stopped.intersection(step.needs):
            stopped.add(step.name)
            execution.blocked.append(step.name)
            tell(step, "blocked", None)
            continue
        tell(step, "running", None)
        try:
            execution.results[step.name] = run(step)
        except Exception as exc:  # a failed step stops its dependants; KeyboardInterrupt stops everything
            execution.failed[step.name] = exc
            stopped.add(step.name)
            tell(step, "failed", exc)
        else:
            tell(step, "finished", None)
        execution.most_at_once = 1
    return execution
