"""The sources catalog: one record per public MRI source (licence, access, citation).

It ships inside the package (``mri_vqvae/data/sources.json``; ``data_manifests/sources.json``
links to it); manifest cases name their source by its ``id``. Stdlib only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mri_vqvae.data import schema

CATALOG_PATH = Path(__file__).resolve().parent / "sources.json"
CATALOG_FIELDS = (
    "id", "name", "url", "licence", "access", "citation", "modalities", "subject_count", "format",
)
ACCESS = ("open", "registration", "data-use agreement")


def load_catalog(path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """The sources catalog as {source id: record}; default ``data_manifests/sources.json``."""
    path = Path(path) if path is not None else CATALOG_PATH
    doc = schema.read_json(path)
    schema.check_keys(doc, {"schema_version", "sources"}, {"notes"}, str(path))
    if not isinstance(doc["sources"], list):
        raise schema.field_error(f"{path}.sources", "expected a list",
                                 type(doc["sources"]).__name__)
    catalog: dict[str, dict[str, Any]] = {}
    for i, rec in enumerate(doc["sources"]):
        where = f"{path}.sources[{i}]"
        schema.check_keys(rec, set(CATALOG_FIELDS), {"notes", "files"}, where)
        sid = schema.text(rec["id"], f"{where}.id", schema.ID_RE)
        if sid in catalog:
            raise schema.field_error(where, "duplicate source id", sid)
        schema.choice(rec["access"], f"{where}.access", ACCESS)
        catalog[sid] = rec
    return catalog
