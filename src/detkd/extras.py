"""The optional extras (pyproject.toml ``[project.optional-dependencies]``) and the one error that says
how to install a missing one, raised before the command that needs it starts any work."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from detkd.config import ConfigError


@dataclass(frozen=True)
class Extra:
    modules: tuple[str, ...]  # top-level modules it provides, as imported
    install: str  # the command that installs it


def _pip(name: str) -> str:
    return f"pip install -c constraints.txt -e '.[{name}]'"


EXTRAS: dict[str, Extra] = {
    "export": Extra(("onnx", "onnxruntime"), _pip("export")),
    "kfp": Extra(("kfp",), _pip("kfp")),
    "optuna": Extra(("optuna",), _pip("optuna")),
    "server": Extra(("psycopg", "boto3"), _pip("server")),
    # mmcv with its compiled ops is built against the installed torch by the script
    "mmdet": Extra(("mmdet", "mmengine", "mmcv"), "bash scripts/install_mmdet.sh"),
    "hf": Extra(("transformers", "safetensors"), _pip("hf")),
}


class MissingExtra(ConfigError):
    """An optional extra that the command needs is not installed (a user error: the CLI prints one line)."""


def missing_extra(extra: str, *, why: str, detail: str = "", cls: type[MissingExtra] = MissingExtra) -> MissingExtra:
    """The error for ``why`` needing ``extra``: names the extra, its modules and the install command."""
    spec = EXTRAS[extra]
    note = f"; {detail}" if detail else ""
    return cls(f"{why} needs the `{extra}` extra ({', '.join(spec.modules)}{note}): {spec.install}")


def require(extra: str, *modules: str, why: str) -> None:
    """Import ``modules`` (default: all of the extra's) or raise MissingExtra before any work starts."""
    for module in modules or EXTRAS[extra].modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise missing_extra(extra, why=why, detail=str(exc)) from None
