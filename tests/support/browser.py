"""Headless Chromium for report tests: find or install it, and read what a page rendered.

`render_page` opens a copy of a page in headless Chromium (offline, no sandbox, throwaway
profile, software WebGL2 by SwiftShader) with a probe script injected first in its head. Once the
page has loaded and every interactive viewer (``figure.viewer``) has finished or failed, the probe
writes into the DOM each image's naturalWidth (0 = broken), each viewer's state and whether it
is shown, and for each viewer canvas the fraction of its pixels that are not the black
background; Chromium's ``--dump-dom`` hands the DOM back. Canvas pixels are readable because the
probe makes every WebGL context keep its drawing buffer (``preserveDrawingBuffer``). With
``click`` the probe first clicks into the first viewer canvas (pointer and mouse events) and
measures how much of every viewer canvas changed (crosshairs that move together).

No network: the probe adds its own content security policy (nothing but data: images and inline
scripts and styles) ahead of the page's and records every ``securitypolicyviolation``, so any
attempt to load anything (fetch, XHR, image, script, font, worker, WebSocket, from the web or a
file) is blocked *and* listed in `Rendered.blocked`; `Rendered.resources` lists the resource
timing entries (what was loaded). Host names resolve to nothing (``--host-resolver-rules``), so
even a request the policy missed could not leave the machine.

``javascript=False`` renders the page inside a sandboxed ``srcdoc`` iframe without
``allow-scripts`` (the page's scripts cannot run there: what a reader with JavaScript off sees);
the probe runs in the outer page and reads the frame (same origin via ``allow-same-origin``).

Chromium is installed by scripts/install.sh (Debian package ``chromium``); tests skip, naming why,
only when it is absent and cannot be installed here.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
POLICY = ("<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
          "img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'\">")
# Reads document `d` once its viewers are done; writes the findings as attributes on `out`.
_READ = """
function mriRead(d, out) {
  var widths = Array.prototype.map.call(d.images, function (m) { return m.naturalWidth; });
  var figs = d.querySelectorAll('figure.viewer'), viewers = [], shown = [], painted = [];
  var where = [];
  for (var j = 0; j < figs.length; j++) {
    viewers.push(figs[j].getAttribute('data-viewer') || '');
    where.push((figs[j].querySelector('.viewer-where') || {}).textContent || '');
    shown.push(figs[j].offsetHeight > 0 ? 1 : 0);
    var cs = figs[j].querySelectorAll('canvas');
    for (var k = 0; k < cs.length; k++) {
      var c = cs[k], w = c.width, h = c.height, lit = 0;
      if (w && h && figs[j].getAttribute('data-viewer') === 'ready') {
        var x = document.createElement('canvas'); x.width = w; x.height = h;
        var g = x.getContext('2d'); g.drawImage(c, 0, 0);
        var p = g.getImageData(0, 0, w, h).data;
        for (var q = 0; q < p.length; q += 4) if (p[q] + p[q + 1] + p[q + 2] > 24) lit++;
      }
      painted.push(w && h ? lit / (w * h) : 0);
    }
  }
  var res = performance.getEntriesByType('resource').map(function (e) { return e.name; });
  var frame = d.defaultView.performance.getEntriesByType('resource');
  res = res.concat(frame.map(function (e) { return e.name; }));
  out.setAttribute('data-widths', JSON.stringify(widths));
  out.setAttribute('data-viewers', JSON.stringify(viewers));
  out.setAttribute('data-shown', JSON.stringify(shown));
  out.setAttribute('data-painted', JSON.stringify(painted));
  out.setAttribute('data-resources', JSON.stringify(res));
  out.setAttribute('data-blocked', JSON.stringify(window.mriBlocked));
  out.setAttribute('data-changed', JSON.stringify(window.mriChanged || []));
  out.setAttribute('data-where', JSON.stringify(where));
  out.setAttribute('data-probe', 'done');
}
window.mriBlocked = [];
document.addEventListener('securitypolicyviolation', function (e) {
  window.mriBlocked.push(e.violatedDirective + ' ' + e.blockedURI);
});
"""
# With JavaScript on: keep WebGL drawing buffers readable, wait for the viewers, then read.
_PROBE_JS = "<script>" + _READ + """
var mriGetContext = HTMLCanvasElement.prototype.getContext;
HTMLCanvasElement.prototype.getContext = function (kind, options) {
  if (kind === 'webgl2' || kind === 'webgl') {
    options = Object.assign({}, options || {}, {preserveDrawingBuffer: true});
  }
  return mriGetContext.call(this, kind, options);
};
window.addEventListener('load', function () {
  var polls = 0;
  (function wait() {
    var figs = document.querySelectorAll('figure.viewer'), pending = 0;
    for (var i = 0; i < figs.length; i++) if (!figs[i].hasAttribute('data-viewer')) pending++;
    if (pending && ++polls < 600) { setTimeout(wait, 50); return; }
    if (!window.mriClick) { mriRead(document, document.body); return; }
    var cs = document.querySelectorAll('figure.viewer canvas'), before = [].map.call(cs, mriSnap);
    var box = cs[0].getBoundingClientRect(), at = {bubbles: true, button: 0, pointerId: 1,
      isPrimary: true, clientX: box.left + 0.3 * box.width, clientY: box.top + 0.5 * box.height};
    ['pointerdown', 'mousedown', 'pointerup', 'mouseup', 'click'].forEach(function (t) {
      var Kind = t.indexOf('pointer') === 0 ? PointerEvent : MouseEvent;
      cs[0].dispatchEvent(new Kind(t, Object.assign({buttons: /down/.test(t) ? 1 : 0}, at)));
    });
    setTimeout(function () {
      window.mriChanged = [].map.call(cs, function (c, i) {
        var now = mriSnap(c), n = 0;
        for (var q = 0; q < now.length; q += 4) if (now[q] !== before[i][q]) n++;
        return n / (c.width * c.height);
      });
      mriRead(document, document.body);
    }, 300);
  })();
});
function mriSnap(c) {
  var x = document.createElement('canvas'); x.width = c.width; x.height = c.height;
  var g = x.getContext('2d'); g.drawImage(c, 0, 0);
  return g.getImageData(0, 0, c.width, c.height).data;
}
</script>"""
_CHROMIUM: list[str | None] = []


@dataclass(frozen=True)
class Rendered:
    """What Chromium rendered: per image, viewer and viewer canvas; blocked and loaded URLs."""

    widths: list[int]  # naturalWidth of each <img> (0 = not rendered)
    viewers: list[str]  # data-viewer of each viewer figure: "ready", "failed: ..." or ""
    shown: list[bool]  # whether each viewer figure is laid out (not hidden)
    painted: list[float]  # per viewer canvas: fraction of pixels brighter than near-black
    blocked: list[str]  # content security policy violations: every attempted load
    resources: list[str]  # resource timing entries: every completed load
    changed: list[float]  # with `click`: per viewer canvas, the fraction of pixels it changed
    where: list[str]  # each viewer figure's crosshair read-out (voxel and values; "" before one)


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


def chromium_args(tmp: Path, *extra: str) -> list[str]:
    """Headless, offline Chromium with software WebGL2 and a throwaway profile under `tmp`."""
    return [chromium(), "--headless", "--no-sandbox", "--use-angle=swiftshader",
            "--enable-unsafe-swiftshader", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={tmp / 'profile'}",
            "--window-size=1200,900", *extra]


def _probe_copy(page: Path, tmp: Path, javascript: bool, click: bool) -> Path:
    text = page.read_text(encoding="utf-8")
    probe = tmp / "probe.html"
    if javascript:
        head = re.search(r"<head[^>]*>", text)
        assert head is not None, f"{page} has no <head>"
        flag = "<script>window.mriClick = true;</script>" if click else ""
        text = text[:head.end()] + POLICY + flag + _PROBE_JS + text[head.end():]
    else:  # the page in a frame whose scripts cannot run; the probe reads it from outside
        text = ("<!DOCTYPE html><html><head>" + POLICY + "<script>" + _READ + "</script></head>"
                '<body><iframe id="page" sandbox="allow-same-origin" width="1180" height="880" '
                f'srcdoc="{html.escape(text)}"></iframe><script>window.addEventListener("load",'
                'function(){mriRead(document.getElementById("page").contentDocument,'
                "document.body);});</script></body></html>")
    probe.write_text(text, encoding="utf-8")
    return probe


def _attribute(dom: str, name: str) -> list:
    found = re.search(rf'<body[^>]*\s{name}="([^"]*)"', dom)
    assert found is not None, f"the probe wrote no {name}"
    return json.loads(html.unescape(found.group(1)))


def render_page(page: Path, tmp: Path, javascript: bool = True, *flags: str,
                click: bool = False) -> Rendered:
    """Open `page` in headless Chromium (JavaScript on or off; more command-line `flags`) and
    read what it rendered; `click`: first click the first viewer canvas (30 % from its left,
    half way down) and measure how every viewer canvas changed."""
    probe = _probe_copy(page, tmp, javascript, click)
    args = chromium_args(tmp, *flags, "--virtual-time-budget=60000", "--dump-dom",
                         probe.resolve().as_uri())
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    assert 'data-probe="done"' in dom, "the probe never finished: " + done.stderr[-2000:]
    shown = [bool(s) for s in _attribute(dom, "data-shown")]
    return Rendered(_attribute(dom, "data-widths"), _attribute(dom, "data-viewers"), shown,
                    _attribute(dom, "data-painted"), _attribute(dom, "data-blocked"),
                    _attribute(dom, "data-resources"), _attribute(dom, "data-changed"),
                    _attribute(dom, "data-where"))


def rendered_image_widths(page: Path, tmp: Path, javascript: bool = True) -> list[int]:
    """naturalWidth of every <img> of `page` after load in headless Chromium (0 = not rendered)."""
    return render_page(page, tmp, javascript).widths


SCRIPT = re.compile(r"<script([^>]*)>(.*?)</script>", re.S | re.I)


def inline_scripts(page: str) -> list[str]:
    """The text of each <script> of `page`; fails on one with attributes (``src=``, ``type=``)."""
    found = SCRIPT.findall(page)
    assert not any(attrs.strip() for attrs, _ in found), [a for a, _ in found]
    return [text for _, text in found]


def assert_self_contained(page: str) -> None:
    """Nothing from elsewhere: scripts only inline, and outside them no <link>, no http(s) URL, no
    CSS url(, and every src / href a data: URI or an #anchor."""
    inline_scripts(page)
    rest = SCRIPT.sub("", page)
    assert not re.search(r"<script|<link|https?://|url\(", rest, re.I)
    refs = re.findall(r'\s(?:src|href)="([^"]*)"', rest)
    assert all(r.startswith(("data:", "#")) for r in refs), [r[:60] for r in refs]
