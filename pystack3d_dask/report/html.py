"""The report page: one self-contained HTML file (inline style, charts and images; no script, no network)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from html import escape
from pathlib import Path

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1280px;padding:0 16px 40px;color:#222}
h1{font-size:22px;margin:18px 0 4px}h2{font-size:18px;margin:28px 0 6px;border-bottom:1px solid #ccc}
h3{font-size:15px;margin:14px 0 4px}nav a{margin-right:10px}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#f4f4f4}td.n{text-align:right}pre{margin:0;font-size:12px}
.warn{color:#a40}figure{display:inline-block;margin:6px 12px 6px 0;vertical-align:top}
figcaption{font-size:12px;color:#555;max-width:760px}.planes{display:flex;flex-wrap:wrap;gap:8px}
.planes div{display:flex;flex-direction:column;align-items:center}.planes span{font-size:12px;color:#555}
img{max-width:300px;max-height:240px;image-rendering:auto;border:1px solid #ddd}
svg.chart{margin:2px 6px 2px 0}.chart .t{font-size:12px;text-anchor:middle;font-weight:600}
.chart .xl{font-size:10px;text-anchor:middle;fill:#444}.chart .yl{font-size:10px;text-anchor:end;fill:#444}
.chart .lg{font-size:10px;fill:#333}.chart .g{stroke:#e4e4e4}.chart .f{fill:none;stroke:#999}
.chart .s{fill:none;stroke-width:1.3}.chart .m{fill:none;stroke:#d00;stroke-width:1.6}
"""


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """An HTML table; cells are HTML already (escape text before)."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def page(*, title: str, summary: str, sections: Sequence[tuple[str, str, str]]) -> str:
    """The whole page: a title, the run summary, then one section ``(anchor, heading, html)`` per step."""
    nav = " ".join(f'<a href="#{escape(a)}">{escape(h)}</a>' for a, h, _ in sections)
    body = "".join(f'<section id="{escape(a)}"><h2>{escape(h)}</h2>{html}</section>' for a, h, html in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{STYLE}</style></head>'
            f"<body><h1>{escape(title)}</h1><nav>{nav}</nav>{summary}{body}</body></html>")


def write_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file: a reader never sees half a page."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
