"""Tables for people and for programs, from one model: rows of named cells, optionally grouped.

``render(table, fmt, width)`` writes the same ``Table`` as

* ``table`` (the default): aligned text that fits ``width`` columns (100 unless ``--wide``): a column
  marked ``flex`` wraps onto continuation lines rather than widen the table, ``wide`` columns are
  shown only when there is room for them, a group's title is a line of its own above its rows, and a
  row's ``note`` (an error's or a skip's reason, whole) is wrapped on its own lines below it;
* ``markdown``: one pipe table, the group as its first column, every column;
* ``csv``: a header and one line per row, every column and the note;
* ``json``: a list of objects, one per row, raw values (numbers as numbers, ``None`` as null).

Nothing here imports torch: ``list`` and ``compare`` stay fast.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import textwrap
from dataclasses import dataclass, field
from typing import Any, Callable

FORMATS = ("table", "markdown", "csv", "json")
DEFAULT_WIDTH = 100
WIDE = 1000  # --wide: as wide as the content needs


@dataclass
class Column:
    key: str
    header: str
    align: str = "left"  # "left" or "right"
    fmt: Callable[[Any], str] | None = None  # value -> text (default: str, "" for None)
    flex: bool = False  # wraps instead of widening the table
    wide: bool = False  # shown in text only where the width allows (always in markdown, csv, json)

    def text(self, value: Any) -> str:
        if self.fmt is not None:
            return self.fmt(value)
        if value is None:
            return ""
        if isinstance(value, float):
            return "n/a" if not math.isfinite(value) else f"{value:.3f}"
        return str(value)


@dataclass
class Table:
    columns: list[Column]
    rows: list[dict] = field(default_factory=list)  # cells by column key; "_note" optional (a reason, whole)
    group_key: str | None = None  # the cell rows are grouped by: a title line in text, a column elsewhere
    group_titles: dict = field(default_factory=dict)  # group -> title line (text); default: the group
    group_footers: dict = field(default_factory=dict)  # group -> lines printed under the group (text)
    notes: list[str] = field(default_factory=list)  # footnotes under the text table
    fields: list[str] | None = None  # csv / json: these raw cells (default: the columns' keys)
    empty: str = "(nothing to show)"


def terminal_width(wide: bool = False) -> int:
    """``WIDE`` with ``--wide``; else 100, or fewer on a narrower terminal (never below 60); into a
    pipe or a file, 100 whatever ``COLUMNS`` says (the same output on every machine)."""
    import sys

    if wide:
        return WIDE
    if not (hasattr(sys.stdout, "isatty") and sys.stdout.isatty()):
        return DEFAULT_WIDTH
    cols = shutil.get_terminal_size((DEFAULT_WIDTH, 24)).columns
    return max(60, min(DEFAULT_WIDTH, cols))


def render(table: Table, fmt: str = "table", width: int = DEFAULT_WIDTH) -> str:
    if fmt == "table":
        return render_text(table, width)
    if fmt == "markdown":
        return render_markdown(table)
    if fmt == "csv":
        return render_csv(table)
    if fmt == "json":
        return render_json(table)
    raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")


def _all_columns(table: Table) -> list[Column]:
    cols = list(table.columns)
    if table.group_key and not any(c.key == table.group_key for c in cols):
        cols.insert(0, Column(table.group_key, table.group_key))
    return cols


def _field_columns(table: Table) -> list[Column]:
    if table.fields is None:
        return _all_columns(table)
    return [Column(k, k) for k in table.fields]


def render_json(table: Table) -> str:
    cols = _field_columns(table)
    out = []
    for r in table.rows:
        d = {c.key: _jsonable(r.get(c.key)) for c in cols}
        if r.get("_note"):
            d["note"] = r["_note"]
        out.append(d)
    return json.dumps(out, indent=1)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def render_csv(table: Table) -> str:
    cols = _field_columns(table)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([c.key for c in cols] + ["note"])
    for r in table.rows:
        w.writerow([_plain(c, r, table) for c in cols] + [r.get("_note", "")])
    return buf.getvalue().rstrip("\n")


def _plain(c: Column, r: dict, table: Table) -> str:
    v = r.get(c.key)
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if not math.isfinite(v) else repr(v)
    return str(v)


def render_markdown(table: Table) -> str:
    cols = _all_columns(table)
    if not table.rows:
        return table.empty
    esc = lambda s: s.replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(c.header for c in cols) + " |",
             "|" + "|".join("---:" if c.align == "right" else "---" for c in cols) + "|"]
    for r in table.rows:
        cells = [esc(c.text(r.get(c.key))) for c in cols]
        if r.get("_note"):
            cells[-1] = (cells[-1] + " — " if cells[-1] else "") + esc(r["_note"])
        lines.append("| " + " | ".join(cells) + " |")
    lines += [""] + table.notes if table.notes else []
    return "\n".join(lines)


def render_text(table: Table, width: int = DEFAULT_WIDTH) -> str:
    """Aligned text no line of which is longer than ``width``."""
    if not table.rows:
        return table.empty
    grouped = table.group_key is not None
    indent = "  " if grouped else ""
    cols = [c for c in table.columns if c.key != table.group_key]
    cells = [[c.text(r.get(c.key)) for c in cols] for r in table.rows]
    widths = [max([len(c.header)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]

    def total(ws, shown):
        return len(indent) + sum(ws[i] for i in shown) + 2 * (len(shown) - 1)

    shown = [i for i in range(len(cols)) if not cols[i].wide]
    for i in [i for i in range(len(cols)) if cols[i].wide]:  # wide columns, while they fit
        if total(widths, sorted(shown + [i])) <= width:
            shown = sorted(shown + [i])
    over = total(widths, shown) - width
    for i in [i for i in shown if cols[i].flex]:  # flex columns give up their excess, down to their longest
        if over <= 0:                              # word (never cut: a path stays whole) or 8 (or the header)
            break
        longest = max([len(w) for row in cells for w in row[i].split()] + [0])
        floor = max(8, longest, min(len(cols[i].header), widths[i]))
        give = min(over, widths[i] - floor)
        widths[i] -= give
        over -= give

    def line(texts: list[str]) -> list[str]:
        wrapped = [textwrap.wrap(t, widths[i], break_long_words=False, break_on_hyphens=False) or [""]
                   if cols[i].flex else [t[:widths[i]] if len(t) > widths[i] else t] for i, t in zip(shown, texts)]
        out = []
        for k in range(max(len(w) for w in wrapped)):
            parts = []
            for (i, w) in zip(shown, wrapped):
                t = w[k] if k < len(w) else ""
                parts.append(t.rjust(widths[i]) if cols[i].align == "right" else t.ljust(widths[i]))
            out.append((indent + "  ".join(parts)).rstrip())
        return out

    header = line([cols[i].header for i in shown])
    rule = indent + "-" * (total(widths, shown) - len(indent))
    lines: list[str] = []
    last = object()
    for r, row in zip(table.rows, cells):
        group = r.get(table.group_key) if grouped else None
        if grouped and group != last:
            if lines:
                lines += wrap_lines(table.group_footers.get(last, []), width)
            title = table.group_titles.get(group, str(group))
            lines += textwrap.wrap(title, width, subsequent_indent="    ") or [""]
            lines += header + [rule]
            last = group
        elif not grouped and not lines:
            lines += header + [rule]
        lines += line([row[i] for i in shown])
        if r.get("_note"):
            lines += textwrap.wrap(r["_note"], width, initial_indent=indent + "    ", subsequent_indent=indent + "    ",
                                   break_long_words=False, break_on_hyphens=False)
    if grouped:
        lines += wrap_lines(table.group_footers.get(last, []), width)
    for note in table.notes:
        lines += textwrap.wrap(note, width, subsequent_indent="  ", break_long_words=False, break_on_hyphens=False)
    return "\n".join(lines)


def wrap_lines(lines: list[str], width: int = DEFAULT_WIDTH, indent: str = "    ") -> list[str]:
    """Free text lines wrapped at ``width``, continuation lines indented (their own leading spaces kept)."""
    out = []
    for ln in lines:
        lead = ln[:len(ln) - len(ln.lstrip())]
        out += textwrap.wrap(ln, width, subsequent_indent=lead + indent, break_long_words=False,
                             break_on_hyphens=False) or [""]
    return out
