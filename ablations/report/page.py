"""The report's HTML: tables that read without scripts, figures as plotly specs drawn by the
inlined plotly.js, and the page around them. Everything the page needs is in the one file."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

HERE = Path(__file__).resolve().parent
PLOTLY_JS = HERE / "plotly-cartesian.min.js"  # where it comes from: VENDOR.md


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def cell_text(value: Any) -> str:
    """A value as a table shows it: `–` for missing, numbers short."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return f"{int(value):,}" if abs(value) >= 10_000 else str(int(value))
        return f"{value:,.0f}" if abs(value) >= 10_000 else f"{value:.4g}"
    return str(value)


def table(
    df: pd.DataFrame,
    *,
    best: set | None = None,
    sortable: bool = False,
    table_id: str | None = None,
    row_state: list[str] | None = None,
    numbers: dict[str, str] | None = None,
) -> str:
    """A DataFrame as an HTML table. `best`: (row, column) cells in bold; `sortable`: numeric
    cells carry their value (`data-v`) for the page's sort; `row_state`: each row's trial state
    (its colour and the filter's); `numbers`: a format per column; `message` columns wrap."""
    best, numbers = best or set(), numbers or {}
    attrs = f' id="{esc(table_id)}"' if table_id else ""
    cls = "sortable" if sortable else ""
    head = "".join(f'<th scope="col">{esc(c)}</th>' for c in df.columns)
    rows = []
    for pos, (i, r) in enumerate(df.iterrows()):
        cells = []
        for c in df.columns:
            v = r[c]
            fmt = numbers.get(c)
            missing = v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v))
            text = "–" if missing else format(v, fmt) if fmt else cell_text(v)
            data = ""
            if sortable and not missing and isinstance(v, int | float) and not isinstance(v, bool):
                data = f' data-v="{float(v)!r}"'
            body = f"<b>{esc(text)}</b>" if (i, c) in best else esc(text)
            wrap = ' class="message"' if c == "Message" else ""
            cells.append(f"<td{data}{wrap}>{body}</td>")
        rc = ""
        if row_state:
            rc = f' class="{esc(row_state[pos])}" data-state="{esc(row_state[pos])}"'
        rows.append(f"<tr{rc}>{''.join(cells)}</tr>")
    return (
        f'<div class="scroll"><table class="{cls}"{attrs}><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def plot(spec_id: str, spec: dict[str, Any], height: int, fallback: str = "") -> str:
    """A figure's placeholder and its spec; `fallback`: what a reader without scripts sees."""
    data = json.dumps(spec, allow_nan=False, separators=(",", ":")).replace("</", "<\\/")
    nojs = f"<noscript>{fallback}</noscript>" if fallback else ""
    return (
        f'<div class="plot" data-spec="{esc(spec_id)}" style="height:{height}px"></div>{nojs}'
        f'<script type="application/json" id="{esc(spec_id)}">{data}</script>'
    )


def section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{body}</section>'


def paragraph(text: str) -> str:
    return f"<p>{esc(text)}</p>"


def document(title: str, header: str, sections: list[tuple[str, str, str]]) -> str:
    """The whole page: its styles, plotly.js and the page's script inline, a table of contents."""
    toc = "".join(f'<li><a href="#{esc(a)}">{esc(t)}</a></li>' for a, t, _ in sections)
    body = "".join(section(a, t, b) for a, t, b in sections)
    css = (HERE / "page.css").read_text()
    js = (HERE / "page.js").read_text()
    plotly = PLOTLY_JS.read_text()
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        # nothing on the network: no request leaves the page, whatever a script tries
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "script-src 'unsafe-inline' 'unsafe-eval'; style-src 'unsafe-inline'; "
        'img-src data: blob:; font-src data:">'
        f"<title>{esc(title)}</title><style>{css}</style></head><body>"
        f"<header>{header}</header><nav><ol>{toc}</ol></nav><main>{body}</main>"
        f"<script>{plotly}</script><script>{js}</script></body></html>\n"
    )
