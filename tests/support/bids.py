"""Checks of a BIDS-Derivatives view against the BIDS schema (bidsschematools, a dev dependency),
the official validator (bids-validator-deno, a dev dependency: its errors, not its warnings) and
the stricter rules mri-vqvae promises (alphanumeric labels, entity order, known suffixes)."""

from __future__ import annotations

import csv
import fnmatch
import json
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import bidsschematools.rules
import bidsschematools.schema

# sub, ses, ce, run, desc in the spec's entity order; the suffixes mri-vqvae gives
NAME_RE = re.compile(r"sub-(?P<sub>[A-Za-z0-9]+)(?:_ses-(?P<ses>[A-Za-z0-9]+))?"
                     r"(?:_ce-[A-Za-z0-9]+)?(?:_run-[0-9]+)?"
                     r"_desc-(?P<desc>preproc|recon|bitsmap|synthetic)"
                     r"_(?P<suffix>T1w|T2w|FLAIR|PDw|T2starw)\.(?P<ext>nii\.gz|nii|json)")


@lru_cache(maxsize=1)
def _schema() -> tuple[object, list[re.Pattern[str]]]:
    schema = bidsschematools.schema.load_schema()
    rules = [*bidsschematools.rules.regexify_filename_rules(schema.rules.files.common, schema, 2),
             *bidsschematools.rules.regexify_filename_rules(schema.rules.files.deriv.imaging,
                                                            schema, 1)]
    return schema, [re.compile(r["regex"]) for r in rules]


def schema_valid(relpath: str) -> bool:
    """Whether a path relative to the dataset root is a valid BIDS (derivative) file name."""
    return any(r.match(relpath) for r in _schema()[1])


def _ignored(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(name, p.rstrip("/")) for p in patterns)


def validator_errors(out: Path) -> list[str]:
    """The official BIDS validator's errors on `out` ("CODE location"), run from this venv.
    Warnings (no README, no Authors) are not errors: a derivative written by a tool cannot know
    its authors."""
    validator = Path(sys.executable).with_name("bids-validator-deno")
    proc = subprocess.run([str(validator), str(out), "--json"], capture_output=True, text=True,
                          timeout=300, check=False)
    try:
        issues = json.loads(proc.stdout)["issues"]["issues"]
    except (ValueError, KeyError):
        return [f"bids-validator-deno gave no report (exit {proc.returncode}): "
                f"{proc.stderr[-500:]}"]
    return [f"{i['code']} {i.get('subCode') or ''} {i.get('location')}".replace("  ", " ")
            for i in issues if i.get("severity") == "error"]


def view_problems(out: Path, official: bool = True) -> list[str]:
    """Everything wrong with `out` as a BIDS derivative dataset (empty: valid); `official`
    False leaves the official validator out (for views of placeholder bytes, not NIfTI)."""
    problems = validator_errors(out) if official else []
    schema = _schema()[0]
    doc = json.loads((out / "dataset_description.json").read_text())
    dataset_rules = schema.rules.json.dataset  # type: ignore[attr-defined]
    for rule in ("dataset_description", "derivative_description"):
        for field, level in dataset_rules[rule].fields.items():
            if level == "required" and field not in doc:
                problems.append(f"dataset_description.json lacks {field}")
    if (doc.get("BIDSVersion"), doc.get("DatasetType")) != ("1.9.0", "derivative"):
        problems.append(f"BIDSVersion, DatasetType: {doc.get('BIDSVersion')}, "
                        f"{doc.get('DatasetType')}")
    if not doc["GeneratedBy"][0].get("Version") or "digest" not in doc["GeneratedBy"][0].get(
            "Description", ""):
        problems.append("GeneratedBy lacks a Version or the digests")
    ignore = (out / ".bidsignore").read_text().split()
    subjects = set()
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = path.relative_to(out).as_posix()
        if _ignored(rel.split("/")[0], ignore) or _ignored(path.name, ignore) or rel in (
                ".bidsignore", ".lock"):
            continue
        if not schema_valid(rel):
            problems.append(f"{rel}: not a valid BIDS derivative name")
        if rel.startswith("sub-"):
            match = NAME_RE.fullmatch(path.name)
            if match is None or rel.split("/")[0] != f"sub-{match['sub']}":
                problems.append(f"{rel}: not an mri-vqvae BIDS name")
                continue
            subjects.add(f"sub-{match['sub']}")
            stem = path.name.removesuffix("." + match["ext"])
            if match["ext"] != "json" and not path.with_name(stem + ".json").is_file():
                problems.append(f"{rel}: no JSON sidecar")
    with open(out / "participants.tsv", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    if {r["participant_id"] for r in rows} != subjects or len(rows) != len(subjects):
        problems.append(f"participants.tsv {[r['participant_id'] for r in rows]} != {subjects}")
    return problems


def bids_files(out: Path, ext: str = ".nii.gz") -> dict[str, Path]:
    """The view's files of extension `ext` by their sidecar's CaseID."""
    found = {}
    for meta in sorted(out.glob("sub-*/**/anat/*.json")):
        image = meta.with_name(meta.name.removesuffix(".json") + ext)
        found[json.loads(meta.read_text())["CaseID"]] = image
    return found
