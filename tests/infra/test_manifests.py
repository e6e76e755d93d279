"""infra/: the Kubernetes manifests, the Dockerfile and the deploy guide agree with each other and with the project.

Plain file checks (no network, no cluster): every manifest parses; images are this version's
detkd image; the Ray version is the pinned one; Services, ports and Secret keys that one file
names exist in the other; the S3 endpoint is one value; the commands the files run exist in
the detkd CLI.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import typer.main
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
SECRETS_EXAMPLE = "secrets.example.yaml"
SENSITIVE = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY")
GPU = "nvidia.com/gpu"
S3_ENDPOINT_VARS = ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")
API_VERSIONS = {
    "Deployment": "apps/v1",
    "StatefulSet": "apps/v1",
    "Service": "v1",
    "Secret": "v1",
    "PersistentVolumeClaim": "v1",
    "RayCluster": "ray.io/v1",
    "RayJob": "ray.io/v1",
}


# --- the files -------------------------------------------------------------------------------


@functools.cache
def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def version() -> str:
    return pyproject()["project"]["version"]


@functools.cache
def pins() -> dict[str, str]:
    """constraints.txt as {normalised name: version}."""
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, pinned = line.partition("==")
            out[normalise(name)] = pinned.strip()
    return out


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def yaml_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))


@functools.cache
def manifests() -> dict[str, list[dict[str, Any]]]:
    """{file name: its YAML documents} for every YAML file under infra/."""
    return {
        str(p.relative_to(INFRA)): [d for d in yaml.safe_load_all(p.read_text()) if d is not None] for p in yaml_files()
    }


def docs(kind: str, *, files: tuple[str, ...] | None = None) -> list[tuple[str, dict[str, Any]]]:
    return [
        (name, doc)
        for name, found in manifests().items()
        if files is None or name in files
        for doc in found
        if doc["kind"] == kind
    ]


def one(kind: str, file: str) -> dict[str, Any]:
    found = docs(kind, files=(file,))
    assert len(found) == 1, f"infra/{file}: expected one {kind}, found {len(found)}"
    return found[0][1]


def ray_clusters() -> list[tuple[str, dict[str, Any]]]:
    """(where, RayCluster spec) for every RayCluster and every RayJob's cluster."""
    out = [(f"{f}:{d['metadata']['name']}", d["spec"]) for f, d in docs("RayCluster")]
    out += [(f"{f}:{d['metadata']['name']}", d["spec"]["rayClusterSpec"]) for f, d in docs("RayJob")]
    return out


def ray_pods(cluster: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any] | None]]:
    """(node group, pod spec, worker group or None for the head)."""
    yield "head", cluster["headGroupSpec"]["template"]["spec"], None
    for group in cluster.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]["spec"], group


def pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod spec) for every pod any manifest creates."""
    for kind in ("Deployment", "StatefulSet"):
        for f, d in docs(kind):
            yield f"{f}:{d['metadata']['name']}", d["spec"]["template"]["spec"]
    for where, cluster in ray_clusters():
        for group, pod, _ in ray_pods(cluster):
            yield f"{where}:{group}", pod
    for f, d in docs("RayJob"):
        if "submitterPodTemplate" in d["spec"]:
            yield f"{f}:{d['metadata']['name']}:submitter", d["spec"]["submitterPodTemplate"]["spec"]


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return pod.get("initContainers", []) + pod["containers"]


def all_containers() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, pod spec, container) for every container of every pod."""
    for where, pod in pod_specs():
        for c in containers(pod):
            yield f"{where}:{c['name']}", pod, c


def env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def expand(value: str, container: dict[str, Any]) -> str:
    """Kubernetes' $(VAR) expansion: plain values substituted, Secret-backed ones as SECRET.<name>.<key>."""

    def sub(match: re.Match) -> str:
        entry = env(container).get(match.group(1))
        assert entry is not None, f"$({match.group(1)}) names no env var of container {container['name']}"
        if "value" in entry:
            return entry["value"]
        ref = entry["valueFrom"]["secretKeyRef"]
        return f"SECRET.{ref['name']}.{ref['key']}"

    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, value)


def gpus(container: dict[str, Any]) -> int:
    return int(container.get("resources", {}).get("limits", {}).get(GPU, 0))


def selects(service: dict[str, Any], labels: dict[str, str]) -> bool:
    selector = service["spec"].get("selector") or {}
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def container_port(container: dict[str, Any], target: int | str) -> int:
    """The container port a Service targetPort (a number or a port name) lands on."""
    for port in container.get("ports", []):
        if target in (port["containerPort"], port.get("name")):
            return port["containerPort"]
    raise AssertionError(f"container {container['name']} has no port {target!r}")


def service_for(pod_template: dict[str, Any], file: str) -> dict[str, Any]:
    labels = pod_template["metadata"]["labels"]
    found = [d for _, d in docs("Service", files=(file,)) if selects(d, labels)]
    assert len(found) == 1, f"infra/{file}: expected one Service selecting {labels}, found {len(found)}"
    return found[0]


def mlflow_server() -> tuple[dict[str, Any], dict[str, Any]]:
    """(Deployment, its container) running `mlflow server` in infra/mlflow.yaml."""
    deployment = one("Deployment", "mlflow.yaml")
    found = [
        c
        for c in deployment["spec"]["template"]["spec"]["containers"]
        if c.get("command", [])[:2] == ["mlflow", "server"]
    ]
    assert len(found) == 1, "infra/mlflow.yaml: the Deployment should run one `mlflow server` container"
    return deployment, found[0]


def arg(container: dict[str, Any], flag: str) -> str | None:
    """The value of ``flag`` in a container's command + args (``--flag value`` or ``--flag=value``)."""
    words = container.get("command", []) + container.get("args", [])
    for i, word in enumerate(words):
        if word == flag:
            return words[i + 1]
        if word.startswith(flag + "="):
            return word.split("=", 1)[1]
    return None


# --- the Dockerfile --------------------------------------------------------------------------


@functools.cache
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of infra/Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (INFRA / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            out.append((instruction.upper(), rest.strip()))
    return out


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction, rest in dockerfile():
        if instruction == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction, rest))
    return stages


def stage_args(stage: list[tuple[str, str]]) -> dict[str, str]:
    """A stage's ARG defaults (what a build without --build-arg uses)."""
    out = {}
    for instruction, rest in stage:
        if instruction == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            out[name] = value.strip().strip('"')
    return out


def pip_installs() -> list[list[str]]:
    """Every `pip install ...` in a RUN, as words with the stage's ARG defaults substituted."""
    out = []
    for stage in dockerfile_stages():
        out += stage_pip_installs(stage)
    return out


def stage_pip_installs(stage: list[tuple[str, str]]) -> list[list[str]]:
    args = stage_args(stage)
    out = []
    for instruction, rest in stage:
        if instruction != "RUN":
            continue
        for command in re.split(r"&&|;|\|\|", rest):
            words = shlex.split(command.strip()) if "pip install" in command else []
            if words[:2] == ["pip", "install"]:
                expanded = []
                for word in words[2:]:
                    word = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), word)
                    expanded += word.split()  # an unquoted $ARG holding several requirements
                out.append(expanded)
    return out


def workdir() -> str:
    """The final stage's WORKDIR: where the image keeps pipelines/ and search_spaces/."""
    found = [rest for instruction, rest in dockerfile_stages()[-1] if instruction == "WORKDIR"]
    assert found, "infra/Dockerfile: the final stage sets no WORKDIR"
    return found[-1]


def copied(stage: list[tuple[str, str]]) -> set[str]:
    """Sources the stage COPYs from the build context (not --from another stage)."""
    out = set()
    for instruction, rest in stage:
        if instruction == "COPY" and "--from" not in rest:
            out.update(w.rstrip("/") for w in shlex.split(rest)[:-1] if not w.startswith("--"))
    return out


# --- the CLI ---------------------------------------------------------------------------------


@functools.cache
def cli_help(path: tuple[str, ...]) -> str:
    from detkd.cli import app

    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, f"`detkd {' '.join(path)} --help` failed: {result.output}"
    return result.output


def split_command(words: list[str]) -> tuple[tuple[str, ...], list[str]]:
    """(subcommand path, remaining words) of a `detkd ...` command line, following the CLI's groups."""
    from detkd.cli import app

    assert words[0] == "detkd", words
    command = typer.main.get_command(app)  # typer may vendor its own click: tell groups by .commands
    path: list[str] = []
    rest = words[1:]
    while hasattr(command, "commands") and rest and rest[0] in command.commands:
        command = command.commands[rest[0]]
        path.append(rest.pop(0))
    assert path and not hasattr(command, "commands"), f"`{' '.join(words)}`: not a detkd command"
    return tuple(path), rest


def check_flags(words: list[str], where: str) -> tuple[tuple[str, ...], list[str]]:
    """Every --flag of a `detkd ...` command appears in that subcommand's --help."""
    path, rest = split_command(words)
    text = cli_help(path)
    for word in rest:
        if word.startswith("--"):
            flag = word.split("=", 1)[0]
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), (
                f"{where}: `detkd {' '.join(path)}` has no option {flag}"
            )
    return path, rest


def option_values(words: list[str], flag: str) -> list[str]:
    return [words[i + 1] for i, w in enumerate(words[:-1]) if w == flag] + [
        w.split("=", 1)[1] for w in words if w.startswith(flag + "=")
    ]


def readme_commands(prefix: str) -> list[list[str]]:
    """Command lines starting with ``prefix`` in infra/README.md's fenced blocks (continuations joined)."""
    text = (INFRA / "README.md").read_text()
    out = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith(prefix + " "):
                out.append(shlex.split(line))
    return out


def rayjob() -> dict[str, Any]:
    return one("RayJob", "rayjob.yaml")


def entrypoint() -> list[str]:
    return shlex.split(rayjob()["spec"]["entrypoint"])


def s3_endpoint() -> str:
    values = {
        e["value"]
        for _, _, c in all_containers()
        for name, e in env(c).items()
        if name in S3_ENDPOINT_VARS and "value" in e
    }
    assert len(values) == 1, f"the manifests name {len(values)} S3 endpoints: {sorted(values)}"
    return values.pop()


# --- the tests -------------------------------------------------------------------------------


def test_every_manifest_parses_and_names_itself():
    names = {p.name for p in yaml_files()}
    assert {"kuberay-cluster.yaml", "rayjob.yaml", "mlflow.yaml", SECRETS_EXAMPLE} <= names
    seen: dict[tuple[str, str], str] = {}
    for file, found in manifests().items():
        assert found, f"infra/{file}: no YAML document"
        for doc in found:
            assert isinstance(doc, dict), f"infra/{file}: a document is not a mapping"
            for key in ("apiVersion", "kind"):
                assert doc.get(key), f"infra/{file}: a document has no {key}"
            assert (doc.get("metadata") or {}).get("name"), f"infra/{file}: a {doc['kind']} has no metadata.name"
            kind, name = doc["kind"], doc["metadata"]["name"]
            assert API_VERSIONS.get(kind) == doc["apiVersion"], (
                f"infra/{file}: {kind} {name}: apiVersion {doc['apiVersion']}, expected {API_VERSIONS.get(kind)}"
            )
            assert (kind, name) not in seen, f"{kind} {name} is defined in infra/{file} and infra/{seen[(kind, name)]}"
            seen[(kind, name)] = file


def test_images_are_this_versions_detkd_image():
    cpu, cuda = f"detkd:{version()}", f"detkd:{version()}-cuda"
    images = set()
    for where, _, c in all_containers():
        image = c["image"]
        if image.split(":")[0] == "postgres":
            continue
        assert image in (cpu, cuda), f"{where}: image {image}, expected {cpu} or {cuda} (pyproject version)"
        if gpus(c):
            assert image == cuda, f"{where} asks for GPUs but runs {image}, not {cuda}"
        images.add(image)
    assert images == {cpu, cuda}, f"expected both variants in use (CPU for MLflow, CUDA for Ray), found {images}"
    for where, cluster in ray_clusters():  # Ray wants the same Python packages on every node
        node_images = {c["image"] for _, pod, _ in ray_pods(cluster) for c in containers(pod)}
        assert len(node_images) == 1, f"{where}: Ray nodes run different images {node_images}"


def test_ray_version_is_the_pinned_ray():
    pinned = pins()["ray"]
    ray_requirement = next(Requirement(r) for r in pyproject()["project"]["dependencies"] if r.startswith("ray"))
    assert ray_requirement.specifier.contains(pinned), f"constraints.txt ray=={pinned} is outside {ray_requirement}"
    clusters = ray_clusters()
    assert len(clusters) >= 2, "expected the RayCluster and the RayJob's cluster"
    for where, cluster in clusters:
        assert str(cluster["rayVersion"]) == pinned, f"{where}: rayVersion {cluster['rayVersion']}, ray pin {pinned}"


def test_head_schedules_nothing_and_gpu_workers_autoscale():
    for where, cluster in ray_clusters():
        head = cluster["headGroupSpec"]
        assert head["rayStartParams"].get("num-cpus") == "0", f'{where}: the head should have num-cpus "0"'
        head_ports = {p["containerPort"] for c in head["template"]["spec"]["containers"] for p in c.get("ports", [])}
        assert 8265 in head_ports, f"{where}: the head exposes no dashboard port 8265"
        assert cluster.get("enableInTreeAutoscaling") is True, f"{where}: autoscaling is off"
        gpu_groups = [g for _, pod, g in ray_pods(cluster) if g and any(gpus(c) for c in pod["containers"])]
        assert gpu_groups, f"{where}: no worker group asks for {GPU}"
        for group in gpu_groups:
            bounds = [group.get(k) for k in ("minReplicas", "replicas", "maxReplicas")]
            assert all(isinstance(b, int) for b in bounds), f"{where}:{group['groupName']}: replica bounds {bounds}"
            low, replicas, high = bounds
            assert 0 <= low <= replicas <= high and high >= 1, f"{where}:{group['groupName']}: {low}/{replicas}/{high}"
            for c in group["template"]["spec"]["containers"]:
                requested = c["resources"].get("requests", {}).get(GPU)
                assert requested in (None, c["resources"]["limits"][GPU]), f"{where}: GPU request != limit"
                assert group["rayStartParams"].get("num-gpus", str(gpus(c))) == str(gpus(c))


def test_rayjob_runs_the_same_cluster_as_kuberay_cluster_yaml():
    cluster = one("RayCluster", "kuberay-cluster.yaml")["spec"]
    job = rayjob()["spec"]
    assert job["rayClusterSpec"] == cluster, (
        "infra/rayjob.yaml's rayClusterSpec drifted from infra/kuberay-cluster.yaml"
    )
    assert job.get("shutdownAfterJobFinishes") is True


def test_ray_pods_track_to_the_mlflow_service():
    deployment, server = mlflow_server()
    template = deployment["spec"]["template"]
    labels = template["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in deployment["spec"]["selector"]["matchLabels"].items())
    service = service_for(template, "mlflow.yaml")
    (port,) = service["spec"]["ports"]
    target = container_port(server, port.get("targetPort", port["port"]))
    assert arg(server, "--port") == str(target), (
        f"mlflow server listens on {arg(server, '--port')}, Service targets {target}"
    )
    allowed = arg(server, "--allowed-hosts")
    assert allowed, "mlflow server without --allowed-hosts refuses Host headers other than localhost and IPs"
    from mlflow.server.security_utils import is_allowed_host_header

    seen = 0
    for where, cluster in ray_clusters():
        for group, pod, _ in ray_pods(cluster):
            for c in pod["containers"]:
                uri = env(c).get("MLFLOW_TRACKING_URI", {}).get("value")
                assert uri, f"{where}:{group}: no MLFLOW_TRACKING_URI"
                parts = urlsplit(uri)
                assert parts.scheme == "http" and parts.hostname.split(".")[0] == service["metadata"]["name"], (
                    f"{where}:{group}: MLFLOW_TRACKING_URI {uri} is not the Service {service['metadata']['name']}"
                )
                assert parts.port == port["port"], f"{where}:{group}: {uri} is not the Service port {port['port']}"
                assert is_allowed_host_header(allowed.split(","), parts.netloc), (
                    f"mlflow server --allowed-hosts {allowed} refuses Host {parts.netloc}"
                )
                seen += 1
    assert seen >= 4  # head and workers of both clusters
    for local in (f"127.0.0.1:{port['port']}", f"localhost:{port['port']}"):  # kubectl port-forward
        assert is_allowed_host_header(allowed.split(","), local), f"--allowed-hosts refuses the port-forward {local}"


def test_mlflow_backend_store_is_the_postgres_statefulset():
    _, server = mlflow_server()
    uri = arg(server, "--backend-store-uri") or env(server)["MLFLOW_BACKEND_STORE_URI"]["value"]
    parts = urlsplit(expand(uri, server))
    statefulset = one("StatefulSet", "mlflow.yaml")
    (postgres,) = statefulset["spec"]["template"]["spec"]["containers"]
    service = service_for(statefulset["spec"]["template"], "mlflow.yaml")
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"].get("clusterIP") == "None", "a StatefulSet's governing Service is headless"
    (port,) = service["spec"]["ports"]
    # headless: clients connect to the pod itself, so the Service port must be the container port
    assert port["port"] == container_port(postgres, port.get("targetPort", port["port"]))
    db = {name: e.get("value") for name, e in env(postgres).items()}
    assert parts.scheme.startswith("postgresql")
    assert (parts.hostname, parts.port) == (service["metadata"]["name"], port["port"]), uri
    assert parts.username == db["POSTGRES_USER"] and parts.path == f"/{db['POSTGRES_DB']}", uri
    ref = env(postgres)["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert parts.password == f"SECRET.{ref['name']}.{ref['key']}", "the URI's password is not PostgreSQL's Secret"


def test_mlflow_server_command_parses_and_its_drivers_are_in_the_image(monkeypatch):
    _, server = mlflow_server()
    for name in [n for n in os.environ if n.startswith(("MLFLOW_", "AWS_"))]:
        monkeypatch.delenv(name)
    for name, entry in env(server).items():  # what the container sees (secrets as placeholders)
        monkeypatch.setenv(name, expand(entry["value"], server) if "value" in entry else "secret")
    from mlflow.cli import server as mlflow_server_command

    words = server.get("command", []) + server.get("args", [])
    params = mlflow_server_command.make_context("mlflow server", words[2:]).params  # fails on an unknown flag
    assert params["host"] == "0.0.0.0" and params["serve_artifacts"] is True
    assert params["backend_store_uri"].startswith("postgresql://")
    assert params["artifacts_destination"].startswith("s3://")
    args = [rest for instruction, rest in dockerfile() if instruction == "ARG" and rest.startswith("DETKD_EXTRAS=")]
    extras = args[0].removeprefix("DETKD_EXTRAS=").split(",")
    assert "server" in extras, "the image lacks the server extra (PostgreSQL driver, boto3) the MLflow server needs"
    server = {normalise(Requirement(r).name) for r in pyproject()["project"]["optional-dependencies"]["server"]}
    assert {"psycopg", "boto3"} <= server, "the server extra must hold psycopg (postgresql:// URIs) and boto3 (s3://)"
    assert {"psycopg", "psycopg-binary", "boto3"} <= set(pins()), "constraints.txt must pin the server extra"


def test_services_have_probes_and_every_container_has_resources():
    for kind in ("Deployment", "StatefulSet"):
        for file, d in docs(kind):
            for c in d["spec"]["template"]["spec"]["containers"]:
                for probe in ("readinessProbe", "livenessProbe"):
                    assert probe in c, f"infra/{file}:{d['metadata']['name']}:{c['name']} has no {probe}"
                    if "httpGet" in c[probe]:
                        container_port(c, c[probe]["httpGet"]["port"])
    for where, _, c in all_containers():
        for section in ("requests", "limits"):
            got = c.get("resources", {}).get(section, {})
            assert {"cpu", "memory"} <= set(got), f"{where}: resources.{section} lacks cpu or memory"


def test_secrets_come_only_from_the_example_secret():
    (secret,) = [d for _, d in docs("Secret", files=(SECRETS_EXAMPLE,))]
    others = [f for f, _ in docs("Secret") if f != SECRETS_EXAMPLE]
    assert not others, f"only infra/{SECRETS_EXAMPLE} may define a Secret, found one in {others}"
    values = {**secret.get("stringData", {}), **secret.get("data", {})}
    assert values and all("CHANGE-ME" in str(v) for v in values.values()), "every example value must be a placeholder"
    used = set()
    for where, _, c in all_containers():
        for name, entry in env(c).items():
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if SENSITIVE.search(name):
                assert ref and "value" not in entry, f"{where}: {name} must come from a secretKeyRef, not a value"
            if ref:
                assert ref["name"] == secret["metadata"]["name"], f"{where}: {name} reads Secret {ref['name']}"
                assert ref["key"] in values, f"{where}: {name} reads key {ref['key']}, not in infra/{SECRETS_EXAMPLE}"
                used.add(ref["key"])
            if "value" in entry:  # a credential inside a URI must be a $(VAR) filled from the Secret
                for password in re.findall(r"://[^/\s:@]+:([^@\s]+)@", entry["value"]):
                    assert re.fullmatch(r"\$\(\w+\)", password), f"{where}: {name} holds an inline password"
                    assert expand(password, c).startswith("SECRET."), f"{where}: {name}: password not from a Secret"
        for source in c.get("envFrom", []):
            assert source.get("secretRef", {}).get("name") in (None, secret["metadata"]["name"]), where
    assert used == set(values), f"keys of infra/{SECRETS_EXAMPLE} no manifest reads: {set(values) - used}"
    for instruction, rest in dockerfile():
        if instruction in ("ENV", "ARG"):
            assert not SENSITIVE.search(rest) and "AWS_" not in rest, f"infra/Dockerfile bakes in {instruction} {rest}"


def test_s3_endpoint_is_one_value_everywhere():
    endpoint = s3_endpoint()
    assert urlsplit(endpoint).scheme in ("http", "https")
    for where, _, c in all_containers():
        if "AWS_ACCESS_KEY_ID" in env(c):
            for name in S3_ENDPOINT_VARS:
                assert env(c).get(name, {}).get("value") == endpoint, f"{where}: {name} is not {endpoint}"
    mentioned = 0
    for path in [*yaml_files(), INFRA / "README.md"]:  # comments, the RayJob's entrypoint, the guide's commands
        for found in re.findall(r"storage_endpoint[=:]\s*([^\s`'\"]+)", path.read_text()):
            assert found == endpoint, f"infra/{path.name}: run.storage_endpoint {found}, the pods' endpoint {endpoint}"
            mentioned += 1
    assert mentioned >= 3


def test_dockerfile_builds_both_variants_from_the_constraints():
    for stage in dockerfile_stages():  # every stage that names the variant defaults to CPU
        assert stage_args(stage).get("TORCH_VARIANT", "cpu") == "cpu", "the default build should be the CPU variant"
    (installing,) = [stage for stage in dockerfile_stages() if stage_pip_installs(stage)]
    assert "TORCH_VARIANT" in stage_args(installing), "the stage that installs torch should take ARG TORCH_VARIANT"
    runs = " ".join(rest for instruction, rest in dockerfile() if instruction == "RUN")
    assert "cpu)" in runs and "cu130)" in runs, "the RUN should handle TORCH_VARIANT cpu and cu130"
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in runs, "CPU torch: the PyTorch CPU extra index"
    assert "--index-url" not in runs.replace("--extra-index-url", ""), "an --index-url would hide the default index"
    installs = pip_installs()
    assert installs, "infra/Dockerfile runs no pip install"
    project = []
    for words in installs:
        assert "constraints.txt" in option_values(words, "-c"), f"pip install {' '.join(words)}: no -c constraints.txt"
        for word in words:
            if word.startswith(".["):
                project.append(word)
            elif not word.startswith("-") and word != "constraints.txt" and "://" not in word and "$" not in word:
                requirement = Requirement(word)  # anything else must be pinned, and agree with constraints.txt
                (spec,) = requirement.specifier
                assert spec.operator == "==", f"infra/Dockerfile installs {word} unpinned"
                assert pins().get(normalise(requirement.name), spec.version) == spec.version, word
    assert len(project) == 1, f"the project should be installed once, as .[extras], found {project}"
    extras = set(project[0][2:-1].split(","))
    assert extras <= set(pyproject()["project"]["optional-dependencies"]) - {"test"}, extras
    assert re.search(r'case "?\$\{?TORCH_VARIANT\}?"? in', runs), "the install should branch on TORCH_VARIANT"
    requires = SpecifierSet(pyproject()["project"]["requires-python"])
    stages = dockerfile_stages()
    for stage in stages:
        image = shlex.split(stage[0][1])[0]
        match = re.fullmatch(r"python:(\d+\.\d+)(-slim)", image)
        assert match, f"infra/Dockerfile: base image {image}, expected python:X.Y-slim"
        assert requires.contains(f"{match.group(1)}.0"), f"{image} is outside requires-python {requires}"
    pythons = {shlex.split(stage[0][1])[0] for stage in stages}
    assert len(pythons) == 1, f"the venv built in one stage runs in the next: one Python for all, not {pythons}"
    users = [rest for instruction, rest in stages[-1] if instruction == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image should run as a non-root user"


def test_dockerfile_copies_exist_and_pass_its_dockerignore():
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
    assert "*" in ignore, "the build context should be an allow-list"
    sources = set().union(*(copied(stage) for stage in dockerfile_stages()))
    assert {"pyproject.toml", "constraints.txt", "src", "pipelines", "search_spaces"} <= sources
    for source in sources:
        assert (ROOT / source).exists(), f"infra/Dockerfile copies {source}, which the repository lacks"
        assert f"!{source}" in ignore, f"infra/Dockerfile.dockerignore keeps {source} out of the build context"


def test_build_commands_tag_this_version():
    text = (INFRA / "Dockerfile").read_text() + (INFRA / "README.md").read_text()
    builds = re.findall(r"docker build [^\n]*", text)
    tags = set()
    for line in builds:
        (tag,) = option_values(shlex.split(line.split(" #")[0]), "-t")
        tags.add(tag)
        variant = re.search(r"TORCH_VARIANT=(\w+)", line)
        if tag.endswith("-cuda"):
            assert variant and variant.group(1) == "cu130", f"{line}: a -cuda tag needs TORCH_VARIANT=cu130"
        else:
            assert not variant or variant.group(1) == "cpu", f"{line}: the plain tag is the CPU variant"
        assert "-f infra/Dockerfile" in line and line.split(" #")[0].rstrip().endswith(" ."), line
    assert tags == {f"detkd:{version()}", f"detkd:{version()}-cuda"}, tags


def test_rayjob_entrypoint_is_a_detkd_command_the_cluster_can_run():
    from detkd.pipeline.load import load_pipeline
    from detkd.pipeline.spec import model_config

    words = entrypoint()
    path, rest = check_flags(words, "infra/rayjob.yaml entrypoint")
    assert path == ("run",)
    spec_path = Path(next(w for w in rest if not w.startswith("--")))
    if spec_path.is_absolute():  # the image's copy: WORKDIR/<what the Dockerfile copied>
        spec_path = spec_path.relative_to(workdir())
        assert spec_path.parts[0] in copied(dockerfile_stages()[-1]), f"the image has no {spec_path.parts[0]}/"
    assert (ROOT / spec_path).is_file(), f"the RayJob runs {spec_path}, which the repository lacks"
    spec = load_pipeline(ROOT / spec_path, option_values(words, "--set"))  # the overrides fit the pipeline schema
    cluster = rayjob()["spec"]["rayClusterSpec"]
    pods = list(ray_pods(cluster))
    claims = {d["metadata"]["name"]: d for _, d in docs("PersistentVolumeClaim")}
    for group, pod, _ in pods:  # the data and model files the steps read by path: on a volume every pod mounts
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        shared = [
            m["mountPath"]
            for c in pod["containers"]
            for m in c.get("volumeMounts", [])
            if volumes.get(m["name"], {}).get("persistentVolumeClaim", {}).get("claimName") in claims
        ]
        assert any(spec.workdir.is_relative_to(m) for m in shared), f"{group}: workdir {spec.workdir} is not shared"
    for claim in claims.values():
        assert "ReadWriteMany" in claim["spec"]["accessModes"], f"{claim['metadata']['name']}: not ReadWriteMany"
    gpu_groups = [g for _, pod, g in pods if g and any(gpus(c) for c in pod["containers"])]
    for entry, role in [(e, "teacher") for e in spec.teachers] + [(e, "student") for e in spec.students]:
        cfg = model_config(spec, entry, role=role)
        assert cfg.scaling.use_gpu == bool(gpu_groups), f"{entry.name}: use_gpu {cfg.scaling.use_gpu} on this cluster"
        assert cfg.run.storage_path.startswith("s3://"), f"{entry.name}: checkpoints in {cfg.run.storage_path}"
        assert cfg.run.storage_endpoint == s3_endpoint()
    parallel = int((option_values(words, "--parallel") or ["1"])[0])
    assert parallel <= sum(g["maxReplicas"] for g in gpu_groups), "more parallel steps than GPU workers"
    if parallel > 1:  # detkd splits the CPUs present at the start among the steps: a worker must be there
        assert all(g["minReplicas"] >= 1 for g in gpu_groups), "--parallel needs minReplicas >= 1"


def test_readme_commands_exist_and_match_the_manifests():
    commands = readme_commands("detkd")
    assert {split_command(w)[0] for w in commands} >= {("submit",), ("jobs", "list"), ("jobs", "logs"), ("lineage",)}
    for words in commands:
        check_flags(words, "infra/README.md")
    (submit,) = [w for w in commands if w[1] == "submit"]
    assert (ROOT / submit[2]).is_file(), f"infra/README.md submits {submit[2]}, which the repository lacks"
    cluster = one("RayCluster", "kuberay-cluster.yaml")
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    (address,) = option_values(submit, "--address")
    assert urlsplit(address).port == container_port(head, "dashboard")
    tracking = env(head)["MLFLOW_TRACKING_URI"]["value"]
    assert f"MLFLOW_TRACKING_URI={tracking}" in option_values(submit, "--env"), "submit passes another tracking URI"
    assert option_values(submit, "--set") == option_values(entrypoint(), "--set"), "README and RayJob overrides differ"
    _, server = mlflow_server()
    services = {
        f"svc/{cluster['metadata']['name']}-head-svc": container_port(head, "dashboard"),  # KubeRay's name for it
        f"svc/{service_for(one('Deployment', 'mlflow.yaml')['spec']['template'], 'mlflow.yaml')['metadata']['name']}": (
            int(arg(server, "--port"))
        ),
    }
    for path in [*yaml_files(), INFRA / "README.md"]:  # every documented submit passes the pods' tracking URI
        for found in re.findall(r"--env MLFLOW_TRACKING_URI=(\S+)", path.read_text()):
            assert found == tracking, f"infra/{path.name}: --env MLFLOW_TRACKING_URI={found}, the pods use {tracking}"
    forwards = {w[2]: int(w[3].split(":")[1]) for w in readme_commands("kubectl") if w[1] == "port-forward"}
    assert forwards == services, f"infra/README.md port-forwards {forwards}, the manifests define {services}"
    applied = {w for words in readme_commands("kubectl") for w in words if w.startswith("infra/")}
    for file in applied:
        assert (ROOT / file).is_file(), f"infra/README.md applies {file}, which does not exist"
    mentioned = applied | {f"infra/{SECRETS_EXAMPLE}"}
    assert {f"infra/{f}" for f in manifests()} <= mentioned, "a manifest the guide never applies"


@pytest.mark.parametrize("file", [p.name for p in yaml_files()])
def test_manifest_comments_name_existing_files(file):
    for name in re.findall(r"(?<![\w/])infra/([\w.-]*\w)", (INFRA / file).read_text()):
        assert (INFRA / name).exists(), f"infra/{file} mentions infra/{name}, which does not exist"
