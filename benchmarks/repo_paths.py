"""Commands and paths as the results files record them: relative to the repository root.

A results file says how it was made, and it must read the same on every machine: a path inside the
repository is written relative to its root (``runs/quickstart``, ``benchmarks/results``) whatever the
working directory was, and a path outside it (a scratch folder) is written as
``<outside the repository>/NAME``, never as the machine's absolute path. The benchmarks import this
module by name (their folder is on ``sys.path`` when they run).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
OUTSIDE = "<outside the repository>"


def repo_path(path: str | os.PathLike[str]) -> str:
    """``path`` (absolute, or relative to the working directory) relative to the repository root."""
    absolute = Path(os.path.normpath(Path.cwd() / Path(path)))
    try:
        relative = absolute.relative_to(REPO_ROOT)
    except ValueError:
        return f"{OUTSIDE}/{absolute.name}"
    return relative.as_posix() or "."


def _looks_like_path(token: str) -> bool:
    if token.startswith("/"):
        return True
    # a relative path typed in another working directory than the repository root
    return Path.cwd() != REPO_ROOT and ("/" in token or Path(token).exists()) and not token.startswith("-")


def _record_token(token: str) -> str:
    if token.startswith("-") and "=" in token:  # --out=/tmp/x
        flag, value = token.split("=", 1)
        return f"{flag}={repo_path(value)}" if _looks_like_path(value) else token
    if "=" in token and not token.startswith("-"):  # a dotted override: workdir=/tmp/x
        key, value = token.split("=", 1)
        return f"{key}={repo_path(value)}" if value.startswith("/") else token
    return repo_path(token) if _looks_like_path(token) else token


def repo_command(argv: list[str] | None = None) -> str:
    """The command that ran, as ``python benchmarks/NAME.py ...`` with its paths relative to the repository."""
    argv = list(sys.argv if argv is None else argv)
    script = repo_path(argv[0]) if argv else ""
    return " ".join(["python", script, *(_record_token(token) for token in argv[1:])])
