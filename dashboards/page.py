"""The report as one HTML page: the summary table with a link to every trial's run, the
figures, and the best trial's galleries."""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from dashboards.interactive import configuration, write_plotly_js
from dashboards.sections import FAILED, Picture, Report
from segtune.config.names import COLUMNS, OBJECTIVE, format_metric
from segtune.tracking.address import is_server, public_uri
from segtune.tracking.query import PARAM_PREFIX
from segtune.tracking.runs import run_page, runs_page

CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1200px;padding:0 1em;color:#222}
h1{margin-bottom:.2em} h2{margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}
td,th{border:1px solid #ddd;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f4f4f4} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.failed{color:#999} tr.failed td.error{color:#b00}
tr.best td:first-child{font-weight:bold}
figure{margin:1em 0} figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.85em;color:#555}
.gallery img{width:100%;max-width:960px} .thumb{width:330px}
.notes li{color:#8a5a00} .wide{overflow-x:auto} code{background:#f4f4f4;padding:0 .2em}
"""


# an address in a summary line or note, without the sentence's closing mark
URL = re.compile(r"https?://[^\s<>\"]*[^\s<>\"'.,;:!?)\]]")


def linked(text: str) -> str:
    """`text` as HTML, each http(s) address in it a link (a reused run's page, the MLflow UI)."""
    out, end = [], 0
    for match in URL.finditer(text):
        url = html.escape(match.group(0))
        out += [html.escape(text[end : match.start()]), f'<a href="{url}">{url}</a>']
        end = match.end()
    return "".join(out) + html.escape(text[end:])


def _run_link(report: Report, run_id: str) -> str:
    url = run_page(report.data.tracking_uri, report.data.experiment_id, run_id)
    if url is not None:
        return f'<a href="{html.escape(url)}">{run_id[:8]}</a>'
    return f"<code>{run_id}</code>"


def _summary_table(report: Report) -> str:
    """Every trial, failed ones last with their error; data-run-id marks a trial's row."""
    data = report.data
    table = data.table
    params = data.varying_params()
    metrics = [(m, p) for m, (_, p) in COLUMNS.items() if m in table.columns]
    order = table.assign(
        _failed=table["status"] == FAILED, _obj=pd.to_numeric(table.get(OBJECTIVE), errors="coerce")
    ).sort_values(["_failed", "_obj"], ascending=[True, False], na_position="last")
    where = ["node"] if table["node"].nunique() > 1 else []  # a sweep over several machines
    head = ["trial", "status", *where, *(p[len(PARAM_PREFIX) :] for p in params)]
    head += [m for m, _ in metrics]
    head += (
        ["Pareto front"]
        + (["within constraints"] if report.within is not None else [])
        + ["MLflow run"]
    )
    lines = ['<div class="wide"><table id="summary"><thead><tr>']
    lines += [f"<th>{html.escape(h)}</th>" for h in head]
    lines.append("</tr></thead><tbody>")
    best_id = report.best.row["run_id"] if report.best is not None else None
    for idx, row in order.iterrows():
        failed = row["status"] == FAILED
        css = "failed" if failed else ("best" if row["run_id"] == best_id else "")
        cells = [html.escape(str(row[c])) for c in ("label", "status", *where)]
        cells += [html.escape(str(row[p])) if pd.notna(row[p]) else "—" for p in params]
        num = [format_metric(row[m], pattern) for m, pattern in metrics]
        fronts = [
            COLUMNS[c][0] for c, mask in report.fronts.items() if idx in mask.index and mask[idx]
        ]
        tail = [", ".join(fronts)]
        if report.within is not None:
            tail.append("yes" if idx in report.within.index and report.within[idx] else "")
        tail.append(_run_link(report, row["run_id"]))
        tds = [f"<td>{c}</td>" for c in cells] + [f'<td class="num">{c}</td>' for c in num]
        tds += [f"<td>{c}</td>" for c in tail]
        title = html.escape("\n".join(configuration(row, data.param_columns)))
        lines.append(
            f'<tr class="{css}" data-run-id="{row["run_id"]}" title="{title}">{"".join(tds)}</tr>'
        )
        if failed and row["error"]:
            lines.append(
                f'<tr class="failed detail"><td class="error" colspan="{len(head)}">'
                f"{html.escape(str(row['error'])[:400])}</td></tr>"
            )
    lines.append("</tbody></table></div>")
    return "\n".join(lines)


def _figures_html(items: Sequence[Picture], src: Callable[[str], str]) -> str:
    """Each figure: its interactive view with the PNG folded under it, or the PNG alone."""
    parts = []
    for f in items:
        img = f'<img src="{src(f.path)}" alt="{html.escape(f.path)}">'
        if f.plot:
            img = f"{f.plot}<details><summary>the same as a picture ({f.path})</summary>{img}</details>"
        parts.append(
            f'<figure data-trials="{html.escape("|".join(f.trials))}">{img}'
            f"<figcaption>{html.escape(f.caption)}</figcaption></figure>"
        )
    return "\n".join(parts)


def _best_html(report: Report, src: Callable[[str], str]) -> str:
    best = report.best
    if best is None:
        return ""
    parts = [f"<h2>Best trial: {html.escape(str(best.row['label']))}</h2>"]
    for kind, title in (
        ("best", "Good detection cases (Picture 10)"),
        ("worst", "Poor detection cases (Picture 9)"),
    ):
        items = [(p, c) for k, p, c in best.overall if k == kind]
        if items:
            parts.append(
                f"<h3>{title}</h3><p>Left: image, middle: prediction, right: ground truth.</p>"
            )
            parts += [
                f'<figure class="gallery"><img src="{src(p)}" alt="{html.escape(c)}"><figcaption>{html.escape(c)}</figcaption></figure>'
                for p, c in items
            ]
    if best.per_class:
        parts.append("<h3>Per class: the image with the highest and the lowest IoU</h3>")
        parts.append(
            '<table id="per-class"><tr><th>class</th><th>good example</th><th>bad example</th></tr>'
        )
        for entry in best.per_class:
            cells = []
            for kind in ("best", "worst"):
                if kind not in entry:
                    cells.append("<td>None (class absent)</td>")
                    continue
                image_id, iou, path = entry[kind]
                text = f"{html.escape(str(image_id))}: IoU {iou:.3f}"
                img = (
                    f'<br><img class="thumb" src="{src(path)}" alt="{html.escape(path)}">'
                    if path
                    else ""
                )
                cells.append(f"<td>{text}{img}</td>")
            parts.append(f"<tr><td>{html.escape(str(entry['class']))}</td>{''.join(cells)}</tr>")
        parts.append("</table>")
    parts.append(_figures_html(best.figures, src))
    return "\n".join(parts)


def render(report: Report, src: Callable[[str], str]) -> str:
    """The whole page; `src` turns a report-relative image path into an <img> source."""
    data = report.data
    trials = data.table
    sweeps = ", ".join(f"{s.run_name} ({s.run_id[:8]})" for s in data.sweeps.itertuples())
    counts = trials["status"].value_counts().to_dict()
    status = ", ".join(f"{n} {s.lower()}" for s, n in counts.items())
    header = [
        f"<h1>{html.escape(data.experiment)}</h1>",
        f"<p>Sweep{'s' if len(data.sweeps) > 1 else ''}: {html.escape(sweeps)}. "
        f"{len(trials)} trials: {html.escape(status)}. Tracking URI: <code>{html.escape(public_uri(data.tracking_uri))}</code>.</p>",
    ]
    one_sweep = data.sweeps["run_id"].iloc[0] if len(data.sweeps) == 1 else None
    page = runs_page(data.tracking_uri, data.experiment_id, one_sweep)
    if is_server(data.tracking_uri):
        header.append(
            f'<p>The runs in MLflow: <a href="{html.escape(page)}">{html.escape(page)}</a></p>'
        )
    else:
        header.append(f"<p>The runs in MLflow: <code>{html.escape(page)}</code>.</p>")
    body = header + ["<h2>Summary</h2><ul>"]
    body += [f"<li>{linked(s)}</li>" for s in report.summary] + ["</ul>"]
    body.append(_summary_table(report))
    if report.notes:
        body.append('<h2>Notes</h2><ul class="notes">')
        body += [f"<li>{linked(n)}</li>" for n in report.notes] + ["</ul>"]
    for section, title in (
        ("curves", "Training curves"),
        ("pareto", "Quality against cost"),
        ("seeds", "Seed-to-seed spread"),
        ("importance", "What mattered"),
    ):
        if report.figures.get(section):
            body.append(f"<h2>{title}</h2>" + _figures_html(report.figures[section], src))
    body.append(_best_html(report, src))
    pictures = [p for section in report.figures.values() for p in section]
    script = (
        f'<script src="{src(write_plotly_js(report.out))}"></script>'
        if any(p.plot for p in pictures)
        else ""
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>segtune report: {html.escape(data.experiment)}</title><style>{CSS}</style>"
        f"{script}</head>"
        f"<body>{''.join(body)}</body></html>\n"
    )


def inline(out: Path) -> Callable[[str], str]:
    """Sources as data URIs: the page alone holds its pictures and Plotly's script."""

    def src(path: str) -> str:
        kind = "text/javascript" if path.endswith(".js") else "image/png"
        return f"data:{kind};base64," + base64.b64encode((out / path).read_bytes()).decode()

    return src
