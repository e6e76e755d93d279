"""Which Ray a detkd process uses: the cluster it is pointed at, or a local instance of its own.

An address (``--address``, else ``RAY_ADDRESS``, else the head ``ray start --head`` recorded in
Ray's default temp dir, which ``ray.init()`` would find) is joined with this machine's Ray token:
Ray 2.60 sends it on its own only to a cluster it found itself, not to an address it is given.

Without one, the process starts a private instance that ends with it. A second detkd process starts
its own rather than joining the first one's, which would end (and take the second's runs with it)
when the first driver exits. Several instances on one machine are fine for Ray except where a Ray
process looks for its own cluster without being told: Ray Train's placement-group cleaner, an actor
that finds its API server through ``RAY_ADDRESS`` or else by scanning the machine's processes, and
fails with "Found multiple active Ray instances" as soon as there are two. So the private instance
starts on a GCS port chosen here, with ``RAY_ADDRESS`` naming it in the environment its processes
inherit; the driver's own environment is left as it was (its children still start their own).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import ray

from detkd.config import ConfigError

log = logging.getLogger(__name__)

LOCAL = "local"  # as an address: a private instance even where a `ray start` head is recorded (Ray's own word)


def use_local_token() -> None:
    """Send Ray's token (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``) to the cluster.

    Ray 2.60 clusters started here enable token auth, but a client given an address (``ray.init``,
    the Jobs client) sends the token only when ``RAY_AUTH_MODE=token``. Setting the variable alone is
    not enough once Ray's config is cached in this process, so ask Ray to re-read it (the call
    ``ray.init`` makes for a cluster it found itself). An explicit ``RAY_AUTH_MODE`` is respected.
    """
    if "RAY_AUTH_MODE" in os.environ:
        return
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token auth
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def resolve_address(address: str | None) -> tuple[str | None, str]:
    """(the cluster to join, where that came from); (None, ...) means: start a private instance."""
    if address:
        return (None if address == LOCAL else address), "--address"
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env:
        return (None if env == LOCAL else env), "RAY_ADDRESS"
    recorded = recorded_head()
    if recorded:
        return recorded, f"the head `ray start` recorded in {recorded_head_file()}"
    return None, "a private local instance"


def recorded_head_file() -> Path:
    from ray._common.utils import get_ray_address_file

    return Path(get_ray_address_file(None))


def recorded_head() -> str | None:
    """The GCS address of the last ``ray start --head`` on this machine (Ray's default temp dir), if any."""
    with contextlib.suppress(OSError, ImportError):
        return recorded_head_file().read_text().strip() or None
    return None


def join_ray(address: str, *, source: str = "--address") -> None:
    """Connect this process to the cluster at ``address``, with Ray's local token; ConfigError naming the
    address, where it came from and the cause when it cannot be reached."""
    check_reachable(address, source=source)
    use_local_token()
    try:
        ray.init(address=address, log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        raise _unreachable(address, source, _cause(exc)) from None
    log.info(f"joined the Ray cluster at {address} ({source})")


def check_reachable(address: str, *, source: str, timeout_s: float = 5.0) -> None:
    """Refuse an address nothing answers at within seconds: ``ray.init`` would retry for minutes.

    ``host:port`` and ``ray://host:port`` are checked; an address without a port (``auto``) is left to Ray."""
    scheme, _, rest = address.rpartition("://")
    if scheme and scheme != "ray":
        raise ConfigError(
            f"{address} ({source}): not a Ray cluster address; give the head's GCS address HOST:6379 (or "
            "ray://HOST:10001). An http:// dashboard address is for `detkd submit`"
        )
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise _unreachable(address, source, exc.strerror or str(exc) or type(exc).__name__) from None


def start_local_ray(**init_kwargs) -> str:
    """Start a Ray instance owned by this process (it stops when the process ends); returns its GCS address.

    Its processes (and so Ray Train's cleaner) get ``RAY_ADDRESS`` naming it: they never look for it
    among the machine's other instances. ``init_kwargs`` go to ``ray.init``. A port taken between
    choosing it and the GCS binding it (Ray's "Failed to start GCS") is chosen again."""
    tries = 3
    while True:
        tries -= 1
        address = f"127.0.0.1:{free_port()}"
        try:
            with _environ(RAY_GCS_SERVER_PORT=address.rsplit(":", 1)[1], RAY_ADDRESS=address):
                ray.init(address=LOCAL, **init_kwargs)  # "local": never RAY_ADDRESS, never a recorded head
        except RuntimeError as exc:
            if "Failed to start GCS" not in str(exc) or not tries:
                raise
            log.warning(f"Ray's port {address} was taken before its GCS started; choosing another")
            ray.shutdown()
            continue
        log.info(f"started a private local Ray instance at {address}")
        return address


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """``values`` in os.environ while the block runs (child processes started then inherit them)."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _cause(exc: BaseException) -> str:
    """The innermost message of an exception chain, on one line: Ray wraps the useful one (a traceback's text
    gives its last line, the exception)."""
    text, seen = "", set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc).strip() or text
        exc = exc.__cause__ or exc.__context__
    head, traceback, tail = text.partition("Traceback (most recent call last):")
    if traceback:
        lines = [line.strip() for line in tail.splitlines() if line.strip()]
        text = " ".join(part for part in (head.strip(), lines[-1] if lines else "") if part)
    return text.splitlines()[0] if text else "no answer"


def _unreachable(address: str, source: str, cause: str) -> ConfigError:
    """The error naming the address, where it came from, the cause, and what to do where there is one thing to do."""
    if "InvalidAuthToken" in cause or "AuthenticationError" in cause:
        cause = (
            "it refused this process's Ray token (InvalidAuthToken); give it the cluster's token with RAY_AUTH_TOKEN, "
            "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (`ray get-auth-token` on the head prints it)"
        )
    elif source.startswith("the head"):
        cause += f"; if that head is gone, delete {recorded_head_file()} (or pass --address {LOCAL})"
    return ConfigError(f"cannot reach the Ray cluster at {address} ({source}): {cause}")
