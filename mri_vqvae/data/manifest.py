"""Dataset manifests: which files, from which source, in which split, with which checksums.

Stdlib only, so manifests can be built and checked without torch. A `Manifest` lists
`mri_vqvae.data.case.Case`s (one image volume each) under one data root; its `digest` identifies
the content and is what a run records. This module owns the JSON document: writing it, reading
and validating it, and listing every problem of a manifest (`verify_manifest`). Splits are in
`mri_vqvae.data.splits`, merging in `mri_vqvae.data.merge`, building from folders in
`mri_vqvae.data.scan`, the sources catalog in `mri_vqvae.data.catalog`. See
``data_manifests/README.md``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mri_vqvae.core.atomic import atomic_write_text
from mri_vqvae.core.errors import ManifestError
from mri_vqvae.data import checks, schema
from mri_vqvae.data.case import (
    ANNOTATION_FIELDS,
    MASKS,
    SPLITS,
    Case,
    Problem,
    mask_fields,
    parse_case,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Manifest:
    """A named collection of cases under one resolved data root."""

    name: str
    cases: tuple[Case, ...]
    split_seed: int | None = None
    split_fractions: Mapping[str, float] | None = None
    data_root: Path = Path(".")
    notes: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "cases", tuple(self.cases))
        object.__setattr__(self, "data_root", Path(self.data_root).resolve())
        if self.split_fractions is not None:
            fractions = {k: float(v) for k, v in self.split_fractions.items()}
            object.__setattr__(self, "split_fractions", fractions)

    @property
    def frozen(self) -> bool:
        """True once every case has a split: re-splitting then needs ``force=True``."""
        return bool(self.cases) and all(c.split is not None for c in self.cases)

    @property
    def digest(self) -> str:
        """sha256 of the canonical JSON content (everything but ``data_root`` and ``digest``)."""
        return content_digest(_content(self))

    @property
    def unannotated_digest(self) -> str:
        """The digest without the cases' annotations (`ANNOTATION_FIELDS`): what a run trained
        on this manifest before its lesion masks were recorded has as its digest."""
        return self._digest_without(ANNOTATION_FIELDS)

    def _digest_without(self, fields: Sequence[str]) -> str:
        bare = [dataclasses.replace(c, **dict.fromkeys(fields)) for c in self.cases]
        return content_digest(_content(dataclasses.replace(self, cases=tuple(bare))))

    def matches(self, digest: str) -> bool:
        """Whether a run that recorded `digest` used these cases and splits (annotations, which
        train nothing, may have been added since: the lesion and brain masks, or the brain masks
        after the lesion masks)."""
        return digest in (self.digest, self.unannotated_digest,
                          self._digest_without(mask_fields("brain_mask")))

    def split_counts(self) -> dict[str, int]:
        """Number of cases per split ("none" for unassigned)."""
        return dict(Counter(c.split or "none" for c in self.cases))


def with_annotations(manifest: Manifest, source: Manifest) -> Manifest:
    """`manifest` with each annotation mask (lesion, brain) that a case lacks copied from the
    same case of `source` (same case_id and image sha256; paths relative to the data root, so
    both must share it). Cases, splits and the unannotated digest stay as they were."""
    same = {(c.case_id, c.sha256): c for c in source.cases}
    cases = []
    for case in manifest.cases:
        other = same.get((case.case_id, case.sha256))
        if other is not None:
            added = {f: getattr(other, f) for name in MASKS if getattr(case, name) is None
                     for f in mask_fields(name)}
            case = dataclasses.replace(case, **added)
        cases.append(case)
    return dataclasses.replace(manifest, cases=tuple(cases))


def content_digest(document: Mapping[str, Any]) -> str:
    """sha256 of canonical JSON (sorted keys, compact) of a manifest document.

    ``digest`` and ``data_root`` are left out: moving the data does not change the dataset.
    """
    content = {k: v for k, v in document.items() if k not in ("digest", "data_root")}
    canon = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


# --- writing --------------------------------------------------------------------------------


def _content(m: Manifest) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "name": m.name,
        "notes": m.notes,
        "split": {
            "seed": m.split_seed,
            "fractions": None if m.split_fractions is None else dict(m.split_fractions),
            "frozen": m.frozen,
        },
        "cases": [c.to_dict() for c in m.cases],
    }


def to_document(manifest: Manifest, manifest_dir: str | Path | None = None) -> dict[str, Any]:
    """The on-disk JSON document; ``data_root`` is relative to `manifest_dir` when given."""
    root = manifest.data_root
    if manifest_dir is not None:
        try:
            root_text = Path(os.path.relpath(root, Path(manifest_dir).resolve())).as_posix()
        except ValueError:  # another drive
            root_text = root.as_posix()
    else:
        root_text = root.as_posix()
    doc = {"schema_version": SCHEMA_VERSION, "name": manifest.name, "data_root": root_text}
    doc.update({k: v for k, v in _content(manifest).items() if k not in doc})
    doc["digest"] = manifest.digest
    return doc


def _dumps(doc: Mapping[str, Any]) -> str:
    """Pretty JSON with one line per case (readable diffs)."""
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in doc.items() if k != "cases"]
    cases = ",\n".join(f"    {json.dumps(c)}" for c in doc["cases"])
    lines.insert(len(lines) - 1, f'  "cases": [\n{cases}\n  ]' if cases else '  "cases": []')
    return "{\n" + ",\n".join(lines) + "\n}\n"


def write_manifest(manifest: Manifest, path: str | Path) -> str:
    """Validate and write `manifest` atomically as JSON; returns its digest."""
    path = Path(path)
    checks.raise_if(checks.structure_problems(manifest.cases), f"refusing to write {path}")
    doc = to_document(manifest, path.parent)
    atomic_write_text(path, _dumps(doc))
    log.info("wrote manifest %s (%d cases, digest %s)", path, len(manifest.cases), doc["digest"])
    return str(doc["digest"])


# --- reading --------------------------------------------------------------------------------


def _parse_split(obj: Any, where: str) -> tuple[int | None, dict[str, float] | None, bool]:
    schema.check_keys(obj, {"seed", "fractions", "frozen"}, set(), where)
    seed = None if obj["seed"] is None else schema.integer(obj["seed"], f"{where}.seed", limit=None)
    fractions = obj["fractions"]
    if fractions is not None:
        schema.check_keys(fractions, set(), set(SPLITS), f"{where}.fractions")
        fractions = {k: schema.number(v, f"{where}.fractions.{k}") for k, v in fractions.items()}
    frozen = obj["frozen"]
    if not isinstance(frozen, bool):
        raise schema.field_error(f"{where}.frozen", "expected true or false", frozen)
    return seed, fractions, frozen


def _parse_document(doc: Any, where: str, base: Path) -> tuple[Manifest, str, bool]:
    """(manifest, stored digest, stored frozen flag) from a decoded JSON document."""
    top = {"schema_version", "name", "data_root", "split", "cases", "digest"}
    schema.check_keys(doc, top, {"notes"}, where)
    version = doc["schema_version"]
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise schema.field_error(f"{where}.schema_version", f"expected {SCHEMA_VERSION}", version,
                                 "this file was written by another version of mri-vqvae")
    name = schema.text(doc["name"], f"{where}.name")
    root_text = schema.text(doc["data_root"], f"{where}.data_root")
    if "\0" in root_text:
        raise schema.field_error(f"{where}.data_root", "NUL character in the path", root_text)
    notes = doc.get("notes", "")
    if not isinstance(notes, str):
        raise schema.field_error(f"{where}.notes", "expected a string", notes)
    seed, fractions, frozen = _parse_split(doc["split"], f"{where}.split")
    if not isinstance(doc["cases"], list):
        raise schema.field_error(f"{where}.cases", "expected a list", type(doc["cases"]).__name__)
    cases = [parse_case(c, f"{where}.cases[{i}]") for i, c in enumerate(doc["cases"])]
    digest = schema.text(doc["digest"], f"{where}.digest", schema.SHA_RE)
    try:
        root_text.encode("utf-8")
        root = Path(root_text) if Path(root_text).is_absolute() else base / root_text
        manifest = Manifest(name, tuple(cases), seed, fractions, root, notes)
    except (OSError, ValueError, RuntimeError) as exc:
        raise schema.field_error(f"{where}.data_root", f"not a usable folder ({exc})",
                                 root_text) from None
    return manifest, digest, frozen


def load_manifest(
    path: str | Path,
    data_root: str | Path | None = None,
    check_files: bool = True,
    verify_checksums: bool = False,
    catalog: Mapping[str, Mapping[str, Any]] | None = None,
) -> Manifest:
    """Read and validate a manifest; raises `ManifestError` naming the offending case.

    Checks the schema, unique case ids, safe relative paths, subject-disjoint splits and the
    stored digest; with `check_files` each file exists (inside the data root) with the recorded
    size; with `verify_checksums` its sha256 too; with `catalog` each source id is listed.
    """
    path = Path(path)
    base = path.resolve().parent
    manifest, stored, frozen = _parse_document(schema.read_json(path), str(path), base)
    if data_root is not None:
        manifest = dataclasses.replace(manifest, data_root=Path(data_root))
    checks.raise_if(checks.structure_problems(manifest.cases), str(path))
    if stored != manifest.digest or frozen != manifest.frozen:
        raise ManifestError(
            f"{path}: stored digest {stored[:12]}... does not match the content "
            f"({manifest.digest[:12]}...): the file was edited by hand or corrupted; restore it "
            "from version control or rebuild it with `mri-vqvae manifest build`"
        )
    if catalog is not None:
        checks.raise_if(checks.catalog_problems(manifest.cases, catalog), str(path))
    if check_files:
        where = f"{path} (data root {manifest.data_root})"
        problems = checks.file_problems(manifest.data_root, manifest.cases, verify_checksums)
        checks.raise_if(problems, where)
    return manifest


def verify_manifest(
    manifest: Manifest,
    catalog: Mapping[str, Mapping[str, Any]] | None = None,
    checksums: bool = True,
) -> list[Problem]:
    """Every problem found: ids, paths, leakage, catalog, files, checksums, duplicate content."""
    problems = checks.structure_problems(manifest.cases)
    if catalog is not None:
        problems += checks.catalog_problems(manifest.cases, catalog)
    problems += checks.file_problems(manifest.data_root, manifest.cases, checksums)
    return problems + checks.duplicate_content(manifest.cases)
