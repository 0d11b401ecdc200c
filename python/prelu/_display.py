"""How results show in a notebook: ``Result`` (a dict: the CLI's ``--json``
fields, with an HTML table for ``_repr_html_``) and ``Report`` (a run
folder's page from ``prelu report``, shown in an isolated frame). Every
value is escaped; nothing from a file or a model reaches the page as markup."""

from __future__ import annotations

import html
import math
import os

from . import _prelu

#: Longest list shown in a table cell (then "... N more").
_MOST = 8
#: Most rows of a table.
_ROWS = 200


def _cell(v) -> str:
    """One value as escaped text for a table cell."""
    if v is None:
        return "&mdash;"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "NaN" if math.isnan(v) else html.escape(f"{v:.4g}")
    if isinstance(v, (list, tuple)):
        shown = ", ".join(_cell(x) for x in v[:_MOST])
        more = f", ... {len(v) - _MOST} more" if len(v) > _MOST else ""
        return f"[{shown}{more}]"
    if isinstance(v, dict):
        return html.escape(", ".join(f"{k}: {len(x) if isinstance(x, list) else x}" for k, x in v.items()))
    return html.escape(str(v))


def _is_rows(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(r, dict) for r in v)


def _rows_table(rows: list) -> str:
    """A list of dicts as a table: one column per key, in first-seen order."""
    cols = []
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{_cell(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows[:_ROWS]
    )
    more = f"<p>... {len(rows) - _ROWS} more rows</p>" if len(rows) > _ROWS else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{more}"


def table_html(title: str, obj: dict) -> str:
    """``obj`` as HTML: its scalar fields in one table, each list of
    records (``layers``, ``alarms``, ...) in a table of its own."""
    scalars = {k: v for k, v in obj.items() if not _is_rows(v) and not isinstance(v, dict)}
    parts = [f"<h4>{html.escape(title)}</h4>"]
    if scalars:
        parts.append(
            "<table>" + "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_cell(v)}</td></tr>" for k, v in scalars.items()) + "</table>"
        )
    for k, v in obj.items():
        if _is_rows(v):
            parts.append(f"<h5>{html.escape(str(k))}</h5>" + _rows_table(v))
        elif isinstance(v, dict) and v and all(not isinstance(x, (dict, list)) for x in v.values()):
            parts.append(f"<h5>{html.escape(str(k))}</h5>" + _rows_table([v]))
        elif isinstance(v, dict) and v:
            parts.append(table_html(str(k), v))
    return "<div>" + "".join(parts) + "</div>"


class Result(dict):
    """A dict of the CLI's ``--json`` fields that a notebook shows as tables."""

    def __init__(self, title: str, fields: dict):
        super().__init__(fields)
        self._title = title

    def _repr_html_(self) -> str:
        return table_html(self._title, self)


class Report:
    """``prelu report`` of one or more run folders: ``html`` (the page),
    ``save(path)``, and inline display in a notebook (in a frame, so the
    page's styles stay inside it)."""

    def __init__(self, *runs):
        if not runs:
            raise ValueError("prelu.report: give at least one run folder")
        self.runs = [os.fspath(r) for r in runs]
        self.html = _prelu.report_html(self.runs)

    def save(self, path) -> None:
        """Writes the page to ``path``."""
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.html)

    def _repr_html_(self) -> str:
        return (
            f'<iframe srcdoc="{html.escape(self.html, quote=True)}" '
            'style="width:100%;height:900px;border:0" sandbox></iframe>'
        )

    def __repr__(self) -> str:
        return f"Report({', '.join(self.runs)})"


def report(*runs) -> Report:
    """``prelu report RUN...`` from Python: the HTML page of the run folders
    (prelu's or ``prelu.torch.Sentinel``'s), overlaid when there are several."""
    return Report(*runs)
