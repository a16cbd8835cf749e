"""One manifest case (an image volume, where it came from, its split) and a problem found.

`Case` round-trips through its JSON form: ``parse_case(case.to_dict(), where) == case``.
Stdlib only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from mri_vqvae.data import schema

SPLITS = ("train", "val", "test")
ORIGINS = ("real", "augmented")
MASKS = ("lesion_mask", "brain_mask")  # annotation volumes, each with "<name>_sha256"


def mask_fields(name: str) -> tuple[str, str]:
    """The two `Case` fields of the annotation mask `name`: its path and its sha256."""
    return name, f"{name}_sha256"


ANNOTATION_FIELDS = tuple(f for m in MASKS for f in mask_fields(m))  # not what trains
OPTIONAL_FIELDS = ("series_uid", "session", *ANNOTATION_FIELDS)  # written to JSON only when set


@dataclass(frozen=True)
class Case:
    """One image volume: a file (or DICOM series folder) relative to the data root.

    `series_uid` selects one series of a folder holding several (None: every file of the
    folder); `session` names the visit of a subject scanned more than once (``study1``).
    `lesion_mask` and `brain_mask` are annotations: label volumes on the image's grid (relative
    to the data root, nonzero = lesion / brain) with their sha256, used by evaluation only (the
    brain mask is the region a lesion is scored against). Optional fields are written to JSON
    only when set, so older manifests keep their digests.
    """

    case_id: str
    subject_id: str
    source_id: str
    path: str
    sha256: str
    bytes: int
    modality: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    split: str | None = None
    origin: str = "real"
    derived_from: str | None = None
    series_uid: str | None = None
    session: str | None = None
    lesion_mask: str | None = None
    lesion_mask_sha256: str | None = None
    brain_mask: str | None = None
    brain_mask_sha256: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(v) for v in self.shape))
        object.__setattr__(self, "spacing", tuple(float(v) for v in self.spacing))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (shape and spacing as lists; optional fields only when set)."""
        doc = dataclasses.asdict(self)
        doc["shape"], doc["spacing"] = list(self.shape), list(self.spacing)
        for key in OPTIONAL_FIELDS:
            if doc[key] is None:
                del doc[key]
        return doc


@dataclass(frozen=True)
class Problem:
    """Something wrong with one case or file (``case_id`` is None for files not yet cases)."""

    case_id: str | None
    path: str
    reason: str

    def __str__(self) -> str:
        who = f"case {self.case_id!r}" if self.case_id else "file"
        return f"{who} ({self.path}): {self.reason}"


_FIELDS = {f.name for f in dataclasses.fields(Case)}


def parse_case(obj: Any, where: str) -> Case:
    """The `Case` of a decoded JSON object; `ManifestError` naming the case and field if bad."""
    cid = obj.get("case_id") if isinstance(obj, dict) else None
    where = f"{where} (case {cid!r})" if isinstance(cid, str) else where
    optional = set(OPTIONAL_FIELDS)
    schema.check_keys(obj, _FIELDS - optional, optional, where)
    return Case(
        case_id=schema.text(cid, f"{where}.case_id", schema.ID_RE),
        subject_id=schema.text(obj["subject_id"], f"{where}.subject_id"),
        source_id=schema.text(obj["source_id"], f"{where}.source_id", schema.ID_RE),
        path=schema.text(obj["path"], f"{where}.path"),
        sha256=schema.text(obj["sha256"], f"{where}.sha256", schema.SHA_RE),
        bytes=schema.integer(obj["bytes"], f"{where}.bytes", 0),
        modality=schema.text(obj["modality"], f"{where}.modality"),
        shape=schema.triple(obj["shape"], f"{where}.shape", lambda v, w: schema.integer(v, w, 1)),
        spacing=schema.triple(obj["spacing"], f"{where}.spacing",
                              lambda v, w: schema.number(v, w, True)),
        split=schema.choice(obj["split"], f"{where}.split", (*SPLITS, None)),
        origin=schema.choice(obj["origin"], f"{where}.origin", ORIGINS),
        derived_from=schema.optional_text(obj["derived_from"], f"{where}.derived_from"),
        series_uid=schema.optional_uid(obj.get("series_uid"), f"{where}.series_uid"),
        session=schema.optional_text(obj.get("session"), f"{where}.session", schema.ID_RE),
        **_annotations(obj, where),
    )


def _annotations(obj: dict[str, Any], where: str) -> dict[str, str | None]:
    """Each annotation mask's path and sha256: both given or neither."""
    fields: dict[str, str | None] = {}
    for name in MASKS:
        _, key = mask_fields(name)
        mask, digest = obj.get(name), obj.get(key)
        if (mask is None) != (digest is None):
            raise schema.field_error(f"{where}.{name}", "a mask path and its sha256 together",
                                     {name: mask, key: digest},
                                     f"give both {name} and {key}, or neither")
        fields[name] = schema.optional_text(mask, f"{where}.{name}")
        fields[key] = None if digest is None else schema.text(digest, f"{where}.{key}",
                                                             schema.SHA_RE)
    return fields
