"""The held-out guard with the run's own manifest copy: a kit rebuilt on another CPU (training
copies with other bytes) is evaluated; any difference in the held-out split is refused, naming it;
a copy that is not the recorded manifest vouches for nothing."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from mri_vqvae.core.errors import EvaluationError
from mri_vqvae.data.manifest import Manifest, write_manifest
from mri_vqvae.evaluation.heldout import check_held_out, training_manifest_copy
from tests.support.runs import make_manifest


def _with(manifest: Manifest, case_id: str, **changes: object) -> Manifest:
    """`manifest` with the fields of one case changed."""
    cases = tuple(replace(c, **changes) if c.case_id == case_id else c for c in manifest.cases)
    return replace(manifest, cases=cases)


@pytest.fixture
def trained(tmp_path: Path) -> tuple[Manifest, Path]:
    """The manifest a run trained on and the run folder holding its copy as manifest.json."""
    manifest, _ = make_manifest(tmp_path / "kit")
    run = tmp_path / "run"
    run.mkdir()
    write_manifest(manifest, run / "manifest.json")
    return manifest, run


def test_a_rebuilt_kit_whose_training_copies_differ_is_evaluated(
    trained: tuple[Manifest, Path],
) -> None:
    manifest, run = trained
    rebuilt = _with(manifest, "tr1", sha256="0" * 64)  # an augmented copy with other bytes
    assert rebuilt.digest != manifest.digest
    copy = training_manifest_copy(run)
    assert copy is not None and copy.digest == manifest.digest
    done = check_held_out(rebuilt, "test", {"run.json": manifest.digest}, "run", copy)
    assert done["matched_by"] == "the run's manifest.json, same split"
    assert done["manifest_digest"] == rebuilt.digest and done["held_out_subjects"] == 3
    exact = check_held_out(manifest, "test", {"run.json": manifest.digest}, "run", copy)
    assert exact["matched_by"] == "digest"


@pytest.mark.parametrize(("change", "reason"), [
    (lambda m: _with(m, "te1", sha256="f" * 64), "case 'te1' has other bytes"),
    (lambda m: _with(m, "tr2", split="test"), "case 'tr2' is not in the run's test split"),
    (lambda m: _with(m, "te0", split="val"), "case 'te0' of the run's test split is missing"),
    (lambda m: replace(m, cases=(*m.cases, replace(m.cases[0], case_id="te9", split="test"))),
     "case 'te9' is not in the run's test split"),
])
def test_any_difference_in_the_held_out_split_is_refused_by_name(
    trained: tuple[Manifest, Path], change: object, reason: str,
) -> None:
    manifest, run = trained
    other = change(manifest)  # type: ignore[operator]
    with pytest.raises(EvaluationError, match="cannot be trusted") as err:
        check_held_out(other, "test", {"run.json": manifest.digest}, "run",
                       training_manifest_copy(run))
    assert reason in str(err.value) and "manifest.json" in str(err.value)


def test_a_held_out_subject_that_trained_the_run_is_refused(
    trained: tuple[Manifest, Path],
) -> None:
    """The same held-out cases, but one of them now names a subject the run trained on."""
    manifest, _ = trained
    copy = _with(manifest, "tr0", subject_id="s-shared")
    rebuilt = _with(manifest, "te0", subject_id="s-shared")
    with pytest.raises(EvaluationError, match="subject 's-shared' trained the run"):
        check_held_out(rebuilt, "test", {"run.json": copy.digest}, "run", copy)


def test_a_copy_that_is_not_the_recorded_manifest_vouches_for_nothing(
    trained: tuple[Manifest, Path], tmp_path: Path,
) -> None:
    manifest, run = trained
    rebuilt = _with(manifest, "tr1", sha256="0" * 64)
    recorded = {"run.json": "a" * 64}  # the run trained on neither
    with pytest.raises(EvaluationError, match="cannot be trusted: pass the exact manifest"):
        check_held_out(rebuilt, "test", recorded, "run", training_manifest_copy(run))
    with pytest.raises(EvaluationError, match="cannot be trusted: pass the exact manifest"):
        check_held_out(rebuilt, "test", {"run.json": manifest.digest}, "run", None)


def test_no_copy_or_an_unreadable_one_is_none(tmp_path: Path) -> None:
    assert training_manifest_copy(tmp_path) is None
    (tmp_path / "manifest.json").write_text("{not json")
    assert training_manifest_copy(tmp_path) is None


def test_the_report_says_which_rule_passed(trained: tuple[Manifest, Path]) -> None:
    from mri_vqvae.evaluation.report.evaluation_report import _how_matched

    manifest, run = trained
    rebuilt = _with(manifest, "tr1", sha256="0" * 64)
    recorded = {"run.json": manifest.digest}
    exact = _how_matched(check_held_out(manifest, "test", recorded, "run"))
    vouched = _how_matched(check_held_out(rebuilt, "test", recorded, "run",
                                          training_manifest_copy(run)))
    assert exact == "the manifest digest matches the run's (run.json)"
    assert vouched.startswith("the manifest digest differs from the run's (run.json)")
    assert "same held-out cases with the same sha256" in vouched
