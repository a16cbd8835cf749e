"""Patient identifiers in input headers never reach an output, a manifest or a log."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from tests.support.dicom import write_series
from tests.support.volumes import make_head

SECRETS = (b"Doe", b"Jane", b"SECRET-ID-42", b"John", b"Smith", b"MRN-777")


def _nifti_with_identifiers(path: Path) -> None:
    img = nib.Nifti1Image(make_head(), np.diag([-1.5, 1.5, 1.5, 1.0]))
    img.header["descrip"] = b"John Smith MRN-777"
    img.header["aux_file"] = b"Smith"
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"patient John Smith MRN-777"))
    nib.save(img, str(path))


def _all_bytes(root: Path) -> bytes:
    chunks = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        chunks += [path.name.encode(), gzip.decompress(data) if path.suffix == ".gz" else data]
    return b"\n".join(chunks)


def test_no_identifier_in_outputs_manifest_or_logs(tmp_path: Path) -> None:
    data = tmp_path / "data"
    vol = (make_head((16, 18, 12)) * 10).astype(np.int16)
    write_series(data / "series01", vol, np.diag([1.2, 1.2, 2.0, 1.0]))
    data.joinpath("flat").mkdir()
    _nifti_with_identifiers(data / "flat" / "case02.nii.gz")
    out = tmp_path / "out"
    logs = []
    for args in (
        ["manifest", "build", str(data), "--source-id", "local", "--out", str(out / "m.json")],
        ["preprocess", "--manifest", str(out / "m.json"), "--config", "smoke",
         "--out", str(out / "pre")],
    ):
        proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "-v", *args],
                              capture_output=True, check=False)
        assert proc.returncode == 0, proc.stderr.decode()[-2000:]
        logs += [proc.stdout, proc.stderr]
    written = _all_bytes(out) + b"\n".join(logs)
    assert len(list((out / "pre" / "images").glob("*.nii.gz"))) == 2
    for secret in SECRETS:
        assert secret not in written, f"{secret!r} leaked into an output or a log"
