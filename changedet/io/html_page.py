"""One self-contained HTML page template for every report (a run's ``report.html``, the evaluation
stages' ``report.html``): inline CSS, images inlined as PNG ``data:`` URIs, one small inline script
that sorts tables by a click on their header — no network, no external file, opens from an e-mail.

Build a page from :class:`Section` objects (:func:`facts`, :func:`table`, :func:`image`, or HTML of
your own, escaped with :func:`html.escape`) and render it with :func:`page`.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from typing import Any, Sequence

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
.subtitle{color:#666;margin-top:0}img{max-width:100%;height:auto}figure{margin:.5em 0}figcaption{color:#555;font-size:.9em}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f4}table.sortable th{cursor:pointer}table.sortable th:after{content:" \\2195";color:#aaa}
td.num{text-align:right;font-variant-numeric:tabular-nums}.warn{background:#fff4e5;border-left:4px solid #f0a020;padding:.4em .8em;margin:.3em 0}
.ok{color:#2a7d2a}code{background:#f4f4f4;padding:0 .2em}
"""

_SORT = """
document.querySelectorAll('table.sortable').forEach(function(table){
  table.querySelectorAll('th').forEach(function(th, col){
    th.addEventListener('click', function(){
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var asc = th.getAttribute('data-order') !== 'asc';
      rows.sort(function(a, b){
        var x = a.cells[col].getAttribute('data-value') || a.cells[col].textContent;
        var y = b.cells[col].getAttribute('data-value') || b.cells[col].textContent;
        var nx = parseFloat(x), ny = parseFloat(y);
        var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
        return asc ? c : -c;
      });
      rows.forEach(function(r){ body.appendChild(r); });
      th.setAttribute('data-order', asc ? 'asc' : 'desc');
    });
  });
});
"""


@dataclass(frozen=True)
class Section:
    """A heading and its body (HTML, already escaped)."""

    heading: str
    body: str


def image(png: bytes, alt: str, caption: str = "", ident: str = "") -> str:
    """A PNG inlined as a ``data:`` URI in a ``<figure>``."""
    data = base64.b64encode(png).decode("ascii")
    attrs = f' id="{html.escape(ident)}"' if ident else ""
    caption_html = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img{attrs} alt="{html.escape(alt)}" src="data:image/png;base64,{data}">{caption_html}</figure>'


def _cell(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return f"<td>{html.escape(str(value if value is not None else '–'))}</td>"
    if isinstance(value, (int, float)):
        text = f"{value:,}" if isinstance(value, int) else f"{value:.4g}"
        return f'<td class="num" data-value="{value!r}">{html.escape(text)}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], sortable: bool = False, ident: str = "") -> str:
    """An HTML table; numbers right-aligned (their exact value kept for sorting); ``sortable``: a click
    on a header sorts by that column."""
    attrs = (f' id="{html.escape(ident)}"' if ident else "") + (' class="sortable"' if sortable else "")
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table{attrs}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def facts(items: dict[str, Any]) -> str:
    """A two-column table of labelled facts (values shown as text)."""
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in items.items())
    return f"<table><tbody>{rows}</tbody></table>"


def warnings_block(lines: Sequence[str]) -> str:
    """Each line as a highlighted warning; a short all-clear when there is none."""
    if not lines:
        return '<p class="ok">Nothing that lowers trust in this map was detected.</p>'
    return "".join(f'<div class="warn">{html.escape(line)}</div>' for line in lines)


def page(title: str, subtitle: str, sections: Sequence[Section]) -> str:
    """The whole self-contained page."""
    body = "".join(f"<section><h2>{html.escape(s.heading)}</h2>{s.body}</section>" for s in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_STYLE}</style></head>'
            f'<body><h1>{html.escape(title)}</h1><p class="subtitle">{html.escape(subtitle)}</p>{body}'
            f"<script>{_SORT}</script></body></html>")  # fmt: skip
