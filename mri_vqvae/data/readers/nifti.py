"""NIfTI-1/2 (.nii, .nii.gz) through nibabel, from a path or from bytes already in memory.

From a path (`probe`): nibabel is lazy, `nib.load` reads the header only. `probe` validates that
header (declared size, dims, voxel type, raw voxel size, file length of an uncompressed .nii);
`load` then forces the full voxel read so a truncated file fails here, at load time, not later
inside a transform.

From bytes (`probe_bytes`, used after `mri_vqvae.data.sources.read_verified` has read and hashed the
file once): the header is parsed from the first bytes of the (decompressed) stream with nibabel's
own header classes and the same checks as `nib.load`, then validated exactly like a path. A
``.nii.gz`` is gunzipped in memory in two bounded steps: only the header's bytes first; then, in
`load`, exactly the bytes the validated header declares (at most ``data.max_voxels`` voxels), so a
gzip bomb cannot make it allocate more. Voxels go through nibabel's `ArrayProxy` (scl_slope /
scl_inter, byte order, Fortran order) as in a path read: both paths give identical arrays.
"""

from __future__ import annotations

import io
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.arrayproxy import ArrayProxy
from nibabel.openers import ImageOpener

from mri_vqvae.core.errors import InvalidImageError
from mri_vqvae.data.readers.common import (
    CORRUPT_FIX,
    Header,
    as_volume,
    check_dims,
    check_voxel_size,
    guard,
)

_NIFTI = (nib.Nifti1Image, nib.Nifti2Image)
_HEADER_BYTES = max(nib.Nifti1Header.sizeof_hdr, nib.Nifti2Header.sizeof_hdr)  # 540
_GZIP = 16 + zlib.MAX_WBITS  # zlib wbits for a gzip member
_CHUNK = 1 << 20  # compressed bytes fed, and bytes skipped, per step


def _open(path: Path) -> nib.Nifti1Image:
    with guard(path, "NIfTI"):
        img = nib.load(str(path), mmap=False)
    if not isinstance(img, _NIFTI):
        raise InvalidImageError(
            path, f"holds a {type(img).__name__}, not NIfTI", "convert it to NIfTI (.nii.gz)"
        )
    return img


def _check_length(path: Path, img: nib.Nifti1Image, dims: tuple[int, ...]) -> None:
    """An uncompressed .nii must hold offset + voxels * itemsize bytes (checked from the header)."""
    if not path.name.lower().endswith(".nii"):
        return
    with guard(path, "NIfTI header"):
        needed = int(img.dataobj.offset) + math.prod(dims) * img.get_data_dtype().itemsize
    size = path.stat().st_size
    if size < needed:
        raise InvalidImageError(
            path,
            f"truncated: the header declares {needed:,} bytes, the file has {size:,}",
            CORRUPT_FIX,
        )


def _raw_pixdim(path: Path, header_class: type, block: bytes) -> np.ndarray:
    """pixdim as stored, before nibabel's checks replace 0 by 1 and negatives by their abs."""
    with guard(path, "NIfTI header"):
        raw = header_class(block[: header_class.sizeof_hdr], check=False)
        return np.array(raw["pixdim"], dtype=np.float64)


def _validate(
    path: Path, hdr: nib.Nifti1Header, pixdim: np.ndarray, max_voxels: int
) -> tuple[tuple[int, ...], tuple[int, int, int], np.ndarray]:
    """(declared dims, (X, Y, Z) shape, RAS affine) of a header, or `InvalidImageError`."""
    with guard(path, "NIfTI header"):
        dims = tuple(int(d) for d in hdr.get_data_shape())
        dtype = hdr.get_data_dtype()
        affine = np.array(hdr.get_best_affine(), dtype=np.float64)
    shape = check_dims(path, dims, max_voxels)
    if dtype.fields is not None or not np.issubdtype(dtype, np.number) or dtype.kind == "c":
        raise InvalidImageError(
            path, f"unsupported voxel type {dtype}", "convert it to a real-valued scalar image"
        )
    check_voxel_size(path, pixdim[1:4], "pixdim[1:4]")
    return dims, shape, affine


def probe(path: Path, max_voxels: int) -> Header:
    """Header only: declared (X, Y, Z), RAS affine (nibabel's sform/qform choice), voxel type."""
    img = _open(path)
    with guard(path, "NIfTI header"), ImageOpener(str(path)) as fh:
        block = fh.read(img.header.sizeof_hdr)
    pixdim = _raw_pixdim(path, type(img.header), block)
    dims, shape, _ = _validate(path, img.header, pixdim, max_voxels)
    with guard(path, "NIfTI header"):
        affine = np.array(img.affine, dtype=np.float64)
    _check_length(path, img, dims)
    return Header(shape, affine, source=img)


# --- in memory -----------------------------------------------------------------------------------


def _gunzip(path: Path, blob: bytes, start: int, count: int) -> bytes:
    """Bytes [start, start + count) of the gzip stream `blob` (fewer if it ends first).

    Bounded: output before `start` is discarded in chunks, nothing past `start + count` is
    decompressed, and compressed input is fed a chunk at a time. Concatenated gzip members are
    read in turn, like `gzip.open`.
    """
    view = memoryview(blob)
    pos, skip, got, parts = 0, start, 0, []
    inflater, pending = zlib.decompressobj(_GZIP), b""
    with guard(path, "gzip-compressed NIfTI"):
        while got < count:
            if inflater.eof:  # a member ended: read the next one, if any
                pending = inflater.unused_data
                if (pending + bytes(view[pos : pos + 2]))[:2] != b"\x1f\x8b":
                    break  # trailing bytes after the last member are ignored
                inflater = zlib.decompressobj(_GZIP)
            if not pending:
                if pos >= len(view):
                    break  # input ends inside a member: truncated (the caller reports it)
                pending = bytes(view[pos : pos + _CHUNK])
                pos += len(pending)
            out = inflater.decompress(pending, min(skip, _CHUNK) if skip else count - got)
            pending = inflater.unconsumed_tail
            if skip:
                skip -= len(out)
            else:
                parts.append(out)
                got += len(out)
    return b"".join(parts)


@dataclass(frozen=True)
class _InMemory:
    """What `load` needs to decode voxels from bytes already read (and hashed)."""

    blob: bytes
    gzipped: bool
    dims: tuple[int, ...]
    dtype: np.dtype
    offset: int
    slope: float
    inter: float

    @property
    def nbytes(self) -> int:
        return math.prod(self.dims) * self.dtype.itemsize


def _image_class(path: Path, prefix: bytes) -> type:
    """Nifti1Image or Nifti2Image from the header's magic, as `nib.load` sniffs a .nii."""
    for klass in _NIFTI:
        if klass.header_class.may_contain_header(prefix):
            return klass
    raise InvalidImageError(
        path,
        f"cannot be read as NIfTI (no NIfTI-1 or NIfTI-2 header in its first {len(prefix)} bytes)",
        CORRUPT_FIX,
    )


def probe_bytes(path: Path, blob: bytes, max_voxels: int) -> Header:
    """Like `probe`, from the file's bytes (`path` only names the file and its suffix)."""
    gzipped = path.name.lower().endswith(".gz")
    prefix = _gunzip(path, blob, 0, _HEADER_BYTES) if gzipped else bytes(blob[:_HEADER_BYTES])
    klass = _image_class(path, prefix)
    block = prefix[: klass.header_class.sizeof_hdr]
    pixdim = _raw_pixdim(path, klass.header_class, block)
    with guard(path, "NIfTI header"):  # nib.load's own parse and checks, extensions skipped
        hdr = klass.header_class.from_fileobj(io.BytesIO(block))
    dims, shape, affine = _validate(path, hdr, pixdim, max_voxels)
    with guard(path, "NIfTI header"):
        slope, inter = hdr.get_slope_inter()
        source = _InMemory(
            blob=blob,
            gzipped=gzipped,
            dims=dims,
            dtype=hdr.get_data_dtype(),
            offset=int(hdr.get_data_offset()),
            slope=1.0 if slope is None else slope,
            inter=0.0 if inter is None else inter,
        )
    needed = source.offset + source.nbytes
    if not gzipped and len(blob) < needed:
        raise InvalidImageError(
            path,
            f"truncated: the header declares {needed:,} bytes, the file has {len(blob):,}",
            CORRUPT_FIX,
        )
    return Header(shape, affine, source=source)


def _voxels_from_bytes(path: Path, src: _InMemory) -> np.ndarray:
    if src.gzipped:
        data = _gunzip(path, src.blob, src.offset, src.nbytes)
        if len(data) < src.nbytes:
            raise InvalidImageError(
                path,
                f"truncated: the header declares {src.offset + src.nbytes:,} bytes, the "
                f"decompressed stream holds {src.offset + len(data):,}",
                CORRUPT_FIX,
            )
        fileobj, offset = io.BytesIO(data), 0
    else:
        fileobj, offset = io.BytesIO(src.blob), src.offset
    spec = (src.dims, src.dtype, offset, src.slope, src.inter)
    with guard(path, "NIfTI voxel data"):
        return np.asanyarray(ArrayProxy(fileobj, spec, mmap=False))


def load(path: Path, header: Header) -> np.ndarray:
    """All voxels as (X, Y, Z) float32, scl_slope/scl_inter applied."""
    if isinstance(header.source, _InMemory):
        raw = _voxels_from_bytes(path, header.source)
    else:
        with guard(path, "NIfTI voxel data"):
            raw = np.asanyarray(header.source.dataobj)
    return as_volume(path, raw, header.shape)
