"""Credentials out of what detkd logs: passwords in URIs and secret query parameters become ``***``.

A tracking or storage URI may carry a password (``http://user:pw@host``, ``postgresql://u:pw@db``,
``s3://...?secret_key=...``). Configs are logged as MLflow parameters, tags and JSON artifacts, and
``detkd submit`` puts its command line into Ray job metadata; none of them may hold the password.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^/@:\s]*):(?P<password>[^/@\s]+)@")
_SECRET_QUERY = re.compile(
    r"(?i)(?P<head>[?&;](?:password|passwd|pwd|token|secret|secret_key|access_key|api_key|apikey|sig|signature)=)"
    r"(?P<value>[^&;#\s]+)"
)


def redact(text: str) -> str:
    """``text`` with every URI password and secret query value replaced by ``***``."""
    text = _USERINFO.sub(lambda m: f"{m['head']}:{MASK}@", text)
    return _SECRET_QUERY.sub(lambda m: f"{m['head']}{MASK}", text)


def has_credentials(text: str) -> bool:
    return redact(text) != text


def redact_value(value: Any) -> Any:
    """Strings redacted; dicts, lists and tuples redacted item by item; anything else unchanged."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_value(v) for v in value)
    return value
