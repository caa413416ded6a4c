"""``influence-bench report --html DIR``: one static, self-contained page, ``DIR/index.html``: the
figures are inside it (base64 PNGs; the PNG files are also written beside it), CSS and JS are
inline, nothing is fetched (no network, no CDN), so the one file works opened from disk offline.

The page holds the runs' machines and commits, a sortable, filterable fidelity table (one row per
(setting, estimator, protocol) with its verdict, judged as ``influence-bench score`` judges, and the
reason, whole), one provenance panel per setting, and the figures. A run file is untrusted input:
every string read from it goes through ``html.escape``."""

from __future__ import annotations

import base64
import hashlib
import math
from html import escape
from pathlib import Path

from influence_bench.reporting.points import Point, merge_cases, shape_of, sort_key
from influence_bench.reporting.report import SCORES_NOTE, draw_figures, judged
from influence_bench.reporting.schema import Run

LOSSY = {"jpeg-q75": "JPEG q75 re-encoding of the original images"}

# (header, kind) of the fidelity table; "num" columns sort numerically on their data-v value
COLUMNS = [("setting", "text"), ("estimator", "text"), ("protocol", "text"), ("verdict", "text"),
           ("Spearman [95% CI]", "num"), ("Pearson [95% CI]", "num"), ("n", "num"), ("ceiling", "num"),
           ("time s", "num"), ("peak MiB", "num"), ("reason", "text")]

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;max-width:1800px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:2px 6px;vertical-align:top}
th{background:#f0f0f0;position:sticky;top:0}#fidelity th{cursor:pointer;user-select:none}
#fidelity th[aria-sort=ascending]::after{content:" \\25B2"}#fidelity th[aria-sort=descending]::after{content:" \\25BC"}
td.num{text-align:right;white-space:nowrap}td.reason{white-space:pre-wrap;max-width:48em;font-size:12px}
.v-pass{background:#e3f4e1}.v-FAIL{background:#f9d6d5;font-weight:bold}.v-xfail{background:#fdf0c8}
.v-error{background:#f4c7f0}.v-skipped{color:#777}
.panels{display:flex;flex-wrap:wrap;gap:10px}.panel{border:1px solid #ccc;border-radius:4px;padding:6px 10px}
.panel h3{margin:0 0 4px;font-size:14px}.panel dl{display:grid;grid-template-columns:auto auto;gap:0 10px;margin:0}
.panel dt{color:#666}.panel dd{margin:0}img{max-width:100%;border:1px solid #eee}
#filter{font-size:14px;padding:3px;width:24em}.note{color:#555}
"""

JS = """
(function () {
  var table = document.getElementById('fidelity'), body = table.tBodies[0];
  var heads = table.tHead.rows[0].cells, count = document.getElementById('shown');
  function key(cell, numeric) {
    var v = cell.getAttribute('data-v');
    if (numeric) { return (v === null || v === '') ? NaN : parseFloat(v); }
    return (v === null ? cell.textContent : v).toLowerCase();
  }
  function sortBy(i) {
    var th = heads[i], numeric = th.getAttribute('data-type') === 'num';
    var dir = th.getAttribute('aria-sort') === 'ascending' ? -1 : 1;
    for (var k = 0; k < heads.length; k++) { heads[k].removeAttribute('aria-sort'); }
    th.setAttribute('aria-sort', dir === 1 ? 'ascending' : 'descending');
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a.cells[i], numeric), y = key(b.cells[i], numeric);
      if (numeric) {
        if (isNaN(x) || isNaN(y)) { return isNaN(x) - isNaN(y); }  /* blanks last either way */
        return dir * (x - y);
      }
      return dir * x.localeCompare(y);
    });
    rows.forEach(function (r) { body.appendChild(r); });
  }
  for (var i = 0; i < heads.length; i++) {
    heads[i].addEventListener('click', sortBy.bind(null, i));
  }
  document.getElementById('filter').addEventListener('input', function () {
    var q = this.value.toLowerCase(), n = 0;
    Array.prototype.forEach.call(body.rows, function (r) {
      r.hidden = q !== '' && r.textContent.toLowerCase().indexOf(q) < 0;
      if (!r.hidden) { n++; }
    });
    count.textContent = n;
  });
})();
"""


def _sha256(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


def _e(v) -> str:
    return escape("" if v is None else str(v), quote=True)


def _num(v, spec=".3f") -> tuple[str, str]:
    """(data-v, shown text) of a number; blanks for None / NaN."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "", ""
    return repr(float(v)), format(v, spec)


def _td(text: str, data_v: str | None = None, cls: str = "") -> str:
    attrs = (f' data-v="{_e(data_v)}"' if data_v is not None else "") + (f' class="{cls}"' if cls else "")
    return f"<td{attrs}>{_e(text)}</td>"


def _corr(p) -> tuple[str, str]:
    if p is None or p.value is None:
        return "", ""
    v, text = _num(p.value)
    if p.ci_low is not None and p.ci_high is not None and math.isfinite(p.ci_low) and math.isfinite(p.ci_high):
        text += f" [{p.ci_low:.3f}, {p.ci_high:.3f}]"
    return v, text


def table_rows(points: list[Point], verdicts: dict, reasons: dict) -> list[str]:
    rows: dict[tuple, dict] = {}
    for p in sorted(points, key=sort_key):
        rows.setdefault((p.setting, p.estimator, p.protocol), {})[p.metric] = p
    out = []
    for key, ms in rows.items():
        p0 = next(iter(ms.values()))
        verdict = verdicts.get(key, p0.status)
        cells = [_td(key[0]), _td(key[1]), _td(key[2]), _td(verdict, cls=f"v-{verdict}")]
        ok = p0.status == "ok"
        for metric in ("spearman", "pearson"):
            cells.append(_td(*reversed(_corr(ms.get(metric) if ok else None)), cls="num"))
        for v, spec in ((p0.n_test if ok else None, "d"), (p0.noise_ceiling if ok else None, ".2f"),
                        (p0.wall_time_s, ".3g"), (p0.peak_memory_mb, ".0f")):
            data_v, text = _num(v, spec)
            cells.append(_td(text, data_v, "num"))
        cells.append(_td(reasons.get(key, ""), cls="reason"))
        out.append("<tr>" + "".join(cells) + "</tr>")
    return out


def method_section(cases: list, verdicts: dict) -> list[str]:
    """The implementations of each method side by side (``reporting.methods``), fastest first."""
    from influence_bench.reporting.methods import method_rows

    rows = method_rows(cases, verdicts)
    head = ["<h2>By method: implementations side by side</h2>"]
    if not rows:
        return head + ['<p class="note">No method has more than one implementation in these runs.</p>']
    heads = "".join(f"<th>{h}</th>" for h in ("method", "setting", "protocol", "estimator", "library", "verdict",
                                               "Spearman [95% CI]", "ceiling", "time s", "peak MiB"))
    out = head + [f'<table id="methods"><thead><tr>{heads}</tr></thead><tbody>']
    for r in rows:
        score = (f"{r['spearman']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
                 if r["status"] == "ok" and None not in (r["spearman"], r["ci_low"], r["ci_high"])
                 else (f"{r['status']}: {r['message']}" if r["status"] != "ok" else _num(r["spearman"])[1]))
        cells = [_td(r[k]) for k in ("method", "setting", "protocol", "estimator", "library")]
        cells += [_td(r["verdict"], cls=f"v-{r['verdict']}"),
                  _td(score, cls="num" if r["status"] == "ok" else "reason")]
        for v, spec in ((r["ceiling"], ".2f"), (r["time_s"], ".3g"), (r["peak_mb"], ".0f")):
            cells.append(_td(_num(v, spec)[1], cls="num"))
        out.append("<tr>" + "".join(cells) + "</tr>")
    return out + ["</tbody></table>"]


def setting_panel(setting: str, cases: list, verdicts: dict) -> str:
    c = cases[0]
    info = c.setting_info if isinstance(c.setting_info, dict) else {}
    lossy = info.get("lossy")
    fields = [(k, info.get(k)) for k in ("dataset", "family", "depth", "width", "weight_decay", "n_train")
              if k in info]
    fields += [("lossy", LOSSY.get(lossy, lossy) if lossy else "no"), ("setting version", c.setting_version),
               ("spec hash", c.spec_hash), ("ground-truth mode", c.mode)]
    counts: dict[str, int] = {}
    for (s, _, _), v in verdicts.items():
        if s == setting:
            counts[v] = counts.get(v, 0) + 1
    fields.append(("verdicts", ", ".join(f"{n} {v}" for v, n in sorted(counts.items()))))
    dl = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in fields)
    return f'<div class="panel"><h3>{_e(setting)}</h3><dl>{dl}</dl></div>'


def run_rows(runs: list[Run]) -> list[str]:
    out = []
    for r in runs:
        sha = r.commit.get("sha")
        commit = (str(sha)[:12] if sha else "unknown") + {True: " (dirty)", False: "", None: " (dirty: unknown)"}.get(
            r.commit.get("dirty"), "")
        vals = [r.path.name if r.path else "-", r.created, r.tier or "-", commit, r.machine.get("torch"),
                r.machine.get("cuda") or "-", r.machine.get("device_name"), r.machine.get("cpu_count"), len(r.cases)]
        out.append("<tr>" + "".join(_td(v) for v in vals) + "</tr>")
    return out


def _data_uri(png: Path) -> str:
    """The figure inside the page (one file to mail or archive; the PNG stays beside it too)."""
    import base64

    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def write_html(runs: list[Run], out: Path) -> Path:
    """Write ``out/index.html`` and its PNGs; returns the page's path."""
    from importlib import metadata

    try:
        __version__ = metadata.version("influence-bench")
    except metadata.PackageNotFoundError:  # a source tree that was never installed
        __version__ = "unknown"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cases = merge_cases(runs)
    points = [Point(c, shape_of(c)) for c in cases]
    verdicts, reasons = judged(cases)
    n_rows = len({(c.setting, c.estimator, c.protocol) for c in cases})
    tally: dict[str, int] = {}
    for v in verdicts.values():
        tally[v] = tally.get(v, 0) + 1
    by_setting: dict[str, list] = {}
    for p in sorted(points, key=sort_key):
        by_setting.setdefault(p.setting, []).append(p.case)
    heads = "".join(f'<th data-type="{kind}">{_e(h)}</th>' for h, kind in COLUMNS)
    runs_head = "".join(f"<th>{h}</th>" for h in ("run file", "created", "tier", "commit", "torch", "CUDA",
                                                   "device", "CPUs", "cases"))
    figures = []
    for title, name, why in draw_figures(points, out):
        figures.append(f"<h3>{_e(title)}</h3>" + (f'<p class="note">Not drawn: {_e(why)}.</p>' if why else
                                                  f'<img src="{_data_uri(out / name)}" alt="{_e(title)}" '
                                                  f'data-file="{_e(name)}">'))
    html = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        # only the page's own script may run, whatever a run file smuggles past the escaping
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
        f"style-src 'unsafe-inline'; script-src '{_sha256(JS)}'\">",
        '<link rel="icon" href="data:,">', "<title>influence-bench report</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>influence-bench report</h1><p>influence-bench {_e(__version__)}; verdicts: "
        + _e(", ".join(f"{n} {v}" for v, n in sorted(tally.items()))) + "</p>",
        f'<p class="note">{_e(SCORES_NOTE)}</p>',
        "<h2>Runs</h2>", f"<table id=\"runs\"><thead><tr>{runs_head}</tr></thead><tbody>", *run_rows(runs),
        "</tbody></table>",
        "<h2>Fidelity table</h2>",
        '<p><label>Filter rows: <input id="filter" type="search" placeholder="setting, estimator, verdict, '
        f'reason..."></label> <span id="shown">{n_rows}</span> of {n_rows} rows shown; click a header to sort.</p>',
        f'<table id="fidelity"><thead><tr>{heads}</tr></thead><tbody>',
        *table_rows(points, verdicts, reasons), "</tbody></table>",
        *method_section(cases, verdicts),
        "<h2>Settings</h2>", '<div class="panels">',
        *(setting_panel(s, cs, verdicts) for s, cs in by_setting.items()), "</div>",
        "<h2>Figures</h2>", *figures,
        f"<script>{JS}</script></body></html>", ""]
    page = out / "index.html"
    page.write_text("\n".join(html), encoding="utf-8")
    return page
