"""``--part I/N`` shares, part records and the merge checks (`mri_vqvae.tasks.parts`), and the
periodic progress line of the per-case commands (`mri_vqvae.tasks.cases.CaseProgress`)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest

from mri_vqvae.core.distributed import shard
from mri_vqvae.core.outputs import OutputError
from mri_vqvae.tasks.cases import CaseProgress, Failure
from mri_vqvae.tasks.parts import (
    PartError,
    PartJournal,
    finish_part,
    merge_parts,
    parse_part,
    part_lock,
)


@pytest.mark.parametrize("n", [0, 1, 7, 10, 23])
@pytest.mark.parametrize("count", [1, 3, 4, 8])
def test_parts_are_disjoint_cover_every_case_and_equal_the_ranks_shares(n: int,
                                                                         count: int) -> None:
    items = [f"c{i:03d}" for i in range(n)]
    shares = [parse_part(f"{i}/{count}").take(items) for i in range(1, count + 1)]
    assert [x for share in shares for x in share] == items  # disjoint, complete, in order
    assert shares == [shard(items, r, count) for r in range(count)]
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


@pytest.mark.parametrize("text", ["0/4", "5/4", "2", "a/b", "1/0", "-1/3"])
def test_bad_part_is_refused_naming_the_option(text: str) -> None:
    with pytest.raises(PartError, match="--part"):
        parse_part(text)


def _finish(out: Path, text: str, records: list[str], failed: tuple[str, ...] = (),
            header: dict | None = None) -> None:
    part = parse_part(text)
    with part_lock(out, part) as folder:
        finish_part(folder, part, "preprocess", header or {"h": 1},
                    [{"case_id": c} for c in records],
                    [Failure(c, f"{c}.nii", "bad") for c in failed])


def test_merge_concatenates_parts_in_case_order(tmp_path: Path) -> None:
    _finish(tmp_path, "2/2", ["c", "d"], failed=("e",))
    _finish(tmp_path, "1/2", ["a", "b"])
    with merge_parts(tmp_path) as merged:
        assert [r["case_id"] for r in merged.records] == ["a", "b", "c", "d"]
        assert merged.failures == [Failure("e", "e.nii", "bad")]
        assert merged.command == "preprocess" and merged.header == {"h": 1}


def test_merge_names_the_parts_that_have_not_finished(tmp_path: Path) -> None:
    _finish(tmp_path, "2/3", ["c"])
    with pytest.raises(PartError, match=r"part\(s\) \[1, 3\] of 3"), merge_parts(tmp_path):
        pass


def test_merge_refuses_parts_of_different_runs_or_counts(tmp_path: Path) -> None:
    _finish(tmp_path, "1/2", ["a"])
    _finish(tmp_path, "2/2", ["b"], header={"h": 2})
    with pytest.raises(PartError, match="another run"), merge_parts(tmp_path):
        pass
    _finish(tmp_path, "1/3", ["a"])
    with pytest.raises(PartError, match="different counts"), merge_parts(tmp_path):
        pass


def test_merge_is_refused_while_a_part_runs_and_a_part_twice(tmp_path: Path) -> None:
    _finish(tmp_path, "1/1", ["a"])
    with part_lock(tmp_path, parse_part("1/1")):
        with pytest.raises(OutputError, match="in use"), merge_parts(tmp_path):
            pass
        with pytest.raises(OutputError, match="in use"), part_lock(tmp_path, parse_part("1/1")):
            pass


def test_a_started_part_forgets_its_earlier_ending(tmp_path: Path) -> None:
    _finish(tmp_path, "1/1", ["a"])
    with part_lock(tmp_path, parse_part("1/1")):
        pass  # killed before it finished
    with pytest.raises(PartError, match="not finished"), merge_parts(tmp_path):
        pass


def test_journal_resumes_and_skips_a_line_cut_short(tmp_path: Path) -> None:
    journal = PartJournal(tmp_path, {"old": {"case_id": "old"}})
    journal.append({"case_id": "a", "v": 1})
    journal.close()
    with open(tmp_path / "records.jsonl", "a") as fh:
        fh.write('{"case_id": "b", "v"')  # a kill mid-line
    again = PartJournal(tmp_path, {})
    assert again.entries == {"a": {"case_id": "a", "v": 1}}


def test_two_parts_append_concurrently_without_mixing(tmp_path: Path) -> None:
    def run(text: str, prefix: str) -> None:
        part = parse_part(text)
        with part_lock(tmp_path, part) as folder:
            journal = PartJournal(folder, {})
            for i in range(200):
                journal.append({"case_id": f"{prefix}{i:03d}"})
            journal.close()
            finish_part(folder, part, "encode", {}, list(journal.entries.values()), [])

    threads = [threading.Thread(target=run, args=(f"{i}/2", p)) for i, p in ((1, "a"), (2, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with merge_parts(tmp_path) as merged:
        ids = [r["case_id"] for r in merged.records]
    assert ids == [f"a{i:03d}" for i in range(200)] + [f"b{i:03d}" for i in range(200)]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_line_every_period_in_a_non_tty_log(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    with caplog.at_level(logging.INFO, logger="mri_vqvae.tasks.cases"):
        bar = CaseProgress(100, "encode", every_s=30.0, clock=clock)  # stderr is captured
        bar.skip(10)
        for _ in range(40):
            clock.now += 2.0  # 0.5 cases/s
            bar.update(1)
        bar.close()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("encode:")]
    # the first case, then once per 30 s of the 80 s: at 30 s and 60 s after the first line
    assert lines == ["encode: 11/100 cases  0.50 cases/s  ETA 3.0 min",
                     "encode: 26/100 cases  0.50 cases/s  ETA 2.5 min",
                     "encode: 41/100 cases  0.50 cases/s  ETA 2.0 min"]
