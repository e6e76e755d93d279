"""A real multi-node Ray cluster on this machine for tests: a head that takes no work and worker nodes
joined with ``ray start --address``, each node its own process group with its own temp and spill folders.

Nothing is shared between nodes through a local disk: a node's logs, sockets, session files and spilled
objects are under its own folders, so losing a node (``kill_worker``: SIGKILL to its process group: its
raylet, object store, agents and every worker process of the node) loses what a lost machine loses.
Ray's token auth is on, with a token of the cluster's own (``env``), so ``~/.ray/auth_token`` and any other
Ray instance on the machine are left alone; a driver joins with ``env`` and ``address``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from servers import free_port

RAY = str(Path(sys.executable).with_name("ray"))
# The head declares a node dead after 3 missed health checks 1 s apart (Ray's default: 5 x 3 s), so a lost
# node is noticed within seconds rather than a quarter of a minute.
SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
# `ray start` gives a node 30 s (fixed in Ray) to register with the head's GCS, then exits. On a loaded CI
# machine, or with a port taken between choosing it and binding it, a start can miss that: it is started
# again, with fresh ports, this many times in all.
NODE_STARTS = 3
ALIVE_WORKERS = """
import sys
from ray._raylet import GcsClient
from ray.core.generated.gcs_pb2 import GcsNodeInfo
nodes = GcsClient(address=sys.argv[1]).get_all_node_info(timeout=20, state_filter=GcsNodeInfo.GcsNodeState.ALIVE)
print(sum(1 for node in nodes.values() if not node.is_head_node))
"""


class NodeEnded(RuntimeError):
    """A node's ``ray start`` exited (the message holds its output and its raylet's log)."""

    def __init__(self, node: Node) -> None:
        super().__init__(f"ray node {node.name} ended: {node.log_path.read_text()[-3000:]}{node.raylet_log()}")
        self.name = node.name


@dataclass
class Node:
    name: str
    process: subprocess.Popen
    temp_dir: Path
    log_path: Path

    def kill(self) -> None:
        """SIGKILL the node's process group: a machine lost at once, nothing shut down cleanly."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def raylet_log(self) -> str:
        """The end of this node's raylet log (why it did not register), or nothing."""
        path = self.temp_dir / "session_latest" / "logs" / "raylet.out"
        if not path.is_file():
            return ""
        return f"\n---- {path} ----\n{path.read_text(errors='replace')[-3000:]}"


@dataclass
class Cluster:
    """A head (no CPUs: the driver and Ray Train's controller live there, no training) and worker nodes."""

    root: Path  # the test's folder: node logs
    env: dict[str, str]  # what a driver or a node needs: the token and the Ray Train settings
    address: str = ""  # the head's GCS address, for ``ray.init(address=...)`` / ``--address``
    nodes: dict[str, Node] = field(default_factory=dict)
    temp_dirs: list[Path] = field(default_factory=list)  # every node's, the lost ones' too

    def start_head(self) -> None:
        def head_args() -> list[str]:
            gcs = free_port()
            self.address = f"127.0.0.1:{gcs}"
            # the nodes' processes find their own cluster (Ray Train's placement-group cleaner looks it up, and
            # would otherwise see every Ray instance on this machine)
            self.env["RAY_ADDRESS"] = self.address
            head = ["--head", f"--port={gcs}", "--num-cpus=0", f"--ray-client-server-port={free_port()}"]
            # the dashboard serves the state API, which Ray Train's placement-group cleaner asks about its controller
            head += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={free_port()}"]
            return [*head, f"--system-config={json.dumps(SYSTEM_CONFIG)}"]

        self._start_until_seen("head", head_args, alive=0)

    def start_worker(self, name: str = "worker", *, cpus: int = 2) -> None:
        """Join a worker node (again, after ``kill_worker``) and wait until the head sees it."""
        # every worker node this cluster runs, and no other: a node killed just before is seen dead first
        alive = len([n for n in self.nodes if n != "head"]) + 1
        self._start_until_seen(name, lambda: [f"--address={self.address}", f"--num-cpus={cpus}"], alive=alive)

    def _start_until_seen(self, name: str, args: Callable[[], list[str]], *, alive: int) -> None:
        """Start node ``name`` and wait for ``alive`` worker nodes; a start that exits is tried again."""
        for start in range(1, NODE_STARTS + 1):
            self._start(name, args())
            try:
                self.wait_for(alive=alive)
                return
            except NodeEnded as ended:
                if ended.name != name or start == NODE_STARTS:
                    raise
                print(f"clusters: start {start} of node {name} failed, starting it again: {ended}", file=sys.stderr)
                self.nodes.pop(name).kill()

    def kill_worker(self, name: str = "worker") -> None:
        self.nodes.pop(name).kill()

    def _start(self, name: str, args: list[str]) -> None:
        # short: Ray's socket paths under the temp dir have a length limit
        temp_dir = Path(tempfile.mkdtemp(prefix=f"rn-{name[:6]}-", dir="/tmp"))
        self.temp_dirs.append(temp_dir)
        spill = temp_dir / "spill"
        spill.mkdir()
        command = [
            RAY,
            "start",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={temp_dir}",
            f"--object-spilling-directory={spill}",
            "--object-store-memory=100000000",
            # every node on this machine needs ports of its own (and other Ray instances hold the defaults)
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            *args,
        ]
        log_path = self.root / f"ray-{name}.log"
        with open(log_path, "a") as log:
            process = subprocess.Popen(
                command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.nodes[name] = Node(name, process, temp_dir, log_path)

    def alive_workers(self) -> int:
        """How many worker nodes the head's GCS holds alive (the head itself not counted)."""
        done = subprocess.run(
            [sys.executable, "-c", ALIVE_WORKERS, self.address],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"cannot list the nodes of {self.address}: {done.stderr[-2000:]}")
        return int(done.stdout.split()[-1])

    def wait_for(self, *, alive: int, wait_s: float = 120) -> None:
        deadline = time.monotonic() + wait_s
        while True:
            dead = [n for n in self.nodes.values() if n.process.poll() is not None]
            if dead:
                raise NodeEnded(dead[0])
            try:
                if self.alive_workers() == alive:
                    return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.address}: expected {alive} alive worker nodes")
            time.sleep(1)

    def stop(self) -> None:
        for name in list(self.nodes):  # workers before the head
            if name != "head":
                self.nodes.pop(name).kill()
        if "head" in self.nodes:
            self.nodes.pop("head").kill()

    def cleanup(self) -> None:
        for path in self.temp_dirs:
            shutil.rmtree(path, ignore_errors=True)


def cluster_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the cluster's nodes and drivers: token auth with a token of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_TOKEN"))}
    env.update(
        {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(16),
            "RAY_TRAIN_V2_ENABLED": "1",
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": env.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25"),
        }
    )
    env.update(extra or {})
    return env


@contextlib.contextmanager
def two_node_cluster(root: Path, *, worker_cpus: int = 2, env: dict[str, str] | None = None) -> Iterator[Cluster]:
    """A head with no CPUs and one worker node (``worker``) with ``worker_cpus``, stopped (SIGKILL) at the end."""
    cluster = Cluster(root=root, env=cluster_env(env))
    try:
        cluster.start_head()
        cluster.start_worker(cpus=worker_cpus)
        yield cluster
    finally:
        cluster.stop()
        cluster.cleanup()
