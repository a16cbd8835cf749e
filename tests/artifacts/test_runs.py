"""Run folders: naming, run.json provenance and status, metrics.jsonl, seeding, rank gating."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from mri_vqvae.artifacts.runs import RunDirError, RunRecorder, new_run_dir, read_metrics
from mri_vqvae.config import ExperimentConfig, config_digest, load_config
from mri_vqvae.core.provenance import git_state

UTC = dt.timezone.utc
CFG = ExperimentConfig(name="smoke", seed=7)


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"name": "toy", "cases": [], "digest": "ab" * 32}))
    return path


def recorder(run_dir: Path, **kw: object) -> RunRecorder:
    kw.setdefault("tensorboard", False)
    return RunRecorder(run_dir, CFG, argv=["train", "--seed", "7"], **kw)  # type: ignore[arg-type]


def test_run_dir_name_and_uniqueness(tmp_path: Path) -> None:
    now = dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    first = new_run_dir(tmp_path / "runs", "vqvae", "brain64", 7, now=now)
    assert first == tmp_path / "runs" / "vqvae" / "20240102T030405Z-brain64-s7"
    assert first.is_dir()
    again = [new_run_dir(tmp_path / "runs", "vqvae", "brain64", 7, now=now) for _ in range(2)]
    assert [p.name for p in again] == ["20240102T030405Z-brain64-s7-2",
                                       "20240102T030405Z-brain64-s7-3"]
    plus_one = dt.timezone(dt.timedelta(hours=1))
    odd = new_run_dir(tmp_path, "prior", "my cfg/v2", 0, now=dt.datetime(2024, 1, 2, 4, 4, 5,
                                                                           tzinfo=plus_one))
    assert odd.name == "20240102T030405Z-my-cfg-v2-s0"
    assert re.fullmatch(r"\d{8}T\d{6}Z-smoke-s1", new_run_dir(tmp_path, "vqvae", "smoke", 1).name)


def test_run_json_completed(tmp_path: Path, manifest: Path) -> None:
    run_dir = new_run_dir(tmp_path, "vqvae", CFG.name, CFG.seed)
    with recorder(run_dir, manifest=manifest, device="cpu") as rec:
        info = json.loads(rec.run_json.read_text())
        assert info["status"] == "running" and info["ended_utc"] is None
        assert rec.previews_dir.is_dir()
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "completed" and info["error"] is None and info["ended_utc"]
    assert info["argv"] == ["train", "--seed", "7"] and info["seed"] == 7
    assert info["stage"] == "vqvae" and info["device"] == "cpu"
    assert set(info["git"]) == {"commit", "dirty"}
    assert {"python", "torch", "monai", "numpy", "nibabel"} <= set(info["versions"])
    assert info["versions"]["torch"] and info["versions"]["python"]
    assert info["manifest_digest"] == "ab" * 32
    assert info["config_digest"] == config_digest(CFG) and info["resumed_from"] == []
    assert (run_dir / "manifest.json").read_bytes() == manifest.read_bytes()
    assert load_config(run_dir / "config.yaml") == CFG


@pytest.mark.parametrize(
    ("exc", "status", "kind"),
    [(ValueError("loss is NaN at step 3"), "failed", "ValueError"),
     (KeyboardInterrupt(), "interrupted", "KeyboardInterrupt")],
)
def test_run_json_failed_or_interrupted(
    tmp_path: Path, exc: BaseException, status: str, kind: str
) -> None:
    with pytest.raises(type(exc)), recorder(tmp_path / "run"):
        raise exc
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["status"] == status and info["ended_utc"]
    assert info["error"] == {"type": kind, "message": str(exc)}


def test_fresh_start_refuses_used_folder(tmp_path: Path) -> None:
    with recorder(tmp_path / "run"):
        pass
    with pytest.raises(RunDirError, match="already holds a run"), recorder(tmp_path / "run"):
        pass


def test_metrics_append_and_resume_truncation(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt), recorder(run_dir) as rec:
        for step in range(1, 6):
            rec.log_metrics(step, 0, "train", loss=torch.tensor(1.0 / step), code_usage=np.int64(9))
        rec.log_metrics(5, 0, "val", psnr=float("nan"))
        raise KeyboardInterrupt
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 6, "epo')  # a line cut short by a kill
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 5]
    assert records[0]["loss"] == 1.0 and records[0]["code_usage"] == 9
    assert records[-1]["psnr"] is None and read_metrics(run_dir, split="val") == records[-1:]

    with recorder(run_dir, resume_step=3, resumed_from=run_dir / "checkpoints/last") as rec:
        assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]
        rec.log_metrics(4, 1, "train", loss=0.2)
    assert [(r["step"], r["epoch"]) for r in read_metrics(run_dir)] == [(1, 0), (2, 0), (3, 0),
                                                                       (4, 1)]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "completed" and info["error"] is None
    (entry,) = info["resumed_from"]
    assert entry["step"] == 3 and entry["checkpoint"].endswith("last")
    assert entry["previous_status"] == "interrupted" and entry["dropped_metric_lines"] == 4


def test_resume_needs_run_json(tmp_path: Path) -> None:
    with pytest.raises(RunDirError, match="cannot resume"):
        recorder(tmp_path / "empty", resume_step=3).start()


def test_git_absent_or_outside_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert git_state(tmp_path) == {"commit": None, "dirty": None}  # not a repository
    assert git_state(git="no-such-git-binary") == {"commit": None, "dirty": None}
    here = git_state()
    assert here["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", here["commit"])
    monkeypatch.setenv("PATH", str(tmp_path))  # no git on PATH at all
    with recorder(tmp_path / "run"):
        pass
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["git"] == {"commit": None, "dirty": None}


def test_other_ranks_write_nothing(tmp_path: Path, manifest: Path) -> None:
    run_dir = tmp_path / "run"
    with recorder(run_dir, manifest=manifest, rank=1, tensorboard=True) as rec:
        rec.log_metrics(1, 0, "train", loss=1.0)
        rec.update(best=1)
    assert not run_dir.exists()


def test_tensorboard_scalars(tmp_path: Path) -> None:
    with recorder(tmp_path / "run", tensorboard=True) as rec:
        rec.log_metrics(1, 0, "train", loss=0.5, note="text is skipped")
    events = list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
