"""The report's document model and its two writers: blocks (headings, paragraphs, tables, images, omissions, the
numbered reasons of a table's unknowns) rendered to markdown and to self-contained HTML, plus the number formatting
every table uses. render.py builds the blocks from RunResult files; this module knows nothing of runs.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------------------------------- formatting


def num(value: Any, digits: int = 3) -> str:
    """A number with sensible precision; 'n/a' for None or non-finite values."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) < 10 ** (digits - 1):
        value = float(f"{value:.{digits}g}")  # `digits` significant digits (99.96 -> 100); large values stay whole
    mag = abs(value)
    if mag >= 10 ** (digits - 1):
        return f"{value:,.0f}"
    if mag >= 1:  # `digits` significant digits: 1.41, 23.1
        return f"{value:,.{digits - 1 - int(math.floor(math.log10(mag)))}f}"
    return f"{value:.{digits}g}"


def num_bytes(value: Any) -> str:
    """A byte count in binary units with three significant digits: 512 B, 2 KiB, 1.5 MiB, 16 GiB; n/a for None."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(value) >= scale:
            return f"{num(value / scale)} {unit}"
    return f"{num(int(value))} B"


def pct(value: Any) -> str:
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    return f"{100.0 * value:.1f}%"


def na(value: Any, reason: Any, formatter: Any = num) -> str:
    """A value, or 'n/a (reason)' so that an unknown says why."""
    if value is None:
        return f"n/a ({reason})" if reason else "n/a"
    return formatter(value)


def shape_text(shape: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


# -------------------------------------------------------------------------------------------- document model


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    row_classes: list[str] = field(default_factory=list)


@dataclass
class Image:
    path: Path
    alt: str
    caption: str


@dataclass
class Omitted:
    text: str


@dataclass
class Notes:
    """The reasons of a table's unknowns, numbered: each 'n/a (reason)' cell reads 'n/a [k]' and reason k is here."""
    items: list[str]


Block = Heading | Para | Table | Image | Omitted | Notes

NA_PREFIX = "n/a ("


def _footnote_cell(text: str, reasons: dict[str, int]) -> str:
    if not (text.startswith(NA_PREFIX) and text.endswith(")")):
        return text
    k = reasons.setdefault(text[len(NA_PREFIX):-1], len(reasons) + 1)
    return f"n/a [{k}]"


def footnote_unknowns(blocks: Iterable[Block]) -> list[Block]:
    """Every table's 'n/a (reason)' cells become 'n/a [k]', one k per distinct reason, listed under the table: a
    column of the same long reason stays readable and the reason is still written once."""
    out: list[Block] = []
    for b in blocks:
        if not isinstance(b, Table):
            out.append(b)
            continue
        reasons: dict[str, int] = {}  # reason -> its number, in order of first use
        out.append(Table(b.headers, [[_footnote_cell(str(c), reasons) for c in row] for row in b.rows],
                         b.row_classes))
        if reasons:
            out.append(Notes([f"[{k}] {reason}" for reason, k in reasons.items()]))
    return out


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: Iterable[Block]) -> str:
    out: list[str] = []
    for b in footnote_unknowns(blocks):
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {b.text}\n")
        elif isinstance(b, Para):
            out.append(f"{b.text}\n")
        elif isinstance(b, Omitted):
            out.append(f"> Omitted: {b.text}\n")
        elif isinstance(b, Notes):
            out.append("".join(f"- n/a {item}\n" for item in b.items))
        elif isinstance(b, Image):
            out.append(f"![{b.alt}]({b.path.name})\n\n*{b.caption}*\n")
        elif isinstance(b, Table):
            lines = ["| " + " | ".join(_md_cell(h) for h in b.headers) + " |",
                     "|" + "|".join("---" for _ in b.headers) + "|"]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            out.append("\n".join(lines) + "\n")
    return "\n".join(out)


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 1.5em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 12px; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
tr.prov-measured td { background: #eef5fc; } tr.prov-modelled td { background: #f3f3f3; }
tr.prov-projected td { background: #f5eefa; }
blockquote.omitted { color: #666; border-left: 3px solid #bbb; margin: 0.5em 0; padding-left: 0.8em; }
ul.notes { font-size: 12px; color: #444; margin: -0.8em 0 1.2em; list-style: none; padding-left: 0; }
figure { margin: 1em 0; } figcaption { font-size: 12px; color: #444; } img { max-width: 100%; height: auto; }
"""


def to_html(blocks: Iterable[Block], title: str) -> str:
    esc = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">', f"<title>{esc(title)}</title>",
           f"<style>{_CSS}</style>", "</head>", "<body>"]
    for b in footnote_unknowns(blocks):
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{esc(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            out.append(f"<p>{esc(b.text)}</p>")
        elif isinstance(b, Omitted):
            out.append(f'<blockquote class="omitted">Omitted: {esc(b.text)}</blockquote>')
        elif isinstance(b, Notes):
            out.append('<ul class="notes">' + "".join(f"<li>n/a {esc(item)}</li>" for item in b.items) + "</ul>")
        elif isinstance(b, Image):
            data = base64.b64encode(b.path.read_bytes()).decode("ascii")
            out.append(f'<figure><img src="data:image/png;base64,{data}" alt="{esc(b.alt)}">'
                       f"<figcaption>{esc(b.caption)}</figcaption></figure>")
        elif isinstance(b, Table):
            out.append("<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in b.headers) + "</tr></thead>")
            out.append("<tbody>")
            for i, row in enumerate(b.rows):
                cls = b.row_classes[i] if i < len(b.row_classes) else ""
                attr = f' class="{esc(cls)}"' if cls else ""
                out.append(f"<tr{attr}>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>")
            out.append("</tbody></table>")
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"
