"""Which bytes make up an image, confined to the data root, hashed while read.

An image is one of: a plain file (NIfTI, attached NRRD, MetaImage with ``LOCAL`` data ...); a
header with detached data (``.mhd`` / ``.nhdr``, or an ``.mha`` / ``.nrrd`` naming a data file);
a DICOM series folder (all its member files, or those of one ``SeriesInstanceUID``). Every
function here works on the list `source_files` returns, so what is checked, hashed and read is
the same set of files. Stdlib only; pydicom is imported lazily for DICOM headers.

Digests: a plain file -> sha256 of its bytes; anything else -> sha256 of the lines
``name NUL sha256(file) LF``, names relative to the folder (series, in name order) or to the
header's folder (header first, then its data files in the order the header lists them).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from mri_vqvae.core.errors import ManifestError
from mri_vqvae.data import formats

MAX_HEADER_BYTES = 1 << 20
MAX_DATA_FILES = 100_000
VERIFY_FIX = (
    "run `mri-vqvae manifest verify MANIFEST` to list every changed case, then restore the "
    "file(s) or rebuild the manifest with `mri-vqvae manifest build`"
)
_CHUNK = 1 << 20
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_RAW_DICOM_STARTS = (b"\x08\x00", b"\x00\x08", b"\x02\x00", b"\x00\x02")  # group 0008 / 0002
_TAGS = ("SeriesInstanceUID", "SeriesNumber", "NumberOfFrames", "ImageType",
         "PerFrameFunctionalGroupsSequence")
_KINDS = {stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket", stat.S_IFCHR: "character device",
          stat.S_IFBLK: "block device", stat.S_IFDIR: "folder"}


# --- file kinds -----------------------------------------------------------------------------


def irregular_kind(path: Path) -> str | None:
    """None for a regular file (symlinks followed), else what it is ("fifo", "socket" ...).

    Uses ``os.stat`` only: nothing is opened, so a FIFO cannot block.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if os.path.islink(path):
            return "broken symlink or symlink loop"
        return f"unreadable ({exc.strerror or exc})"
    except (RuntimeError, ValueError) as exc:  # symlink loop, NUL in the name
        return f"unreadable ({exc})"
    return None if stat.S_ISREG(mode) else _KINDS.get(stat.S_IFMT(mode), "special file")


def _open(path: Path) -> BinaryIO:
    """Open a regular file for reading; never blocks on a FIFO (O_NONBLOCK, then fstat)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read ({exc.strerror or exc}); check that it "
                            "exists and is readable") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = _KINDS.get(stat.S_IFMT(mode), "special file")
        raise ManifestError(f"{path}: not a regular file ({kind}); images must be regular "
                            "files: replace it with the image file")
    return os.fdopen(fd, "rb")


def _head(path: Path, size: int) -> bytes:
    with _open(path) as fh:
        return fh.read(size)


# --- DICOM headers --------------------------------------------------------------------------


@dataclass(frozen=True)
class DicomTags:
    """What scanning needs from one DICOM header.

    volume: True when the file holds a whole volume on its own (enhanced multi-frame or mosaic).
    """

    series_uid: str | None
    series_number: str | None
    volume: bool


def _bare(name: str) -> bool:
    """No extension, or a numeric one as in UID-named files (``1.2.840.113619.2.55``)."""
    suffix = Path(name).suffix
    return not suffix or suffix[1:].isdigit()


def is_dicom(path: Path) -> bool:
    """True for a regular file that is DICOM: "DICM" at byte 128, a .dcm/.ima name, or (for
    names without extension) a raw dataset pydicom parses into an image header with pixel data.
    """
    if irregular_kind(path) is not None:
        return False
    try:
        head = _head(path, 132)
    except ManifestError:
        return False
    if head[128:132] == b"DICM" or formats.has_dicom_suffix(path.name):
        return True
    if not _bare(path.name) or head[:2] not in _RAW_DICOM_STARTS:
        return False
    ds = _dcmread(path, defer_size=1024)
    return ds is not None and ("SOPClassUID" in ds or "ImageType" in ds) and any(
        t in ds for t in _PIXEL_TAGS)


def _dcmread(path: Path, **kwargs: Any) -> Any:
    """pydicom dataset of `path` (force=True), or None when it does not parse."""
    import pydicom

    if irregular_kind(path) is not None:
        return None
    try:
        return pydicom.dcmread(str(path), force=True, **kwargs)
    except Exception:  # any malformed header: not usable DICOM
        return None


def dicom_tags(path: Path) -> DicomTags | None:
    """Series uid, number and whole-volume flag of a DICOM file; None when unparseable.

    Cached per (path, inode, size, mtime): scans and verifies ask once per file, not per series.
    """
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return _dicom_tags(str(path), st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=1 << 16)
def _dicom_tags(path: str, inode: int, size: int, mtime_ns: int) -> DicomTags | None:
    ds = _dcmread(Path(path), stop_before_pixels=True, specific_tags=list(_TAGS))
    if ds is None:
        return None
    try:
        uid = str(ds.get("SeriesInstanceUID") or "").strip().rstrip("\0") or None
        number = str(ds.get("SeriesNumber") or "").strip() or None
        frames = int(ds.get("NumberOfFrames") or 1)
        image_type = ds.get("ImageType") or []
        types = [image_type] if isinstance(image_type, str) else list(image_type)
    except Exception:  # odd values: treat like an unreadable header
        return None
    mosaic = any("MOSAIC" in str(t).upper() for t in types)
    volume = frames > 1 or "PerFrameFunctionalGroupsSequence" in ds or mosaic
    return DicomTags(uid, number, volume)


# --- which files ----------------------------------------------------------------------------


def _folder_files(folder: Path) -> list[Path]:
    """Direct, non-hidden, regular files of `folder` that are not image files, by name."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".")
                  and not formats.image_suffix(p.name) and irregular_kind(p) is None)


def _header_lines(path: Path) -> list[str]:
    """Text lines of an image header (at most MAX_HEADER_BYTES; binary data after it ignored)."""
    raw = _head(path, MAX_HEADER_BYTES)
    return raw.decode("utf-8", "surrogateescape").splitlines()


def _pattern_files(path: Path, tokens: list[str]) -> list[str]:
    """``fmt min max step``: printf-style names (MetaImage and NRRD file patterns)."""
    try:
        lo, hi, step = (int(t) for t in tokens[1:4])
        count = len(range(lo, hi + (1 if step > 0 else -1), step))
        if count > MAX_DATA_FILES:
            raise ValueError(f"{count} files")
        return [tokens[0] % i for i in range(lo, hi + (1 if step > 0 else -1), step)]
    except (ValueError, TypeError, IndexError) as exc:
        raise ManifestError(
            f"{path}: unsupported data file pattern {' '.join(tokens)!r} ({exc}); use one data "
            f"file, or a list with at most {MAX_DATA_FILES} files"
        ) from None


def _data_names(path: Path, value: str, rest: list[str]) -> list[str]:
    """Data file names from a data-file field `value`; `rest`: the header lines after it."""
    tokens = value.split()
    if not tokens:
        raise ManifestError(f"{path}: empty data file field; name the data file in the header")
    if tokens[0].upper() == "LOCAL":
        return []
    if tokens[0].upper() == "LIST":
        names = [n for line in rest for n in line.split()]
        if not names:
            raise ManifestError(f"{path}: data file LIST names no file; list the data files "
                                "one per line after it")
        return names
    if "%" in tokens[0] and len(tokens) >= 4:
        return _pattern_files(path, tokens)
    return [value.strip()]


def _metaimage_data(path: Path) -> list[str] | None:
    lines = _header_lines(path)
    for i, line in enumerate(lines):
        key, sep, value = line.partition("=")
        if sep and key.strip().lower() == "elementdatafile":
            return _data_names(path, value, lines[i + 1:])
    return None


def _nrrd_data(path: Path) -> list[str] | None:
    lines = _header_lines(path)
    for i, line in enumerate(lines):
        if not line.strip():  # a blank line ends the header
            return None
        key, sep, value = line.partition(":")
        if sep and not value.startswith("=") and key.strip().lower() in ("data file", "datafile"):
            return _data_names(path, value, lines[i + 1:])
    return None


def _header_files(path: Path) -> list[Path]:
    """[header, data files...] of a MetaImage / NRRD header (just [header] for inline data)."""
    metaimage = formats.is_metaimage(path.name)
    names = _metaimage_data(path) if metaimage else _nrrd_data(path)
    if names is None and formats.is_detached(path.name):
        field = "ElementDataFile" if metaimage else "data file"
        raise ManifestError(f"{path}: detached header without a {field!r} field, so its data "
                            "is unknown; add the field or convert the image to one file")
    return [path, *(path.parent / n for n in names or [])]


def source_files(path: Path, series_uid: str | None = None) -> list[Path]:
    """The files whose bytes form the image at `path` (a file or a DICOM series folder).

    A plain file -> [path]; a .mhd/.nhdr (or .mha/.nrrd naming a data file) -> [header, data
    files in header order]; a folder -> its direct, non-hidden, regular, non-image files by name;
    with `series_uid`, only the classic slices (not multi-frame or mosaic files) whose
    SeriesInstanceUID it is. A missing path -> [path].
    """
    path = Path(path)
    if path.is_dir():
        files = _folder_files(path)
        if series_uid is None:
            return files
        return [f for f in files if (t := dicom_tags(f)) is not None
                and t.series_uid == series_uid and not t.volume]
    if formats.is_itk(path.name) and irregular_kind(path) is None:
        return _header_files(path)
    return [path]


def _real(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError) as exc:  # symlink loop
        raise ManifestError(f"{path}: cannot resolve the path ({exc}); remove the symlink "
                            "loop") from None


def _confine(path: Path, files: Iterable[Path], root: Path) -> None:
    base = _real(Path(root))
    for f in [path, *files]:
        real = _real(f)
        if not real.is_relative_to(base):
            raise ManifestError(
                f"{f} resolves to {real}, outside the data root {base} (a symlink or a '..' in "
                "a header's data file); copy the data inside the data root, or make the root "
                "a folder that holds it"
            )


def check_confined(path: Path, root: Path, series_uid: str | None = None) -> None:
    """Raise `ManifestError` unless `path` and every file of its image resolve inside `root`.

    Symlinks are resolved everywhere along each path (linked folders too).
    """
    _confine(Path(path), source_files(path, series_uid), root)


# --- hashing --------------------------------------------------------------------------------


def _hash_stream(fh: BinaryIO, keep: bool) -> tuple[str, int, bytes]:
    h, total, parts = hashlib.sha256(), 0, []
    while block := fh.read(_CHUNK):
        h.update(block)
        total += len(block)
        if keep:
            parts.append(block)
    return h.hexdigest(), total, b"".join(parts)


def _digest(path: Path, files: list[Path], keep: bool) -> tuple[str, int, dict[Path, bytes]]:
    """(digest, bytes, contents if `keep`) of the image at `path` made of `files`."""
    path = Path(path)
    if files == [path] and not path.is_dir():
        with _open(path) as fh:
            digest, total, data = _hash_stream(fh, keep)
        return digest, total, {path: data} if keep else {}
    base = path if path.is_dir() else path.parent
    h, total, out = hashlib.sha256(), 0, {}
    for f in files:
        with _open(f) as fh:
            digest, size, data = _hash_stream(fh, keep)
        h.update(f"{os.path.relpath(f, base)}\0{digest}\n".encode("utf-8", "surrogateescape"))
        total += size
        if keep:
            out[f] = data
    return h.hexdigest(), total, out


def sha256_sources(path: Path, series_uid: str | None = None) -> tuple[str, int]:
    """(sha256 hex digest, total bytes) of the image at `path` (see the module docstring)."""
    digest, total, _ = _digest(Path(path), source_files(path, series_uid), keep=False)
    return digest, total


def total_bytes(path: Path, series_uid: str | None = None) -> int:
    """Sum of the sizes of the image's source files (stat only, nothing is read)."""
    return sum(f.stat().st_size for f in source_files(path, series_uid))


def read_verified(
    path: Path, root: Path, sha256: str, series_uid: str | None = None
) -> dict[Path, bytes]:
    """Bytes of every source file of the image, read once, confined to `root` and checked
    against the manifest's `sha256`; {file path: bytes} in `source_files` order.
    """
    path = Path(path)
    files = source_files(path, series_uid)
    _confine(path, files, root)
    if path.is_dir() and not files:
        what = f"no file of series {series_uid}" if series_uid else "no files"
        raise ManifestError(f"{path}: folder holds {what}; {VERIFY_FIX}")
    digest, _, data = _digest(path, files, keep=True)
    if digest != sha256:
        named = path if len(files) == 1 else f"{path} ({len(files)} files)"
        raise ManifestError(
            f"{named}: sha256 {digest[:12]}... does not match the manifest's {sha256[:12]}...: "
            f"the image changed since the manifest was built; {VERIFY_FIX}"
        )
    return data


def referenced_data(headers: Iterable[Path]) -> set[Path]:
    """Data files (normalised paths) named by the image `headers` (unreadable ones skipped)."""
    out: set[Path] = set()
    for f in headers:
        if formats.is_itk(f.name) and irregular_kind(f) is None:
            try:
                out.update(Path(os.path.normpath(d)) for d in _header_files(f)[1:])
            except ManifestError:
                continue
    return out


_UID_RE = re.compile(r"[0-9]+(?:\.[0-9]+)*")


def valid_uid(uid: str) -> bool:
    """A DICOM UID: digits and dots, at most 64 characters, no empty component."""
    return len(uid) <= 64 and _UID_RE.fullmatch(uid) is not None
