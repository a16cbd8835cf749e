"""Headless Chromium for report tests: find or install it, and read what a page rendered.

`rendered_image_widths` opens a page in headless Chromium (offline, no sandbox, throwaway profile)
with a tiny script injected into a copy of the page that writes each image's naturalWidth into the
DOM once the page has loaded, and reads them back from ``--dump-dom``. A broken image has width 0.
Chromium is installed by scripts/install.sh (Debian package ``chromium``); tests skip, naming why,
only when it is absent and cannot be installed here.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
PROBE = (
    "<script>window.addEventListener('load',function(){var a=document.images;"
    "for(var i=0;i<a.length;i++){a[i].setAttribute('data-rendered-width',"
    "String(a[i].naturalWidth));}document.body.setAttribute('data-probe','done');});</script>"
)
_CHROMIUM: list[str | None] = []


def _install_chromium() -> str:
    """Try ``apt-get install chromium`` (as install.sh does); returns what went wrong, or ""."""
    apt = shutil.which("apt-get")
    if apt is None:
        return "apt-get is not available to install the Debian package chromium"
    try:
        done = subprocess.run([apt, "install", "-y", "-q", "chromium"], capture_output=True,
                              text=True, timeout=900, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"apt-get install chromium failed to run: {exc}"
    tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or [""]
    return "" if done.returncode == 0 else f"apt-get install chromium failed: {tail[0]}"


def chromium() -> str:
    """The Chromium executable, installing it once if needed; skips the test when impossible."""
    if not _CHROMIUM:
        found = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
        problem = ""
        if found is None:
            problem = _install_chromium()
            found = shutil.which("chromium")
        _CHROMIUM.append(found)
        _CHROMIUM.append(problem or "chromium is not on PATH after installing it")
    if _CHROMIUM[0] is None:
        pytest.skip(f"headless Chromium is needed to render the report: {_CHROMIUM[1]}")
    return str(_CHROMIUM[0])


def rendered_image_widths(page: Path, tmp: Path) -> list[int]:
    """naturalWidth of every <img> of `page` after load in headless Chromium (0 = not rendered)."""
    probe = tmp / "probe.html"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"),
                     encoding="utf-8")
    args = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={tmp / 'profile'}", "--window-size=1200,900",
            "--dump-dom", probe.resolve().as_uri()]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert 'data-probe="done"' in done.stdout, "the page's load event never fired"
    return [int(w) for w in re.findall(r'data-rendered-width="(\d+)"', done.stdout)]
