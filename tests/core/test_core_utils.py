"""core/provenance, jsonio, device, errors and distributed.merge_shards, in one process."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from mri_vqvae.core import distributed
from mri_vqvae.core.device import DeviceError, resolve_device
from mri_vqvae.core.errors import InvalidImageError, describe_error, innermost_error
from mri_vqvae.core.jsonio import json_ready
from mri_vqvae.core.provenance import (
    describe_device,
    package_versions,
    sha256_file,
    utc_iso,
    utc_stamp,
)


def test_timestamps_are_utc() -> None:
    paris = dt.timezone(dt.timedelta(hours=2))
    assert utc_stamp(dt.datetime(2024, 5, 6, 9, 8, 7, tzinfo=paris)) == "20240506T070807Z"
    assert utc_stamp(dt.datetime(2024, 5, 6, 9, 8, 7)) == "20240506T090807Z"  # naive = UTC
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", utc_iso())


def test_sha256_file_matches_hashlib_across_chunks(tmp_path: Path) -> None:
    blob = np.random.default_rng(0).bytes(3 * 1024 + 17)
    (tmp_path / "f").write_bytes(blob)
    assert sha256_file(tmp_path / "f", chunk=1024) == hashlib.sha256(blob).hexdigest()


def test_versions_and_device_are_named() -> None:
    versions = package_versions(("torch", "no-such-package-xyz"))
    assert versions["torch"] == torch.__version__
    assert versions["no-such-package-xyz"] is None and versions["python"].count(".") == 2
    assert describe_device("cpu") == "cpu"


def test_json_ready_gives_strict_json() -> None:
    value = {1: torch.tensor([1.5, float("nan")]), "a": np.float32("inf"),
             "b": (np.int64(3), torch.tensor(2.0)), "c": np.array([[1, 2]]), "d": -math.inf}
    ready = json_ready(value)
    assert ready == {"1": [1.5, None], "a": None, "b": [3, 2.0], "c": [[1, 2]], "d": None}
    assert json.loads(json.dumps(ready, allow_nan=False)) == ready
    with pytest.raises(TypeError):  # what JSON cannot hold is still refused, not hidden
        json.dumps(json_ready({"p": Path("x")}), allow_nan=False)


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(DeviceError, match="train_vqvae.device='gpu' is not a device"):
        resolve_device("gpu", "train_vqvae.device")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA GPU is visible"):
            resolve_device("cuda")


def test_innermost_error_finds_ours_inside_wrappers() -> None:
    ours = InvalidImageError("a.nii", "empty", "fix it")
    try:
        try:
            raise ours
        except InvalidImageError as exc:
            raise RuntimeError("applying transform") from exc
    except RuntimeError as wrapped:
        assert innermost_error(wrapped) is ours
        assert describe_error(wrapped) == str(ours)
    deep = ValueError("bad\nvalue")
    outer = RuntimeError("wrap")
    outer.__cause__ = deep
    assert innermost_error(outer) is deep and describe_error(outer) == "ValueError: bad value"


def test_merge_shards_concatenates_updates_and_keeps_the_first_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    local = ([1, 2], {"a": 1}, None)
    assert distributed.merge_shards(local) == local  # one process: the same values
    parts = [([1, 2], {"a": 1, "k": 0}, None), ([3], {"b": 2, "k": 1}, "stopped on rank 1"),
             ([], {}, "stopped on rank 2")]
    monkeypatch.setattr(distributed, "all_gather_object", lambda obj: parts)
    merged = distributed.merge_shards(parts[0])
    assert merged == ([1, 2, 3], {"a": 1, "k": 1, "b": 2}, "stopped on rank 1")
