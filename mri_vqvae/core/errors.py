"""Errors a user can cause. Each message says what, where, what was received and how to fix it."""

from __future__ import annotations

from pathlib import Path


class MriVqvaeError(Exception):
    """Base class of every error this project raises on purpose."""


class InvalidImageError(MriVqvaeError):
    """An input image that cannot be trusted: names the file, the problem and the fix."""

    def __init__(self, path: str | Path, problem: str, fix: str) -> None:
        self.path = str(path)
        self.problem = problem
        self.fix = fix
        super().__init__(f"{self.path}: {problem}. {fix}")


class ManifestError(MriVqvaeError):
    """A dataset manifest that is malformed, leaks subjects or points at the wrong files."""


class ConfigError(MriVqvaeError):
    """A configuration file or override that does not validate."""


class CheckpointError(MriVqvaeError):
    """A checkpoint that is missing, corrupted or unsafe to load."""


class DownloadError(MriVqvaeError):
    """A download that failed or whose checksum does not match."""


class EvaluationError(MriVqvaeError, ValueError):
    """An evaluation request that would not measure held-out data (says what and how to fix)."""


def innermost_error(exc: BaseException) -> BaseException:
    """The project's own error inside wrappers (MONAI wraps a reader's error in RuntimeError),
    else the deepest ``__cause__``."""
    while exc.__cause__ is not None and not isinstance(exc, MriVqvaeError):
        exc = exc.__cause__
    return exc


def describe_error(exc: BaseException) -> str:
    """One line naming `innermost_error(exc)`: its message, with its type unless it is ours."""
    inner = innermost_error(exc)
    text = str(inner) if isinstance(inner, MriVqvaeError) else f"{type(inner).__name__}: {inner}"
    return text.replace("\n", " ")


def listed(names: list[str] | tuple[str, ...], most: int = 10) -> str:
    """Up to `most` names for a message or log line, with how many more: "['a', 'b'] (+3 more)"."""
    more = f" (+{len(names) - most} more)" if len(names) > most else ""
    return f"{list(names[:most])}{more}"
