"""``mri-vqvae evaluate --part I/N``: parts record the held-out pass, the run without --part into
the same --out uses their records and writes what one process writes; bad inputs are refused
with nothing written that looks like a finished evaluation."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from mri_vqvae.core.errors import EvaluationError
from mri_vqvae.data.manifest import Manifest, load_manifest, write_manifest
from mri_vqvae.evaluation import evaluate as evaluate_module
from mri_vqvae.evaluation.evaluate import EvaluateSettings, evaluate_part, evaluate_runs
from mri_vqvae.tasks.parts import PARTS, PartError, parse_part
from pipelines.cli import cli
from tests.support.runs import annotate_lesions, make_manifest, make_prior_run, make_vqvae_run

SPLITS = {"tr0": "train", "tr1": "train", "tr2": "train", "te0": "test", "te1": "test",
          "te2": "test", "te3": "test"}  # 2 parts: [te0, te1] and [te2 (bad), te3]
QUICK = EvaluateSettings(split="test", num_samples=0, report_cases=1, num_resamples=100)
OUTPUTS = ("metrics.json", "per_case.csv", "failures.csv", "report.html")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A manifest (te2 unreadable, a lesion mask on te3), two VQ-VAE runs, a PixelCNN prior."""
    root = tmp_path_factory.mktemp("eval_parts")
    manifest, _ = make_manifest(root, SPLITS, bad=("te2",))
    vq = make_vqvae_run(root / "runs", manifest.digest)
    other_vq = make_vqvae_run(root / "other", manifest.digest, seed=1)
    prior = make_prior_run(root / "runs", vq, manifest.digest)
    path = root / "annotated.json"
    write_manifest(annotate_lesions(manifest, ("te3",)), path)
    return {"root": root, "manifest": path, "vqvae": vq, "other_vq": other_vq, "prior": prior}


def _cli(world: dict[str, Path], out: Path | None, *extra: str,
         vqvae: str = "vqvae") -> Result:
    args = ["evaluate", "--vqvae", str(world[vqvae]), "--manifest", str(world["manifest"]),
            "--split", "test", "--device", "cpu", "--bootstrap", "100",
            "--runs-root", str(world["root"] / "default_runs"), *extra]
    return CliRunner().invoke(cli, args + ([] if out is None else ["--out", str(out)]))


def _parts(world: dict[str, Path], out: Path, *extra: str, order: tuple[int, ...] = (2, 1)
           ) -> None:
    """Run parts `order` of 2 into `out` through the CLI."""
    for i in order:
        result = _cli(world, out, "--part", f"{i}/2", *extra)
        assert result.exit_code == 0, result.output
        assert "without --part" in result.output


def _both_parts(world: dict[str, Path], out: Path) -> tuple[Manifest, Path]:
    """Parts 1 and 2 of 2 into `out`, called directly; the manifest and `out`."""
    manifest = load_manifest(world["manifest"])
    for i in (1, 2):
        evaluate_part(world["vqvae"], manifest, out, parse_part(f"{i}/2"), settings=QUICK)
    return manifest, out


def _metrics(out: Path) -> dict[str, Any]:
    """metrics.json less what differs between any two runs (when it was made, timings)."""
    doc = json.loads((out / "metrics.json").read_text())
    doc.pop("created_utc")
    if doc["samples"] is not None:
        doc["samples"].pop("seconds_per_sample")
        timing = doc["samples"]["plausibility"]["registration"]
        for key in ("seconds_per_volume", "max_seconds"):
            timing.pop(key)
    return doc


def _no_held_out_pass(*args: object, **kwargs: object) -> None:
    raise AssertionError("the final run evaluated held-out cases again")


def test_two_parts_then_the_final_run_write_what_one_process_writes(
        world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    extra = ("--prior", str(world["prior"]), "-n", "2", "--seed", "3", "--report-cases", "1")
    one = _cli(world, tmp_path / "one", *extra)
    assert one.exit_code == 0, one.output
    out = tmp_path / "split"
    _parts(world, out, *extra)
    assert sorted(p.name for p in (out / PARTS).iterdir()) == ["1-of-2", "2-of-2"]
    assert not any((out / name).exists() for name in OUTPUTS)  # no finished-looking file
    monkeypatch.setattr(evaluate_module, "held_out_pass", _no_held_out_pass)
    final = _cli(world, out, *extra)
    assert final.exit_code == 0, final.output
    assert not (out / PARTS).exists()
    metrics = _metrics(out)
    assert metrics == _metrics(tmp_path / "one")
    assert [f["case_id"] for f in metrics["failures"]] == ["te2"]  # part 2's failure
    assert [r["case_id"] for r in metrics["likelihood"]["lesions"]["cases"]] == ["te3"]
    for name in ("per_case.csv", "failures.csv", "plausibility.csv"):
        assert (out / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    figures = sorted(p.name for p in (out / "figures").iterdir())  # views, maps, lesion
    assert figures == sorted(p.name for p in (tmp_path / "one" / "figures").iterdir())
    assert {"case_te0.png", "likelihood_te0.png", "lesion_te3.png"} <= set(figures)
    for name in figures:
        assert (out / "figures" / name).read_bytes() == \
            (tmp_path / "one" / "figures" / name).read_bytes(), name
    assert (out / "report.html").is_file()


def test_a_part_out_of_range_is_refused(world: dict[str, Path], tmp_path: Path) -> None:
    result = _cli(world, tmp_path / "out", "--part", "3/2")
    assert result.exit_code == 2 and "--part" in result.output and "1 <= I <= N" in result.output
    assert not (tmp_path / "out").exists()


def test_part_without_out_is_refused(world: dict[str, Path]) -> None:
    result = _cli(world, None, "--part", "1/2")
    assert result.exit_code == 2 and "--part needs --out" in result.output
    assert not (world["root"] / "default_runs").exists()


def test_parts_of_another_model_are_refused_naming_what_differs(world: dict[str, Path],
                                                                tmp_path: Path) -> None:
    manifest, out = _both_parts(world, tmp_path / "out")
    with pytest.raises(PartError, match=r"another vqvae_sha256 than this run"):
        evaluate_runs(world["other_vq"], manifest, out, settings=QUICK)
    with pytest.raises(PartError, match=r"another prior_sha256 than this run"):
        evaluate_runs(world["vqvae"], manifest, out, prior_run=world["prior"], settings=QUICK)
    evaluate_part(world["other_vq"], manifest, out, parse_part("2/2"), settings=QUICK)
    with pytest.raises(PartError, match=r"part 2 of 2 .*\(header\.vqvae_sha256 differ\)"):
        evaluate_runs(world["vqvae"], manifest, out, settings=QUICK)
    assert not any((out / name).exists() for name in OUTPUTS)
    assert (out / PARTS / "1-of-2" / "part.json").is_file()  # kept for a rerun


def test_a_missing_part_is_named_and_nothing_is_written(world: dict[str, Path],
                                                         tmp_path: Path) -> None:
    out = tmp_path / "out"
    _parts(world, out, order=(1,))
    result = _cli(world, out)
    assert isinstance(result.exception, PartError), result.output
    assert "part(s) [2] of 2 have not finished" in str(result.exception)
    assert not any((out / name).exists() for name in OUTPUTS)


def test_merge_refuses_evaluate_parts_and_says_what_finishes_them(world: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    out = tmp_path / "out"
    _parts(world, out)
    result = CliRunner().invoke(cli, ["merge", str(out)])
    assert isinstance(result.exception, PartError), result.output
    assert "without --part" in str(result.exception)
    assert not any((out / name).exists() for name in OUTPUTS)
    assert (out / PARTS / "2-of-2" / "part.json").is_file()


def test_a_strict_final_run_stops_at_a_part_s_failed_case(world: dict[str, Path],
                                                           tmp_path: Path) -> None:
    manifest, out = _both_parts(world, tmp_path / "out")
    with pytest.raises(EvaluationError, match=r"^case te2 \("):
        evaluate_runs(world["vqvae"], manifest, out, settings=replace(QUICK, strict=True))
    assert not (out / "metrics.json").exists()
