"""Which training scans evaluate reads and which become the plausibility references."""

from __future__ import annotations

from types import SimpleNamespace

from mri_vqvae.config import load_config
from mri_vqvae.data.case import Case
from mri_vqvae.data.manifest import Manifest
from mri_vqvae.evaluation.evaluate import EvaluateSettings, _real_train_cases, _train_items

DATA = load_config("smoke").data


def _case(case_id: str, origin: str = "real", split: str = "train") -> Case:
    return Case(case_id=case_id, subject_id=case_id.split("-")[0], source_id="s",
                path=f"{case_id}.nii.gz", sha256="0" * 64, bytes=1, modality="T1w",
                shape=(8, 8, 8), spacing=(1.0, 1.0, 1.0), split=split, origin=origin,
                derived_from=None if origin == "real" else case_id.split("-")[0])


MANIFEST = Manifest("m", [
    *(_case(f"a{i}-aug", "augmented") for i in range(6)),
    _case("b"), _case("c"), _case("d"), _case("t", split="test"),
])
SOURCE = SimpleNamespace(data=DATA)


def test_augmented_copies_are_not_references_when_real_scans_exist() -> None:
    assert _real_train_cases(MANIFEST) == {"b", "c", "d"}
    copies = Manifest("m", [_case(f"a{i}-aug", "augmented") for i in range(3)])
    assert _real_train_cases(copies) is None  # nothing real: every scan is a reference


def test_a_subset_of_training_scans_takes_real_scans_first_in_manifest_order() -> None:
    for seed in range(5):
        items = _train_items(MANIFEST, SOURCE, EvaluateSettings(max_train_cases=4, seed=seed))
        ids = [i["case_id"] for i in items]
        assert ids == sorted(ids) and {"b", "c", "d"} <= set(ids) and len(ids) == 4
    every = _train_items(MANIFEST, SOURCE, EvaluateSettings())
    assert len(every) == 9
    two = [i["case_id"] for i in _train_items(MANIFEST, SOURCE,
                                              EvaluateSettings(max_train_cases=2, seed=0))]
    assert set(two) <= {"b", "c", "d"}
