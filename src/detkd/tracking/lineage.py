"""Where a model came from: its lineage tree, read back from MLflow tags (``detkd lineage``).

Every component run carries its lineage as tags (``detkd.dataset.<split>`` digests,
``detkd.teacher_runs`` in order, ``detkd.previous_stage_run``, ``detkd.config_digest``,
``detkd.version``, ``detkd.git_commit``, ``detkd.pipeline_run``); registered versions point at
their run. This module follows those links from a model URI or run id and returns a tree:

    registered version -> student run -> (datasets, previous stage -> ..., teachers -> datasets)

read top-down it is the model's ancestry; read bottom-up, dataset -> teachers -> stages ->
student -> registered version. It also draws a pipeline's lineage as a PNG.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from detkd.config import ConfigError

TAG = "detkd."
KEY_METRICS = ("eval/test/AP", "eval/val/AP", "final/val/AP", "val/AP", "eval/images_per_s")
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
LINES = ("speed", "cost")  # details shown on lines of their own under a node's label


@dataclass
class Node:
    kind: str  # registered | run | dataset
    label: str
    run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)
    children: list[Node] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": self.kind, "label": self.label}
        if self.run_id:
            data["run_id"] = self.run_id
        if self.metrics:
            data["metrics"] = self.metrics
        if self.details:
            data["details"] = self.details
        if self.children:
            data["children"] = [c.as_dict() for c in self.children]
        return data


def resolve(ref: str, client: MlflowClient) -> tuple[str, Any | None]:
    """(run id, registered model version or None) of ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``,
    ``models:/<logged model id>``, ``runs:/RUN_ID[/path]`` or a bare run id."""
    from detkd.tracking.registry import model_version

    try:
        if ref.startswith("models:/"):
            version = model_version(client, ref)
            if version is not None:
                return version.run_id, version
            return client.get_logged_model(ref.removeprefix("models:/")).source_run_id, None
        if ref.startswith("runs:/"):
            run_id = ref.removeprefix("runs:/").split("/", 1)[0]
            client.get_run(run_id)
            return run_id, None
        if RUN_ID.match(ref):
            client.get_run(ref)
            return ref, None
    except MlflowException as exc:
        raise ConfigError(f"{ref}: not found in the MLflow store ({exc.message.splitlines()[0]})") from None
    raise ConfigError(
        f"{ref}: give models:/NAME@ALIAS, models:/NAME/VERSION, models:/<model id>, runs:/RUN_ID or a run id"
    )


def run_node(client: MlflowClient, run_id: str, seen: set[str]) -> Node:
    """A run with its key metrics, datasets, previous stage and teachers (each visited once)."""
    run = client.get_run(run_id)
    tags = run.data.tags
    seen.add(run_id)
    component = tags.get(f"{TAG}component") or tags.get(f"{TAG}kind") or tags.get(f"{TAG}role", "run")
    label = run.info.run_name or run_id
    if tags.get(f"{TAG}stage"):
        label += f" (stage {tags[f'{TAG}stage']}/{tags.get(f'{TAG}stages', '?')})"
    node = Node(
        "run",
        f"{component}: {label}",
        run_id=run_id,
        metrics={k: round(v, 4) for k, v in run.data.metrics.items() if k in KEY_METRICS},
        details={
            k.removeprefix(TAG): v
            for k, v in tags.items()
            if k.removeprefix(TAG) in ("method", "config_digest", "version", "git_commit", "pipeline_run", "input_size")
        },
    )
    node.details["status"] = run.info.status
    for key in sorted(k for k in tags if k.startswith(f"{TAG}dataset.")):
        node.children.append(Node("dataset", f"dataset {key.removeprefix(TAG + 'dataset.')}: {tags[key]}"))
    previous = tags.get(f"{TAG}previous_stage_run")
    if previous:
        node.children.append(linked(client, previous, seen, "previous stage"))
    for k, teacher in enumerate(teacher_runs(tags)):
        node.children.append(linked(client, teacher, seen, f"teacher {k}") if teacher else Node("run", f"teacher {k}"))
    return node


def linked(client: MlflowClient, run_id: str, seen: set[str], role: str) -> Node:
    if run_id in seen:
        return Node("run", f"{role}: run {run_id} (shown above)", run_id=run_id)
    try:
        node = run_node(client, run_id, seen)
    except MlflowException:
        return Node("run", f"{role}: run {run_id} (not in this MLflow store)", run_id=run_id)
    node.label = f"{role} <- {node.label}"
    return node


def teacher_runs(tags: dict[str, str]) -> list[str]:
    """The ordered teacher runs a run learned from (``teacher_runs``, else ``teacher.<k>.run_id``)."""
    if f"{TAG}teacher_runs" in tags:
        return list(json.loads(tags[f"{TAG}teacher_runs"]))
    found = []
    k = 0
    while f"{TAG}teacher.{k}" in tags or f"{TAG}teacher.{k}.run_id" in tags:
        found.append(tags.get(f"{TAG}teacher.{k}.run_id", ""))
        k += 1
    return found


def lineage_tree(ref: str, tracking_uri: str) -> Node:
    """The lineage of a model URI or run id, registered version at the root when there is one."""
    client = MlflowClient(tracking_uri)
    run_id, version = resolve(ref, client)
    if run_id is None:
        raise ConfigError(f"{ref}: the registered version has no source run, so it has no lineage")
    student = run_node(client, run_id, set())
    registered = [version] if version is not None else client.search_model_versions(f"run_id = '{run_id}'")
    if not registered:
        return student
    roots = [version_node(client, v) for v in registered]
    roots[0].children.append(student)
    if len(roots) == 1:
        return roots[0]
    return Node("run", f"run {run_id}, registered {len(roots)} times", run_id=run_id, children=roots)


def version_node(client: MlflowClient, version: Any) -> Node:
    full = client.get_model_version(version.name, version.version)
    aliases = ", ".join(f"@{a}" for a in full.aliases) or "no alias"
    tags = full.tags
    details = {k: tags[TAG + k] for k in ("gate.passed", "verdict", "split_digest", "pipeline_run") if TAG + k in tags}
    for key, line in (("speed", speed_line(tags)), ("cost", cost_line(tags))):
        if line:
            details[key] = line
    return Node(
        "registered",
        f"registered {full.name} v{full.version} ({aliases})",
        run_id=full.run_id,
        metrics={f"{tags.get(TAG + 'split', 'split')}/AP": float(tags[TAG + "ap"])} if TAG + "ap" in tags else {},
        details=details,
    )


def speed_line(tags: dict[str, str]) -> str:
    """A version's deployed speed from its ``detkd.speed.*`` tags: ``3.12x teacher (2.41 ms/image against
    7.52 ms; onnxruntime 1.20.1, batch 1, 1 thread(s); on HOST (...))``; why it was not measured; or ""."""
    if f"{TAG}speed.speedup" in tags:
        reference = tags.get(f"{TAG}speed.reference", "the reference")
        backend, machine = tags.get(f"{TAG}speed.backend", "onnxruntime"), tags.get(f"{TAG}speed.machine", "?")
        return (
            f"{float(tags[TAG + 'speed.speedup']):.2f}x {reference} "
            f"({float(tags[TAG + 'speed.latency_ms']):.2f} ms/image against "
            f"{float(tags.get(TAG + 'speed.reference_latency_ms', 'nan')):.2f} ms; {backend}; on {machine})"
        )
    if f"{TAG}speed.unavailable" in tags:
        return f"not measured ({tags[TAG + 'speed.unavailable']})"
    return ""


def cost_line(tags: dict[str, str]) -> str:
    """``412.3 MFLOPs, 1.23 M parameters`` from a version's ``detkd.cost.*`` tags, or ""."""
    if f"{TAG}cost.mflops" not in tags:
        return ""
    params = int(tags.get(f"{TAG}cost.params", "0"))
    return f"{float(tags[TAG + 'cost.mflops']):.1f} MFLOPs, {params / 1e6:.2f} M parameters"


def render(node: Node):
    """A rich Tree of the lineage."""
    from rich.markup import escape
    from rich.tree import Tree

    def text(n: Node) -> str:
        parts = [f"[bold]{escape(n.label)}[/bold]" if n.kind != "dataset" else escape(n.label)]
        if n.run_id and n.kind == "run" and "(shown above)" not in n.label:
            parts.append(f"run {n.run_id}")
        parts += [f"{k} {v}" for k, v in n.metrics.items()]
        parts += [f"{k}={escape(str(v))}" for k, v in n.details.items() if k not in ("pipeline_run", *LINES)]
        lines = [f"{k}: {escape(n.details[k])}" for k in LINES if k in n.details]
        return "\n".join([" · ".join(parts), *lines])

    def grow(tree, n: Node) -> None:
        for child in n.children:
            grow(tree.add(text(child)), child)

    tree = Tree(text(node))
    grow(tree, node)
    return tree


def pipeline_lineage_png(tracking_uri: str, pipeline_run_id: str, path: Path) -> Path:
    """Draw a pipeline run's components as columns (data, teachers, students and stages, registered
    version) with an arrow for every lineage link; written to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from detkd.tracking.runs import child_runs

    runs = child_runs(tracking_uri, pipeline_run_id)
    by_id = {r.info.run_id: r for r in runs}
    columns: dict[str, list[Any]] = {"data": [], "teachers": [], "students": [], "registered": []}
    for r in sorted(runs, key=lambda r: r.info.start_time or 0):
        component = r.data.tags.get(f"{TAG}component", "")
        if component == "data":
            columns["data"].append(("data", r.info.run_id, dataset_lines(r.data.tags)))
        elif component == "teacher":
            columns["teachers"].append((r.info.run_name, r.info.run_id, metric_lines(r)))
        elif component in ("student", "stage"):
            name = r.info.run_name + (f" (stage {r.data.tags[TAG + 'stage']})" if component == "stage" else "")
            columns["students"].append((name, r.info.run_id, metric_lines(r)))
        elif component == "register":
            tags = r.data.tags
            label = f"{tags.get(TAG + 'registered_model', '?')} v{tags.get(TAG + 'registered_version', '?')}"
            lines = [f"@{tags.get(TAG + 'alias', '')}"]
            if "speed/speedup" in r.data.metrics:
                lines.append(f"{r.data.metrics['speed/speedup']:.2f}x {tags.get(TAG + 'speed.reference', '')}".strip())
            columns["registered"].append((label, tags.get(TAG + "candidate_run", ""), lines))
    positions: dict[str, tuple[float, float]] = {}
    figure, axes = plt.subplots(figsize=(13, 1.6 + 1.1 * max(1, *(len(v) for v in columns.values()))))
    for x, (title, items) in enumerate(columns.items()):
        axes.text(x, 0.6, title, ha="center", fontsize=11, weight="bold")
        for y, (name, run_id, lines) in enumerate(items):
            ypos = -y * 1.1
            key = f"reg:{run_id}" if title == "registered" else run_id
            positions[key] = (x, ypos)
            axes.text(
                x,
                ypos,
                "\n".join([name, *lines]),
                ha="center",
                va="center",
                fontsize=8,
                bbox={"boxstyle": "round", "facecolor": "#e8f0fe" if title != "registered" else "#e6f4ea"},
            )

    def arrow(source: str, target: str) -> None:
        if source in positions and target in positions:
            (x0, y0), (x1, y1) = positions[source], positions[target]
            axes.annotate(
                "", xy=(x1 - 0.32, y1), xytext=(x0 + 0.32, y0), arrowprops={"arrowstyle": "->", "color": "#555"}
            )

    data_run = columns["data"][0][1] if columns["data"] else None
    for run_id, r in by_id.items():
        tags = r.data.tags
        if data_run and tags.get(f"{TAG}component") in ("teacher", "student", "stage") and not teacher_runs(tags):
            arrow(data_run, run_id)
        for teacher in teacher_runs(tags):
            arrow(teacher, run_id)
        if tags.get(f"{TAG}previous_stage_run"):
            arrow(tags[f"{TAG}previous_stage_run"], run_id)
    for _, candidate, _ in columns["registered"]:
        arrow(candidate, f"reg:{candidate}")
    axes.set_xlim(-0.6, len(columns) - 0.4)
    lowest = min((p[1] for p in positions.values()), default=0.0)
    axes.set_ylim(lowest - 0.8, 1.0)
    axes.axis("off")
    axes.set_title(f"lineage of pipeline run {pipeline_run_id}", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def dataset_lines(tags: dict[str, str]) -> list[str]:
    return [
        f"{k.removeprefix(TAG + 'dataset.')} {v[:8]}" for k, v in sorted(tags.items()) if k.startswith(TAG + "dataset.")
    ]


def metric_lines(run: Any) -> list[str]:
    metrics = run.data.metrics
    for key in ("eval/test/AP", "eval/val/AP", "final/val/AP"):
        if key in metrics:
            return [f"{key.split('/')[1]} AP {metrics[key]:.3f}"]
    return []
