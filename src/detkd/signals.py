"""SIGTERM (a cluster preempting the pod, ``kill``) ends a command as Ctrl-C does: the MLflow run is marked
KILLED, Ray Train's run stops with its checkpoints kept, the local Ray this process started is shut down at
exit, and the command says how to resume.

``ray.init`` replaces any SIGTERM handler with its own (``sys.exit(15)``, after a stack dump from Ray's C++
core), so the handler is installed again once Ray is up (``engine.launch.fit``)."""

from __future__ import annotations

import signal
import threading


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM. Code that turns interrupts into a plain
    KeyboardInterrupt (Ray's ``ray.get`` does) loses the type: :func:`sigterm_received` still tells."""


_received: list[int] = []


def _terminate(signum, frame) -> None:
    _received.append(signum)
    raise Terminated()


def sigterm_received() -> bool:
    """Whether this process was sent SIGTERM since the handler was installed."""
    return bool(_received)


def terminate_on_sigterm() -> None:
    """From now on SIGTERM raises :class:`Terminated` in the main thread (nothing happens in other threads,
    where Python cannot set signal handlers)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
