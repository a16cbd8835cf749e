"""The example of docs/api.md runs as written against tiny runs (only its paths replaced)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.paths import REPO
from tests.support.shared_runs import SharedRuns

DOC = REPO / "docs" / "api.md"
PATHS = re.compile(r"^# ---- paths: edit these -+\n.*?^# ---- end of paths -+\n", re.M | re.S)


def python_blocks(text: str) -> list[str]:
    """The fenced ```python blocks of a Markdown text, in order."""
    return re.findall(r"^```python\n(.*?)^```", text, re.M | re.S)


def test_the_doc_marks_its_paths_once() -> None:
    blocks = python_blocks(DOC.read_text(encoding="utf-8"))
    assert len(blocks) >= 3
    assert [len(PATHS.findall(b)) for b in blocks] == [1] + [0] * (len(blocks) - 1)


def test_the_example_runs(runs: SharedRuns, tmp_path: Path,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    paths = (f"VQVAE_RUN = {str(runs.vqvae)!r}\nPRIOR_RUN = {str(runs.prior)!r}\n"
             f"SCAN = {str(runs.scan)!r}\nEXPORT_DIR = {str(tmp_path / 'export')!r}\n")
    blocks = python_blocks(DOC.read_text(encoding="utf-8"))
    namespace: dict[str, object] = {"__name__": "api_doc"}
    for i, block in enumerate(blocks):
        code = PATHS.sub(lambda _: paths, block)
        exec(compile(code, f"{DOC}:python block {i + 1}", "exec"), namespace)  # noqa: S102
    assert (tmp_path / "export" / "README.md").is_file()
    assert (tmp_path / "recon.nii.gz").is_file() and (tmp_path / "sample_3.nii.gz").is_file()
    assert (tmp_path / "recon_pretrained.nii.gz").is_file()
