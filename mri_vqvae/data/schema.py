"""Checks on decoded JSON fields, shared by manifests and the sources catalog.

Every check returns the value it accepted or raises `ManifestError` naming where the value sits
(``manifest.json.cases[3] (case 'a').spacing[1]``), what was expected and what was received.
`read_json` decodes a file with integers bounded, so no field check ever sees a huge literal.
Stdlib only.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mri_vqvae.core.errors import ManifestError
from mri_vqvae.data.sources import valid_uid

# Patterns are used with re.fullmatch (``$`` would accept a trailing newline).
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
SHA_RE = re.compile(r"[0-9a-f]{64}")
MAX_INT = 2**63 - 1  # larger sizes and shapes in a manifest are refused
_MAX_INT_DIGITS = 40  # longer JSON integer literals are not even converted


def field_error(where: str, what: str, got: Any, fix: str = "") -> ManifestError:
    """The error for the value `got` at `where`: what was expected, and how to fix it."""
    shown = repr(got)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return ManifestError(f"{where}: {what} (received {shown}){'; ' + fix if fix else ''}")


def check_keys(obj: Any, required: set[str], optional: set[str], where: str) -> None:
    """`obj` is a JSON object with every `required` key and no key outside both sets."""
    if not isinstance(obj, dict):
        raise field_error(where, "expected a JSON object", type(obj).__name__)
    for key in sorted(required - obj.keys()):
        raise field_error(where, f"missing field {key!r}", sorted(obj), "rebuild the manifest")
    extra = sorted(obj.keys() - required - optional)
    if extra:
        raise field_error(where, f"unknown field {extra[0]!r}", extra,
                          f"allowed: {sorted(required)}")


def text(value: Any, where: str, pattern: re.Pattern[str] | None = None) -> str:
    """A non-empty string (matching `pattern` in full when given)."""
    if not isinstance(value, str) or not value or (pattern and not pattern.fullmatch(value)):
        need = f"a string matching {pattern.pattern}" if pattern else "a non-empty string"
        raise field_error(where, f"expected {need}", value)
    return value


def optional_text(value: Any, where: str, pattern: re.Pattern[str] | None = None) -> str | None:
    """None, or a `text`."""
    return None if value is None else text(value, where, pattern)


def optional_uid(value: Any, where: str) -> str | None:
    """None, or a DICOM UID: digits and dots, at most 64 characters."""
    if value is None:
        return None
    if not isinstance(value, str) or not valid_uid(value):
        raise field_error(where, "expected a DICOM UID (digits and dots, at most 64 characters)",
                          value)
    return value


def integer(value: Any, where: str, minimum: int | None = None,
            limit: int | None = MAX_INT) -> int:
    """An int (not a bool) with |value| <= `limit` and value >= `minimum` (when given)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise field_error(where, "expected an integer", value)
    if limit is not None and abs(value) > limit:
        raise field_error(where, f"expected an integer of magnitude <= {limit} "
                          f"({len(str(abs(value)))} digits received)", value,
                          "restore the manifest or rebuild it")
    if minimum is not None and value < minimum:
        raise field_error(where, f"expected an integer >= {minimum}", value)
    return value


def number(value: Any, where: str, positive: bool = False) -> float:
    """A finite non-negative number (> 0 with `positive`) as float."""
    try:
        ok = not isinstance(value, bool) and isinstance(value, (int, float))
        got = float(value) if ok else math.nan
    except OverflowError:
        got = math.inf
    if not math.isfinite(got) or got < 0 or (positive and got == 0):
        kind = "positive" if positive else "non-negative"
        raise field_error(where, f"expected a finite {kind} number", value)
    return got


def triple(value: Any, where: str, item: Callable[[Any, str], Any]) -> tuple[Any, ...]:
    """A list of 3 values, each checked by ``item(value, where)``."""
    if not isinstance(value, list) or len(value) != 3:
        raise field_error(where, "expected a list of 3 numbers", value)
    return tuple(item(v, f"{where}[{i}]") for i, v in enumerate(value))


def choice(value: Any, where: str, allowed: Sequence[Any]) -> Any:
    """One of `allowed` (never a bool standing in for 0 or 1)."""
    if value not in allowed or isinstance(value, bool):
        raise field_error(where, f"expected one of {list(allowed)}", value)
    return value


class _LongInteger:
    """A JSON integer literal too long to convert (Python limits int() to 4300 digits)."""

    def __init__(self, literal: str) -> None:
        self.digits = len(literal.lstrip("-"))

    def __repr__(self) -> str:
        return f"<integer of {self.digits} digits>"


def _json_int(literal: str) -> int | _LongInteger:
    """`json` parse_int hook: long literals become `_LongInteger`, which no field accepts."""
    return int(literal) if len(literal) <= _MAX_INT_DIGITS else _LongInteger(literal)


def read_json(path: Path) -> Any:
    """The decoded JSON of `path`; `ManifestError` for unreadable, non-UTF-8 or invalid JSON."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        return json.loads(raw.decode("utf-8"), parse_int=_json_int)
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ManifestError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
            "restore it from version control or rebuild it"
        ) from None
    except ValueError as exc:  # a number JSON accepts but Python cannot convert
        raise ManifestError(f"{path}: unusable JSON value ({exc}); restore it from version "
                            "control or rebuild it") from None
    except RecursionError:
        raise ManifestError(f"{path}: JSON nested too deeply to be a manifest") from None
