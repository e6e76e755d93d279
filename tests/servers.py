"""Real server processes on 127.0.0.1 for tests: any server (``serving``), an S3-compatible server (moto's
server mode) and PostgreSQL.

Both are processes of their own, reached over TCP like the services in infra/ (MinIO/S3, PostgreSQL);
nothing is mocked in the test process. PostgreSQL is the OS package (``.ci/run`` installs it when
its server binaries are missing); as root, its server runs as the ``postgres`` user, as it must.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serving(command: list[str], *, ready_url: str, log_path: Path, env: dict | None = None, wait_s: float = 180):
    """Run a server process until the block ends; it must answer ``ready_url`` within ``wait_s``."""
    import subprocess
    import time
    import urllib.request

    with open(log_path, "w") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    with urllib.request.urlopen(ready_url, timeout=2):
                        break
                except OSError as exc:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"{command[:3]} did not come up: {log_path.read_text()[-3000:]}") from exc
                    time.sleep(0.5)
            yield server
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()


S3_KEYS = {"AWS_ACCESS_KEY_ID": "detkd-test", "AWS_SECRET_ACCESS_KEY": "detkd-test-secret"}


class S3Server(NamedTuple):
    endpoint: str
    env: dict[str, str]  # what a client (boto3, pyarrow, MLflow) needs to reach it
    process: subprocess.Popen | None = None  # the server (a fault test stops and continues it)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", **_lower(S3_KEYS))

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]


def _lower(keys: dict[str, str]) -> dict[str, str]:
    return {"aws_access_key_id": keys["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": keys["AWS_SECRET_ACCESS_KEY"]}


@contextlib.contextmanager
def s3_server(root: Path, *, buckets: tuple[str, ...]) -> Iterator[S3Server]:
    """``python -m moto.server`` on a free port with ``buckets`` created."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {**os.environ, **S3_KEYS, "AWS_DEFAULT_REGION": "us-east-1"}
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with serving(command, ready_url=f"{endpoint}/moto-api/", log_path=root / "s3.log", env=env, wait_s=60) as process:
        server = S3Server(
            endpoint,
            {
                **S3_KEYS,
                "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": endpoint,
                "MLFLOW_S3_ENDPOINT_URL": endpoint,
            },
            process,
        )
        for bucket in buckets:
            server.client().create_bucket(Bucket=bucket)
        yield server


def postgres_bindir() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(candidates[-1]).parent if candidates else None


class Postgres(NamedTuple):
    uri: str  # postgresql://USER:PASSWORD@127.0.0.1:PORT/DB
    password: str


@contextlib.contextmanager
def postgres_server(database: str = "mlflow") -> Iterator[Postgres]:
    """A throwaway PostgreSQL cluster (password authentication) on a free port of 127.0.0.1."""
    bindir = postgres_bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL server binaries (initdb) not found: install the OS package `postgresql`")
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="detkd-pg-"))  # not under pytest's root-only folder: postgres must enter
    password = secrets.token_hex(8)
    (root / "pw").write_text(password + "\n")
    if as_postgres:
        os.chmod(root, 0o755)
        shutil.chown(root, "postgres")
        shutil.chown(root / "pw", "postgres")
    port = free_port()
    data, log = root / "data", root / "server.log"

    def run(*command: str, **kwargs) -> None:
        subprocess.run([*as_postgres, *command], check=True, capture_output=True, **kwargs)

    run(str(bindir / "initdb"), "-D", str(data), "-U", "detkd", "--auth=scram-sha-256", f"--pwfile={root / 'pw'}")
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
    run(str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log), "-w", "start")
    try:
        env = {**os.environ, "PGPASSWORD": password}
        run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "detkd", database, env=env)
        yield Postgres(f"postgresql://detkd:{password}@127.0.0.1:{port}/{database}", password)
    finally:
        subprocess.run([*as_postgres, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"], check=False)
        shutil.rmtree(root, ignore_errors=True)


class TcpProxy:
    """A TCP forwarder on 127.0.0.1 in front of a server: ``stop()`` closes its port and cuts every open
    connection (clients meet refused and reset connections, as from a server that was stopped), ``start()``
    opens the same port again. The server behind keeps its state: a store that restarts with its data."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            sockets, self._open = list(self._open), set()
        for sock in sockets:
            _close(sock)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # stopped
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open.update((client, upstream))
            threading.Thread(target=self._forward, args=(client, upstream), daemon=True).start()

    def _forward(self, client: socket.socket, upstream: socket.socket) -> None:
        back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
        back.start()
        _pump(client, upstream)
        back.join()
        with self._lock:
            self._open.difference_update((client, upstream))
        _close(client)
        _close(upstream)


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """Copy until ``source`` ends, then end ``sink``'s writing side."""
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
