"""Case journals: one fsynced JSON line per finished case, so a killed job keeps its work.

Used where a table must not be rewritten per case (quadratic, racy): encode's
``index.journal`` and the records of a ``--part`` job. Reading skips a line a kill cut short.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import IO, Any


class CaseJournal:
    """Appends case entries (dicts with ``case_id``) to `path`, one fsynced line each; the file
    is opened at the first append."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: IO[str] | None = None

    def append(self, entry: dict[str, Any]) -> None:
        """Write `entry` as one JSON line and make it durable before returning."""
        if self._fh is None:
            self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        self._fh.write(json.dumps(entry) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def read_case_journal(path: Path) -> dict[str, dict[str, Any]]:
    """The entries of a journal by case_id (later lines win); a line cut short is skipped."""
    if not path.is_file():
        return {}
    entries = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            entry = json.loads(line)
            if isinstance(entry, dict) and "case_id" in entry:
                entries[str(entry["case_id"])] = entry
    return entries
