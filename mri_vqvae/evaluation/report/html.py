"""One self-contained HTML page: inline CSS, every image a base64 PNG data URI, no external link,
so it opens offline and can be mailed as one file. A page with `Viewer` blocks also inlines the
viewer's two scripts (`viewer`), and nothing else; a content security policy in the page forbids
every fetch but data: images, so no browser loads anything from elsewhere for it."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mri_vqvae.core.atomic import atomic_write_text
from mri_vqvae.evaluation.report.viewer import Viewer, viewer_html, viewer_scripts


def png_data_uri(path: str | Path) -> str:
    """``data:image/png;base64,...`` of a PNG file (so the page needs no other file)."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


@dataclass(frozen=True)
class Figure:
    """A PNG to embed, with a caption."""

    path: Path
    caption: str = ""


@dataclass(frozen=True)
class Table:
    """A table: header cells and rows of cells (str() of each; escaped when rendered)."""

    header: Sequence[str]
    rows: Sequence[Sequence[Any]]
    caption: str = ""


Block = str | Figure | Table | Viewer


@dataclass(frozen=True)
class Section:
    """A titled part of a page: paragraphs (str), figures and tables in order."""

    title: str
    blocks: Sequence[Block] = field(default_factory=list)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f2f2f2}figure{margin:1em 0}img{max-width:100%;height:auto}
figcaption,caption{color:#555;font-size:.9em;text-align:left}
nav a{margin-right:1em}p.note{color:#555}
.viewer-panel p{margin:.4em 0 .1em;font-size:.9em;color:#555}
.viewer-canvas{height:320px;background:#000}.viewer-canvas canvas{display:block}
.viewer-where{font-family:monospace}
"""
POLICY = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
          "script-src 'unsafe-inline'")  # no fetch of anything, from anywhere


def _anchor(title: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in title.lower()).strip("-")


def _block_html(block: Block, emitted: set[str]) -> str:
    if isinstance(block, Figure):
        cap = html.escape(block.caption)
        return (f'<figure><img src="{png_data_uri(block.path)}" alt="{cap}">'
                f"<figcaption>{cap}</figcaption></figure>")
    if isinstance(block, Viewer):
        return viewer_html(block, emitted)
    if isinstance(block, Table):
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in block.header)
        thead = f"<thead><tr>{head}</tr></thead>" if any(str(h) for h in block.header) else ""
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
            for row in block.rows
        )
        cap = f"<caption>{html.escape(block.caption)}</caption>" if block.caption else ""
        return f"<table>{cap}{thead}<tbody>{body}</tbody></table>"
    return f'<p class="note">{html.escape(block)}</p>'


def render_html(title: str, sections: Sequence[Section], subtitle: str = "") -> str:
    """One self-contained HTML page: inline CSS, PNGs as base64 data URIs, no link; the viewer's
    inline scripts when a section holds a `Viewer`, no script otherwise."""
    nav = " ".join(f'<a href="#{_anchor(s.title)}">{html.escape(s.title)}</a>' for s in sections)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{POLICY}">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="note">{html.escape(subtitle)}</p>' if subtitle else "",
        f"<nav>{nav}</nav>",
    ]
    emitted: set[str] = set()  # volumes of the viewers, each embedded once
    for s in sections:
        parts.append(f'<section id="{_anchor(s.title)}"><h2>{html.escape(s.title)}</h2>')
        parts += [_block_html(b, emitted) for b in s.blocks]
        parts.append("</section>")
    if any(isinstance(b, Viewer) for s in sections for b in s.blocks):
        parts += [f"<script>{script}</script>" for script in viewer_scripts()]
    parts.append("</body></html>")
    return "\n".join(p for p in parts if p) + "\n"


def write_html_report(path: str | Path, title: str, sections: Sequence[Section],
                      subtitle: str = "") -> Path:
    """Render `sections` (`render_html`) and write the page atomically; returns `path`."""
    atomic_write_text(path, render_html(title, sections, subtitle))
    return Path(path)
