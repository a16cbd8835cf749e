"""CITATION.cff is valid YAML with the CFF 1.2.0 keys, the package version, and a reference for
every source of the offline kit (matching the sources catalog); LICENSE is the Apache-2.0 text."""

from __future__ import annotations

import re

import yaml

from mri_vqvae.data.catalog import load_catalog
from mri_vqvae.data.kit import KIT_FILES
from mri_vqvae.data.kit_sources import OPEN_MS_ID
from tests.support.paths import REPO

CFF = yaml.safe_load((REPO / "CITATION.cff").read_text(encoding="utf-8"))
PYPROJECT = (REPO / "pyproject.toml").read_text(encoding="utf-8")


def _project(key: str) -> str:
    """A string field of pyproject's [project] table (tomllib needs Python 3.11)."""
    found = re.search(rf'^{key} = (?:{{ text = )?"([^"]+)"', PYPROJECT, re.M)
    assert found is not None, key
    return found.group(1)


def test_citation_has_the_required_keys_and_the_package_version() -> None:
    assert {"cff-version", "message", "title", "authors", "version", "license"} <= CFF.keys()
    assert CFF["cff-version"] == "1.2.0"
    assert CFF["version"] == _project("version")
    assert CFF["license"] == _project("license") == "Apache-2.0"


def test_every_kit_source_has_a_reference_with_its_catalog_citation() -> None:
    catalog = load_catalog()
    cited = {}
    for ref in CFF["references"]:
        assert {"type", "title", "authors"} <= ref.keys()
        for sid in catalog:
            if f"Kit source `{sid}`" in ref["notes"]:
                cited[sid] = ref
    kit = {f.source_id for f in KIT_FILES} | {OPEN_MS_ID}
    assert kit <= cited.keys()
    for sid in kit:
        assert cited[sid]["title"] in catalog[sid]["citation"], sid


def test_license_is_the_apache_2_text() -> None:
    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License\n                           Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and "9. Accepting Warranty" in text
